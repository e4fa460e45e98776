"""Zero-shot task accuracy through EleutherAI's lm-evaluation-harness (lm-eval 0.4.13), on the model in hand.

Structured-pruning papers (LLM-Pruner, SliceGPT, ShortGPT, ...) report, next to perplexity, zero-shot accuracy on seven
commonsense tasks measured with lm-eval. Every number here is lm-eval's own: the model in memory is wrapped in
``lm_eval.models.huggingface.HFLM`` and handed to ``lm_eval.simple_evaluate`` (no subprocess, nothing scored by hand).
For a multiple-choice document with context ``c`` and choices ``a_1..a_k`` lm-eval scores each choice by its summed
log-likelihood ``ll_i = sum_t log p(a_i[t] | c, a_i[<t])`` (``lm_eval/api/task.py``, ``ConfigurableTask.process_results``)
and counts

    acc      = 1[argmax_i ll_i == gold]
    acc_norm = 1[argmax_i ll_i / len_bytes(a_i) == gold]        (per-byte normalised: no preference for short choices)

averaged over the documents (``limit``: the first N documents in the dataset's order, ``evaluator_utils.get_sample_size``).

What this module gives:

- ``ZeroShotSettings`` (the flags) and ``check_settings``: every name resolved and every refusal made before a model
  is loaded (unknown task, unreadable task folder, lm-eval missing, a hub dataset that cannot be reached, bad limit);
- the ``commonsense`` preset with the metric each paper reports per task (``REPORTED``);
- ``gaqprune_wiki_next``, a small offline multiple-choice task built from the embedded corpus's *evaluation* articles
  (never the calibration ones), generated once into ``cache_root()/tasks/`` and always registered;
- ``evaluate`` (a JSON-serialisable summary), ``format_table`` (Markdown) and ``scalars`` (``eval/<task>/<metric>``).

Where lm-eval's behaviour needed care (lm-eval 0.4.13, files under ``lm_eval/``):

- ``models/huggingface.py`` ``HFLM.__init__`` calls ``model.eval()`` and ``model.tie_weights()`` on a model passed in,
  and ``models/utils.py`` ``configure_pad_token`` sets a pad token on the tokenizer passed in: ``evaluate`` restores the
  model's train/eval mode afterwards and hands lm-eval a copy of a tokenizer without a pad token.
- ``evaluator.py`` ``simple_evaluate`` re-seeds Python's, NumPy's and torch's global generators (0 / 1234 / 1234):
  ``evaluate`` restores the caller's generator states, so an evaluation in the middle of a run does not change what
  the run draws afterwards.
- ``api/task.py`` ``build_all_requests`` shows a tqdm bar that no argument turns off: ``progress=False`` swaps the
  ``tqdm`` name in lm-eval's modules for a silent one for the duration of the call.
- ``tasks/_index.py`` ``TaskIndex.build`` skips task YAML files it cannot parse without a word (``log.debug``): a
  ``--task_path`` folder in which lm-eval finds no task is refused here instead of silently adding nothing.
- ``TaskManager()`` indexes all ~14,700 shipped task names (5-6 s on one CPU core): one index per set of task folders
  is kept for the process.
- A model passed in is taken as it is (``HFLM`` ignores ``dtype``/``device`` then); ``backend="causal"`` is given
  because a pruned checkpoint's ``model_type`` (``gaqprune_llama``) is in none of transformers' registries, which
  would only cost a warning (lm-eval falls back to causal anyway).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import math
import os
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gaqprune.errors import GaqpruneError

EVAL_EXTRA = 'pip install -e ".[eval]"'

# The preset every structured-pruning paper reports (LLM-Pruner Table 1, SliceGPT, ShortGPT), in the papers' order.
PRESETS: dict[str, tuple[str, ...]] = {
    "commonsense": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
}

# The shipped offline task (see ``wiki_next_items``).
WIKI_NEXT = "gaqprune_wiki_next"

# The metric papers report per task: acc where the choices are short labels or similar in length, acc_norm (per-byte
# normalised log-likelihood) for HellaSwag, ARC-challenge and OpenBookQA (LLM-Pruner, SliceGPT, Wanda follow lm-eval's
# own leaderboard convention). gaqprune_wiki_next: whole sentences of different lengths, as in HellaSwag, so acc_norm.
REPORTED: dict[str, str] = {
    "boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
    WIKI_NEXT: "acc_norm",
}

# ``datasets`` builders that read local files: a task on one of these needs no network.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "sql", "generator", "webdataset",
                  "imagefolder", "audiofolder", "videofolder", "pdffolder", "niftifolder"}

TRUE_VALUES = {"1", "on", "yes", "true"}  # how huggingface_hub reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE


@dataclass
class ZeroShotSettings:
    """Zero-shot task accuracy with lm-evaluation-harness (the ``[eval]`` extra)."""

    tasks: str | None = None
    """Comma-separated lm-eval task names or presets: commonsense (boolq, piqa, hellaswag, winogrande, arc_easy,
    arc_challenge, openbookqa), gaqprune_wiki_next (offline, from the embedded corpus), any lm-eval task, group or
    tag, or a task defined in --task_path. None: no task evaluation."""
    task_path: str | None = None
    """A folder of extra lm-eval task YAML files (and the data files they name): lm-eval's --include_path."""
    eval_limit: int | None = None
    """Evaluate only the first N documents of each task (lm-eval's --limit; for quick checks, not for reported numbers)."""
    # No batch-size field: ``evaluate`` takes the run's evaluation batch size (--data.eval_batch_size, 8 by default).
    # lm-eval's requests for these tasks are a context plus one choice, ~30-200 tokens, the size of the 128-token
    # perplexity windows that batch size is chosen for, so one setting serves both and there is one flag fewer.


def _names(tasks: str) -> list[str]:
    return [name.strip() for name in tasks.split(",")]


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise GaqpruneError(f"--tasks needs lm-evaluation-harness, which is not installed ({err}); install it with "
                            f"{EVAL_EXTRA} (lm-eval 0.4.13)") from None
    return lm_eval


def _yaml_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What the task index of ``folder`` depends on: every YAML file's path, size and modification time."""
    files = sorted(p for p in folder.glob("**/*.yaml") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=4)
def _cached_manager(paths: tuple[str, ...], signature: tuple):
    from lm_eval.tasks import TaskManager

    del signature  # part of the cache key only: an edited folder gets a fresh index
    return TaskManager(include_path=list(paths) or None)


def task_manager(include_paths: list[Path]):
    """lm-eval's ``TaskManager`` over its own tasks plus ``include_paths``, built once per process and set of folders."""
    paths = tuple(str(Path(p).resolve()) for p in include_paths)
    return _cached_manager(paths, tuple(_yaml_signature(Path(p)) for p in paths))


def _check_task_path(task_path: str) -> Path:
    """A readable folder holding at least one task YAML file that lm-eval can read."""
    path = Path(task_path).expanduser()
    if not path.exists():
        raise GaqpruneError(f"--task_path {task_path!r} does not exist; give a folder of lm-eval task YAML files")
    if not path.is_dir():
        raise GaqpruneError(f"--task_path {task_path!r} is a file, not a folder; give the folder that holds it")
    try:
        yamls = sorted(p for p in path.glob("**/*.yaml") if p.is_file())
        unreadable = [p for p in yamls if not os.access(p, os.R_OK)]
    except OSError as err:
        raise GaqpruneError(f"--task_path {task_path!r} cannot be read ({err.strerror})") from None
    if not os.access(path, os.R_OK | os.X_OK):
        raise GaqpruneError(f"--task_path {task_path!r} cannot be read (permission denied)")
    if not yamls:
        raise GaqpruneError(f"--task_path {task_path!r} holds no .yaml file; lm-eval reads task definitions from "
                            "*.yaml files in it (and its subfolders)")
    if unreadable:
        raise GaqpruneError(f"--task_path {task_path!r}: {unreadable[0]} cannot be read (permission denied)")
    from lm_eval.tasks._index import TaskIndex

    # lm-eval skips a YAML file it cannot parse without a word (tasks/_index.py, TaskIndex.build): say it here.
    if not TaskIndex.build([path.resolve()]):
        raise GaqpruneError(f"--task_path {task_path!r}: lm-eval finds no task in its {len(yamls)} .yaml file(s) "
                            "(each needs a 'task:' name, or 'group:' for a group, and must parse as YAML)")
    return path.resolve()


def _leaf_configs(manager, name: str, seen: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(task, config)`` of every task that ``name`` (a task, group or tag) runs, configs as lm-eval indexed them."""
    from lm_eval.tasks._index import Kind

    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return
    if entry.kind == Kind.TAG:
        for member in sorted(entry.tags):
            yield from _leaf_configs(manager, member, seen)
    elif entry.kind == Kind.GROUP:
        members = (entry.cfg or {}).get("task", [])
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                yield from _leaf_configs(manager, member, seen)
            elif isinstance(member, dict) and isinstance(member.get("task"), str):
                if member["task"] in manager.task_index:
                    yield from _leaf_configs(manager, member["task"], seen)
                else:
                    yield member["task"], member
    else:
        yield name, entry.cfg or {}


def _hf_hub_cache() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants are fixed at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(os.environ.get("HF_HOME", str(Path(xdg) / "huggingface"))).expanduser()


def _hf_datasets_cache() -> Path:
    return Path(os.environ.get("HF_DATASETS_CACHE", str(_hf_home() / "datasets"))).expanduser()


def dataset_cached(dataset_path: str) -> bool:
    """Whether a hub dataset has been downloaded before: its snapshot in huggingface_hub's cache
    (``datasets--owner--name/snapshots/*``) or its prepared copy in datasets' cache (``owner___name``). A partial
    download looks cached too; that is the price of not opening the dataset here."""
    snapshots = _hf_hub_cache() / f"datasets--{dataset_path.replace('/', '--')}" / "snapshots"
    prepared = _hf_datasets_cache() / dataset_path.replace("/", "___")
    return (snapshots.is_dir() and any(snapshots.iterdir())) or (prepared.is_dir() and any(prepared.iterdir()))


def _offline_flag() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in TRUE_VALUES:
            return var
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (``$HF_ENDPOINT``, default huggingface.co:443) opens."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_local_dataset(cfg: dict) -> bool:
    dataset_path = cfg.get("dataset_path")
    if not isinstance(dataset_path, str):
        return True  # a custom_dataset function or a Python task: nothing to check cheaply
    return dataset_path in LOCAL_BUILDERS or Path(dataset_path).expanduser().exists()


def _check_hub_datasets(manager, names: list[str]) -> None:
    """Refuse a task whose hub dataset is neither in the local cache nor reachable.

    Cheap by design: only folders are looked at (``dataset_cached``), and only when a dataset is not cached is the
    network asked, with one TCP connection to the hub (``hub_reachable``, once per call). With ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` set the network is not asked: an uncached dataset is refused."""
    reachable: bool | None = None
    for requested in names:
        for task, cfg in _leaf_configs(manager, requested):
            if _is_local_dataset(cfg) or dataset_cached(cfg["dataset_path"]):
                continue
            dataset = cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
            via = "" if task == requested else f" (in {requested!r})"
            if flag := _offline_flag():
                raise GaqpruneError(f"--tasks {task!r}{via} reads the hub dataset {dataset}, which is not in the local "
                                    f"cache ({_hf_hub_cache()}), and {flag} is set; download it once with the network "
                                    f"on, or use an offline task ({WIKI_NEXT}, or your own with --task_path)")
            if reachable is None:
                reachable = hub_reachable()
            if not reachable:
                raise GaqpruneError(f"--tasks {task!r}{via} reads the hub dataset {dataset}, which is not in the local "
                                    f"cache ({_hf_hub_cache()}), and the hub cannot be reached; download it once with the "
                                    f"network on, or use an offline task ({WIKI_NEXT}, or your own with --task_path)")


def check_settings(settings: ZeroShotSettings) -> list[str]:
    """Every value of ``settings`` checked, before any model is loaded; returns the task names lm-eval will be given
    (presets expanded, duplicates dropped, order kept), ``[]`` when ``tasks`` is None. Raises ``GaqpruneError`` in one
    line naming the bad value and what is accepted."""
    limit = settings.eval_limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GaqpruneError(f"--eval_limit {limit!r} must be a whole number of documents, at least 1 "
                            "(or left out for every document)")
    if settings.tasks is None:
        if settings.task_path is not None or limit is not None:
            flag = "--task_path" if settings.task_path is not None else "--eval_limit"
            raise GaqpruneError(f"{flag} is only used with --tasks; give --tasks NAME[,NAME...] (e.g. commonsense)")
        return []
    requested = _names(settings.tasks)
    if not all(requested):
        raise GaqpruneError(f"--tasks {settings.tasks!r} has an empty name; give comma-separated lm-eval task names "
                            f"or presets ({', '.join(PRESETS)}, {WIKI_NEXT})")
    names = list(dict.fromkeys(t for name in requested for t in PRESETS.get(name, (name,))))
    _import_lm_eval()
    folders = [_check_task_path(settings.task_path)] if settings.task_path is not None else []
    if WIKI_NEXT in names:
        folders.insert(0, wiki_next_task_dir())
    manager = task_manager(folders)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=4, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}; " if close else ""
            where = f" or in --task_path {settings.task_path!r}" if settings.task_path else ""
            raise GaqpruneError(f"--tasks {name!r} is not an lm-eval task, group or tag{where}; {hint}presets: "
                                f"{', '.join(PRESETS)}; offline: {WIKI_NEXT}; your own tasks: --task_path FOLDER "
                                "(`python -m lm_eval ls tasks` lists them all)")
    _check_hub_datasets(manager, names)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# The shipped task: which sentence comes next in an evaluation article?

WIKI_NEXT_VERSION = 1  # bump when the items change: the cached files are regenerated
WIKI_NEXT_SEED = 20240601
WIKI_NEXT_ITEMS = 300
WIKI_NEXT_PER_ARTICLE = 80  # so the two longest articles (Agassi, Atlas Shrugged) do not make most of the task
WIKI_NEXT_CHOICES = 4

# Abbreviations and initials after which a period does not end a sentence ("U.S. Army", "J. R. R. Tolkien").
_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|No|Nos|Vol|vs|etc|Inc|Co|Ltd|Gen|Col|Lt|Sgt|Capt|"
                           r"Rev|Prof|approx|ca|c|Mt|Ft|Jan|Feb|Mar|Apr|Aug|Sept|Sep|Oct|Nov|Dec|U\.S|U\.K|i\.e|e\.g|"
                           r"cf|al|pp|p|ed|eds|Ph\.D)|\.[A-Z])\.$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
# A clean prose sentence: capitalised, ends in . ! or ?, no table / template leftovers.
_CLEAN = re.compile(r"^[A-Z][^|\[\]{}=<>]*[a-z0-9)\"'][.!?]$")
# Leftovers of references glued onto prose ("...nickname "The Punisher".Jhabvala, Nick."), citations, links.
_DEBRIS = re.compile(r"[a-z\"')\]]\.[A-Z]|^Retrieved|\bISBN\b|https?:|\(;|\(,|\(\)|  ")


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: split after . ! ? followed by a capital or a quote, except after abbreviations."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(paragraph.strip()):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] += " " + piece
        elif piece:
            out.append(piece)
    return out


def clean_sentence(sentence: str) -> bool:
    """Whether a sentence is ordinary prose of 40-200 characters (what items are made of)."""
    return 40 <= len(sentence) <= 200 and bool(_CLEAN.match(sentence)) and not _DEBRIS.search(sentence)


def wiki_next_items(eval_articles: list[str], n_items: int = WIKI_NEXT_ITEMS, seed: int = WIKI_NEXT_SEED,
                    per_article: int = WIKI_NEXT_PER_ARTICLE) -> list[dict[str, Any]]:
    """The items of ``gaqprune_wiki_next``, a deterministic function of the articles and the seed.

    An item is a place in an article where one or two clean sentences (the context, at least 60 characters) are
    followed, in the same paragraph, by a clean sentence (the answer). The three wrong choices are clean sentences
    drawn from the *other* evaluation articles whose length is within 0.8-1.25x the answer's (0.5-2x if too few), so
    neither acc nor acc_norm can be won by preferring short or long sentences; the answer's position is drawn
    uniformly. Chance is 1/4. At most ``per_article`` items come from one article, then ``n_items`` are drawn from
    all of them and shuffled (``limit`` takes the first N documents: any prefix mixes articles).

    Only ``eval_articles`` are read: the calibration / training articles never appear in the task."""
    rng = random.Random(seed)
    paragraphs = [[split_sentences(line) for line in text.splitlines()] for text in eval_articles]
    pools = [[s for para in article for s in para if clean_sentence(s)] for article in paragraphs]
    places: list[tuple[int, str, str]] = []
    for index, article in enumerate(paragraphs):
        found = []
        for sentences in article:
            for i in range(1, len(sentences)):
                context = sentences[max(0, i - 2):i]
                if clean_sentence(sentences[i]) and all(map(clean_sentence, context)) and len(" ".join(context)) >= 60:
                    found.append((index, " ".join(context), sentences[i]))
        places += rng.sample(found, min(per_article, len(found)))
    if len(places) < n_items:
        raise GaqpruneError(f"the embedded corpus's evaluation articles hold {len(places)} usable places for "
                            f"{WIKI_NEXT}, fewer than its {n_items} items; reinstall gensim==4.4.0 (--no-deps)")
    places = rng.sample(places, n_items)
    items = []
    for number, (index, context, answer) in enumerate(places):
        others = [s for j, pool in enumerate(pools) if j != index for s in pool if s != answer]
        for low, high in ((0.8, 1.25), (0.5, 2.0), (0.0, math.inf)):
            similar = [s for s in dict.fromkeys(others) if low * len(answer) <= len(s) <= high * len(answer)]
            if len(similar) >= WIKI_NEXT_CHOICES - 1:
                break
        choices = rng.sample(similar, WIKI_NEXT_CHOICES - 1)
        label = rng.randrange(WIKI_NEXT_CHOICES)
        choices.insert(label, answer)
        items.append({"id": number, "article": index, "context": context, "choices": choices, "label": label})
    return items


def _wiki_next_yaml(jsonl: Path) -> str:
    """The lm-eval task definition: lm-eval's own multiple-choice machinery over the JSONL file (``datasets``'
    packaged ``json`` builder, which reads local files offline). The file's path must be absolute (lm-eval resolves
    ``data_files`` against the working directory, not the YAML's folder)."""
    return "\n".join([
        f"# {WIKI_NEXT} v{WIKI_NEXT_VERSION}: written by gaqprune.run.zeroshot from the embedded corpus's evaluation",
        "# articles (English Wikipedia, CC BY-SA 3.0). Which of four sentences comes next? Chance: 25 %.",
        f"task: {WIKI_NEXT}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(jsonl))}",
        # datasets' Arrow copy of the file stays next to it, in gaqprune's cache, not in ~/.cache/huggingface
        f"  cache_dir: {json.dumps(str(jsonl.parent / 'hf_datasets'))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {WIKI_NEXT_VERSION}.0",
        "",
    ])


def wiki_next_task_dir(cache_dir: Path | None = None) -> Path:
    """The folder holding ``gaqprune_wiki_next.jsonl`` and ``gaqprune_wiki_next.yaml`` (lm-eval's ``include_path``),
    generated on first use into ``cache_root()/tasks/gaqprune_wiki_next/`` and rewritten only when their content
    would differ (a new version, a moved cache). Same corpus, same bytes."""
    from gaqprune.atomic import write_text
    from gaqprune.data.corpus import embedded_articles
    from gaqprune.models.names import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / "tasks" / WIKI_NEXT
    jsonl, yaml = folder / f"{WIKI_NEXT}.jsonl", folder / f"{WIKI_NEXT}.yaml"
    items = wiki_next_items(embedded_articles(root)["eval"])
    data = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
    definition = _wiki_next_yaml(jsonl.resolve())
    try:
        for path, text in ((jsonl, data), (yaml, definition)):  # the data first: the YAML names it
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                write_text(path, text)
    except OSError as err:
        raise GaqpruneError(f"{WIKI_NEXT} cannot be written to {folder} ({err.strerror}); set GAQPRUNE_CACHE to a "
                            "writable folder") from None
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Running lm-eval on the model in hand


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) generator states after the block: ``simple_evaluate``
    re-seeds all three (lm_eval/evaluator.py)."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class _PassedModelNotice(logging.Filter):
    """Drops HFLM's two warnings about being handed a model object (models/huggingface.py, ``HFLM.__init__``): that
    is what ``evaluate`` means to do, and it never runs under accelerate or with ``parallelize``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(("`pretrained` model kwarg is not of type", "Passed an already-initialized model"))


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Without ``progress``, silence lm-eval's progress bars and datasets' ("Generating test split"). lm-eval's
    request-building bar (lm_eval/api/task.py, ``build_all_requests``) takes no ``disable`` argument, so the ``tqdm``
    name its modules use is swapped for a disabled one while the block runs.

    Always: lm-eval records the git commit of the working directory (evaluator.py, ``get_git_commit_hash`` runs
    ``git describe`` with its stderr left open), which printed "fatal: not a git repository" into every run outside a
    git checkout; the hash of the user's folder says nothing of the model, so it is not asked for."""
    from lm_eval import evaluator

    notice = _PassedModelNotice()
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(notice)
    git_hash, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, lambda: None
    try:
        if progress:
            yield
        else:
            with _no_progress_bars():
                yield
    finally:
        hf_logger.removeFilter(notice)
        evaluator.get_git_commit_hash = git_hash


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    import importlib

    import datasets
    from tqdm import tqdm

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    modules = [importlib.import_module(m) for m in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")]
    saved = [m.tqdm for m in modules]
    bars_were_on = datasets.is_progress_bar_enabled()
    for module in modules:
        module.tqdm = silent
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.tqdm = original
        if bars_were_on:
            datasets.enable_progress_bars()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _task_summary(task: str, metrics: dict[str, Any], n: int) -> dict[str, Any]:
    """One task's numbers from lm-eval's ``results[task]`` (keys ``"<metric>,<filter>"``): the unfiltered
    (``none``) ones by their metric name, others as ``<metric>_<filter>``; stderrs as ``<metric>_stderr``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if "," not in key or (number := _number(value)) is None:
            continue  # "alias", and stderrs lm-eval reports as "N/A"
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}_{filter_name}"] = number
    found = [m for m in out if not m.endswith("_stderr")]
    if not found:
        raise GaqpruneError(f"lm-eval returned no numeric metric for task {task!r} ({sorted(metrics)})")
    reported = REPORTED.get(task)
    if reported not in out:
        reported = "acc" if "acc" in out else found[0]
    out["reported"] = reported
    out["n"] = int(n)
    return out


def summarise(lm_eval_results: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """The part of ``simple_evaluate``'s output gaqprune keeps: per leaf task its metrics, the reported one and the
    number of documents; the unweighted mean of the reported metrics over the tasks (a group such as mmlu counts
    each of its subtasks once, unlike lm-eval's size-weighted group score); the limit and lm-eval's version."""
    import lm_eval

    n_samples = lm_eval_results.get("n-samples", {})
    results = lm_eval_results["results"]
    tasks = {task: _task_summary(task, results[task], n_samples[task]["effective"])
             for task in n_samples if task in results}
    average = sum(t[t["reported"]] for t in tasks.values()) / len(tasks) if tasks else None
    return {"tasks": tasks, "average": average, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", None) or _distribution_version("lm_eval")}


def _distribution_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def include_paths(settings: ZeroShotSettings, names: list[str]) -> list[Path]:
    """The task folders lm-eval indexes besides its own: the shipped task's (when asked for) and ``--task_path``."""
    folders = [wiki_next_task_dir()] if WIKI_NEXT in names else []
    if settings.task_path is not None:
        folders.append(Path(settings.task_path).expanduser().resolve())
    return folders


def _model_device(model):
    import torch

    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


def evaluate(model, tokenizer, settings: ZeroShotSettings, batch_size: int | str = 8, device: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``settings.tasks``, computed by ``lm_eval.simple_evaluate`` in this process.

    ``model``: any causal LM gaqprune handles (a dense HF model, a pruned checkpoint from ``load_pruned``, a peft
    model with LoRA adapters, which is evaluated with its adapters), evaluated on its own device and dtype (``device``
    moves it there for the evaluation and back afterwards); its train/eval mode and the global random generators are
    as before when this returns. ``batch_size``: requests per forward pass (an int, or lm-eval's ``"auto"``).

    Returns ``{"tasks": {task: {"acc", "acc_norm" (where lm-eval gives it), ..., "reported", "n"}}, "average",
    "limit", "lm_eval_version"}``, JSON-serialisable."""
    names = check_settings(settings)
    if not names:
        raise GaqpruneError("no task to evaluate: give --tasks NAME[,NAME...] (e.g. commonsense or gaqprune_wiki_next)")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1)):
        raise GaqpruneError(f"the task evaluation batch size {batch_size!r} must be a whole number, at least 1, or 'auto'")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_paths(settings, names))
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # lm-eval sets a pad token on the tokenizer it is given
    was_training = model.training
    original = _model_device(model)
    target = original if device is None else torch.device(device)
    if target != original:
        model.to(target)
    try:
        with _rng_preserved(), _quiet(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=settings.eval_limit, task_manager=manager,
                                          log_samples=False)
    finally:
        model.train(was_training)
        if target != original:
            model.to(original)
    if out is None:  # only off rank 0, which a model passed in never is
        raise GaqpruneError("lm-eval returned no results")
    return summarise(out, settings.eval_limit)


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table, one row per task: documents, acc, acc_norm, the reported metric; then the average."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}"

    lines = ["| task | n | acc | acc_norm | reported |", "|---|---:|---:|---:|---:|"]
    for task, metrics in results["tasks"].items():
        reported = metrics["reported"]
        extra = "" if reported in ("acc", "acc_norm") else f" ({reported})"
        lines.append(f"| {task} | {metrics['n']} | {cell(metrics.get('acc'))} | {cell(metrics.get('acc_norm'))} | "
                     f"{cell(metrics[reported])}{extra} |")
    lines.append(f"| average | | | | {cell(results.get('average'))} |")
    return "\n".join(lines)


def scalars(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Logger scalars: ``<prefix>/<task>/<metric>`` for every metric (stderrs included), ``<prefix>/<task>/reported``
    and ``<prefix>/average``."""
    out: dict[str, float] = {}
    for task, metrics in results["tasks"].items():
        for name, value in metrics.items():
            if name not in ("reported", "n"):
                out[f"{prefix}/{task}/{name}"] = float(value)
        out[f"{prefix}/{task}/reported"] = float(metrics[metrics["reported"]])
    if results.get("average") is not None:
        out[f"{prefix}/average"] = float(results["average"])
    return out
