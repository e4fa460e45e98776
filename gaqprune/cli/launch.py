"""How the command's processes are launched: Lightning's trainer flags, strategies and launchers judged before the
model is loaded (a mistake costs no model load), and the collective timeout of a fit that prunes."""

from __future__ import annotations

import inspect
import logging
import os
from datetime import timedelta

import lightning as L

from gaqprune.errors import GaqpruneError
from gaqprune.train.job import LAUNCH_ENV

# In `fit --prune` the other ranks wait in a broadcast while rank 0 analyses and prunes (minutes on a GPU, longer for
# big models on the CPU or with offloaded weights), in `prune --finetune` rank 0 waits while they load the model:
# torch's default of 30 minutes would end such a run with a timeout, so a fit that prunes waits this long instead.
PRUNING_COLLECTIVE_TIMEOUT = timedelta(hours=4)


def _configures(callbacks, base: type) -> bool:
    """Whether --trainer.callbacks (or a config file) brings its own ``base`` callback (or a subclass): instantiated
    callbacks, or their class_path before instantiation."""
    import importlib

    for callback in callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []:
        if isinstance(callback, base):
            return True
        module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or "lightning.pytorch.callbacks"), name) if name else None
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            return True
    return False


def _configures_checkpoints(callbacks) -> bool:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return _configures(callbacks, ModelCheckpoint)


def _lightning_refusals() -> tuple[type[Exception], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    # TypeError: --trainer.devices abc; ImportError: a strategy whose package is missing (xla)
    return MisconfigurationException, ValueError, TypeError, ImportError


LIGHTNING_REFUSALS = _lightning_refusals()


def check_trainer_flags(trainer_cfg, trains: bool, prune_finetune: bool = False) -> None:
    """Lightning judges --trainer.accelerator/strategy/devices/num_nodes/precision only when it builds the Trainer,
    after the model is loaded (minutes for an 8B model): build a bare Trainer from them first, so a mistake costs
    no model load."""
    for flag in ("max_steps", "max_epochs"):
        if trains and trainer_cfg.get(flag) == 0:  # exported the untrained model as a fine-tune's result
            raise GaqpruneError(f"--trainer.{flag} 0 trains nothing; give at least 1, or leave it unset "
                                "(--finetune_epochs then sets the length)")
    args = {k: trainer_cfg.get(k) for k in ("accelerator", "strategy", "devices", "num_nodes", "precision")}
    args = {k: v for k, v in args.items() if v is not None}
    if trainer_cfg.get("plugins") or not all(isinstance(v, (str, int, list)) for v in args.values()):
        return  # plugins (a cluster environment), or a strategy/accelerator object: judged by the real Trainer
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the bare Trainer's "GPU available" lines would print twice
    try:
        trainer = L.Trainer(**args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
    except LIGHTNING_REFUSALS as err:
        raise GaqpruneError(f"--trainer settings rejected by Lightning: {err}") from None
    finally:
        quiet.setLevel(level)
    check_launch(trainer, trains, args.get("strategy"), prune_finetune)


def check_launch(trainer: L.Trainer, trains: bool, strategy: object = None, prune_finetune: bool = False) -> None:
    """Refuse process launches that would lose the work or hang, before anything is computed or written."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if trains and isinstance(launcher, _MultiProcessingLauncher):
        # the workers train their own copies; Lightning hands back only plain weights (not the LoRA modules, not a
        # pruned shape), so the export would silently be the untrained model
        raise GaqpruneError(
            f"--trainer.strategy {strategy}: its processes are started by {launcher._start_method!r} (as with "
            "ddp_spawn, ddp_fork, ddp_notebook) and keep a fine-tune's weights to themselves, so nothing trained "
            "could be exported; use --trainer.strategy ddp or fsdp (one process per device, started as a script)")
    environment = getattr(trainer.strategy, "cluster_environment", None)
    # the ranks Lightning's own launcher starts for the fine-tune (their LOCAL_RANK set) are not external ones
    external = environment is not None and environment.creates_processes_externally and LAUNCH_ENV not in os.environ
    if prune_finetune and trainer.world_size > 1 and (external or trainer.num_nodes > 1):
        # rank 0 prunes before the fit and the ranks Lightning starts then read its plan; ranks started beside it
        # (torchrun, SLURM, other nodes) would have no plan to read
        raise GaqpruneError(
            "`prune --finetune` on processes started by torchrun, SLURM or on several nodes: run `gaqprune fit --prune "
            "true` with the same flags instead (it prunes on rank 0 inside the fit and shares the plan with every "
            "rank), or `prune --save_model true` first and then `fit --base_model <run>/model` under your launcher")
    if trainer.num_nodes > 1 and isinstance(environment, LightningEnvironment) and "NODE_RANK" not in os.environ:
        raise GaqpruneError(
            f"--trainer.num_nodes {trainer.num_nodes}: start gaqprune on every node with NODE_RANK (0..."
            f"{trainer.num_nodes - 1}), MASTER_ADDR and MASTER_PORT set, or under SLURM or torchrun; NODE_RANK is "
            "not set here, and the processes would wait for nodes that never come")


def with_collective_timeout(strategy):
    """``--trainer.strategy`` given by name (``ddp``, ``fsdp``, ...) as the same strategy with
    ``PRUNING_COLLECTIVE_TIMEOUT``; an object, a class path or a strategy without a timeout stays as it is."""
    if not isinstance(strategy, str):
        return strategy
    from lightning.pytorch.strategies import StrategyRegistry

    entry = dict.get(StrategyRegistry, strategy)  # its registration (class, init_params); its own get() builds one
    if entry is None or "timeout" not in inspect.signature(entry["strategy"].__init__).parameters:
        return strategy
    return entry["strategy"](**{**entry["init_params"], "timeout": PRUNING_COLLECTIVE_TIMEOUT})
