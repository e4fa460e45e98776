"""A run folder, ``<output_dir>/<save_ckpt_log_name>/``: every file name in it, its checks, its lock and its clean-up.

Every file of a run is named here (``RunDir.PLAN``, ``RunDir.MODEL``, ...) and written through atomic writes by the
stages. A finished run (``metrics.json``, or a fine-tune's results) is never written into without ``--overwrite``;
an unfinished one (killed before ``metrics.json``) is resumed: its caches are reused where they match, the rest
rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from gaqprune.atomic import unwritable
from gaqprune.errors import GaqpruneError
from gaqprune.settings import RunSettings

log = logging.getLogger(__name__)


def launch_rank_is_zero() -> bool:
    """Whether this is the process that launched the run: every rank variable a launcher sets (torchrun, SLURM,
    Lightning's own DDP launcher, which sets only LOCAL_RANK and inherits the rest) is 0 or unset."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


class RunDir:
    """The folder of one run and the names of everything a run writes there."""

    IMPORTANCE = "layer_importance_config.json"  # the reusable layer-importance record
    IMPORTANCE_PLOT = "layer_importance.png"
    CONFIG = "config.yaml"  # the run's complete configuration (re-run it with --config)
    PLAN = "pruning_plan.json"
    RATES_PLOT = "pruning_rates.png"
    METRICS = "metrics.json"  # written last by `prune`: marks the run as finished
    MODEL = "model"
    GGUF = "model.gguf"
    # a fine-tune's Lightning checkpoints (LoRA weights + optimizer state): last.ckpt is what --ckpt_path last resumes
    CHECKPOINTS = "checkpoints"
    ADAPTER = "lora_adapter"
    FINETUNED = "model_finetuned"
    FINETUNED_GGUF = "model_finetuned.gguf"
    FIT_PLOT = "fit_curves.png"
    FIT_METRICS = "fit_metrics.json"
    # A finished run: `prune` writes metrics.json last; a fit (which writes none) leaves these.
    FIT_RESULTS = (FINETUNED, FINETUNED_GGUF, ADAPTER, FIT_PLOT, FIT_METRICS)
    FINISHED = (METRICS, *FIT_RESULTS)
    # What --overwrite removes before a new run writes anything (the layer-importance record stays: it is reused only
    # where its recorded settings match).
    RUN_FILES = (*FINISHED, MODEL, GGUF, CONFIG, PLAN, RATES_PLOT, CHECKPOINTS)

    _held: list = []  # the run-folder locks this process holds (released by release_all)

    def __init__(self, run: RunSettings):
        self.run = run
        self.path = Path(run.output_dir) / run.save_ckpt_log_name

    @classmethod
    def at(cls, folder: str | Path) -> RunDir:
        """The run folder at ``folder`` (``<output_dir>/<save_ckpt_log_name>``)."""
        folder = Path(folder)
        return cls(RunSettings(save_ckpt_log_name=folder.name, output_dir=str(folder.parent)))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def check(self, results: tuple[str, ...] = FINISHED) -> RunDir:
        """The folder, checked: a plain name, not a file, writable, and holding none of ``results`` (a finished run's)
        unless --overwrite; the leftovers of a killed write (never complete, never reused) are removed."""
        self.run.check()
        for where, what in ((Path(self.run.output_dir), "--output_dir"), (self.path, "--save_ckpt_log_name")):
            if where.exists() and not where.is_dir():
                raise GaqpruneError(f"{what}: {str(where)!r} is a file, not a folder; pick another name")
        found = [name for name in results if (self.path / name).exists()]
        if found and not self.run.overwrite:
            raise GaqpruneError(
                f"--save_ckpt_log_name {self.run.save_ckpt_log_name!r}: run folder {str(self.path)!r} already holds "
                f"results ({', '.join(found)}); pick another name or pass --overwrite true")
        refused = unwritable(self.path)
        if refused is not None:
            raise GaqpruneError(f"--output_dir: cannot write to {str(refused[0])!r} ({refused[1]}); give --output_dir a "
                                "folder you can write to")
        if self.path.is_dir():
            for stale in self.path.glob(".*.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        return self

    def hold(self):
        """Claim the folder for this process (the launching one; the ranks it starts write nothing there) until
        ``release_all`` or its exit: a second run of the same name at the same time (from another shell) would
        interleave its files with this one's and silently replace its results. Returns the held lock, or None."""
        from filelock import FileLock, Timeout

        if not launch_rank_is_zero():
            return None
        # in a per-user temp folder, keyed by the run folder's absolute path: a refused run leaves no trace in the
        # output folder (so this guards the runs of one machine and temp folder; a shared file system's locks are
        # unreliable)
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        lock = FileLock(Path(tempfile.gettempdir()) / f"gaqprune-locks-{user}"
                        / (hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:32] + ".lock"))
        try:
            Path(lock.lock_file).parent.mkdir(exist_ok=True)
            lock.acquire(timeout=0)
        except Timeout:
            raise GaqpruneError(f"--save_ckpt_log_name {self.run.save_ckpt_log_name!r}: run folder {str(self.path)!r} is "
                                "in use by another gaqprune run right now; wait for it or pick another name") from None
        except OSError as err:  # an unusable temp folder must not stop the run: it only loses this guard
            log.warning("note: running without the run-folder lock (%s)", err)
            return None
        RunDir._held.append(lock)
        return lock

    @staticmethod
    def release_all() -> None:
        """Release the run folders this process claimed (the CLI's end: a notebook's next run may use the same name)."""
        while RunDir._held:
            RunDir._held.pop().release()

    def last_checkpoint(self) -> Path | None:
        """The latest checkpoint of this run's fine-tune (``checkpoints/last.ckpt``), if one was written."""
        last = self.path / self.CHECKPOINTS / "last.ckpt"
        return last if last.is_file() else None

    def check_unfinished_fit(self, resuming: bool, how: str = "with --ckpt_path last") -> None:
        """A fine-tune that was interrupted left ``checkpoints/last.ckpt``: starting over (or a run without a
        fine-tune) would replace or remove it, so it must be asked for (--overwrite true) or resumed (``how``)."""
        last = self.last_checkpoint()
        if last is not None and not resuming and not self.run.overwrite:
            raise GaqpruneError(f"--save_ckpt_log_name {self.run.save_ckpt_log_name!r}: {str(last)!r} is the checkpoint "
                                f"of an unfinished fine-tune; resume it {how}, or start over with --overwrite true")

    def clear(self, results: tuple[str, ...] = RUN_FILES) -> None:
        """Remove the previous run's ``results`` before the new run writes anything, so the folder never mixes two
        runs (the importance record stays: it is reused only where its recorded settings match). With --overwrite
        that is a finished run's; without it ``check`` has refused a finished one, so what is there is an unfinished
        run's leftovers (a model saved before a Ctrl-C, which this run may not rewrite), except its fine-tune's
        checkpoints: ``check_unfinished_fit`` let the run start only to resume them."""
        if not self.path.is_dir():
            return
        if not self.run.overwrite:
            results = tuple(name for name in results if name != self.CHECKPOINTS)
        for name in results:  # every rank of a DDP fit runs this: tolerate a file another rank removed first
            old = self.path / name
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
