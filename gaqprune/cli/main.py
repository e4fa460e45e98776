"""The ``gaqprune`` process: arguments in (the guide's bare switches), one-line errors out, exit statuses.

User mistakes become one line on stderr and exit status 2; Ctrl-C exits 130, SIGTERM 143, each saying what was kept.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import sys
import threading
import warnings
from argparse import ArgumentError

from lightning.pytorch.utilities.exceptions import SIGTERMException

from gaqprune.atomic import Terminated, sigterm_unwinds
from gaqprune.cli.app import SETTINGS, GaqpruneCLI, GaqpruneTrainer
from gaqprune.data.datamodule import LMDataModule
from gaqprune.errors import GaqpruneError
from gaqprune.run.rundir import RunDir, launch_rank_is_zero
from gaqprune.train.module import LitCausalLM

_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string", "NoneType": "null"}


def _accepted(types: str) -> str | None:
    """What jsonargparse's type list (``typing.Literal['a', 'b']``, ``<class 'int'>``, ...) accepts, in words; None
    when it holds a type this cannot put in words (a list, a class path): the parser's own message says more."""
    literals = r"typing\.Literal\[(.*?)\]"
    if re.sub(r"<class '\w+'>", "", re.sub(literals, "", types)).strip(" ,"):
        return None
    choices = [c.strip(" '") for group in re.findall(literals, types) for c in group.split(",")]
    parts = [f"one of {', '.join(dict.fromkeys(choices))}"] if choices else []
    parts += [_KINDS.get(name, name) for name in re.findall(r"<class '(\w+)'>", types)]
    return " or ".join(dict.fromkeys(parts))


def one_line(message: str) -> str:
    """Parser errors span lines; users get one: the flag, the value and what is accepted."""
    plain = re.search(r'key "([^"]+)":\s*Expected a (typing\.Literal\[.*?\]|<class \'\w+\'>)\. Got value: (.*)', message,
                      re.S)
    union = re.search(r'key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]\s*'
                      r'Errors:.*Given value: (.*)', message, re.S)
    for match in (plain, union):
        if match and _accepted(match.group(2)):
            flag, types, value = match.groups()
            return f"--{flag} {value.strip()!r} is not accepted; give {_accepted(types)}"
    return " ".join(message.split())


def bool_flags() -> set[str]:
    """The switches of the parameter guide, e.g. ``--save_model``, that its users write without a value."""
    flags = {"--prune"}
    for cls in SETTINGS.values():
        flags |= {f"--{f.name}" for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
    return flags


def expand_bare_flags(args: list[str]) -> list[str]:
    """``--save_model`` alone means ``--save_model true`` (the guide's usage); explicit values pass through."""
    switches, out = bool_flags(), []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in switches and (following is None or following.startswith("--")):
            out.append("true")
    return out


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


KEPT = ("complete results are kept and a rerun reuses them; a fine-tune's checkpoint too (resume: --ckpt_path last, "
        "or rerun `prune --finetune`)")


def run(args: list[str] | None = None) -> GaqpruneCLI:
    """Run the CLI and return it; user mistakes become one-line errors with exit status 2."""
    args = expand_bare_flags(sys.argv[1:] if args is None else list(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # args are sys.argv with bare switches expanded; Lightning warns whenever both are set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    # Lightning 2.6 on torch 2.10+: an internal deprecation, printed on every fit, nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not launch_rank_is_zero():  # one set of model-loading bars, not one per rank
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 42" on every call
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # Lightning's product adverts
    interrupted = []

    def on_sigint(signum, frame):  # Lightning turns a fit's KeyboardInterrupt into exit status 1: remember it was one
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    try:
        with sigterm_unwinds():
            return GaqpruneCLI(
                LitCausalLM,
                LMDataModule,
                trainer_class=GaqpruneTrainer,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=42,
                args=args,
                parser_kwargs={"default_env": False, "exit_on_error": False},
            )
    except (GaqpruneError, ArgumentError) as err:
        print(f"gaqprune: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"gaqprune: interrupted; {KEPT}", file=sys.stderr)
        sys.exit(130)
    except (SIGTERMException, Terminated):  # a SystemExit without a code: a pre-empted job would read as a success
        print(f"gaqprune: terminated (SIGTERM); {KEPT}", file=sys.stderr)
        sys.exit(143)
    except SystemExit as err:
        if interrupted and err.code == 1:
            print(f"gaqprune: interrupted; {KEPT}", file=sys.stderr)
            sys.exit(130)
        raise
    finally:
        RunDir.release_all()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
