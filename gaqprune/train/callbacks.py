"""Lightning callbacks that analyse and prune the model in ``setup``.

``setup`` runs before the strategy wraps the model (DDP/FSDP) and before ``configure_model``
attaches LoRA or the optimizer exists, so shapes may still change here. Rank 0 computes, the
result is broadcast (``strategy.broadcast``), and every rank applies the identical surgery: in `fit --prune`
(rank 0 analyses inside the fit) and in `prune --finetune` (rank 0 pruned before the fit began) alike.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from gaqprune.core.plan import apply_plan, plan_digest
from gaqprune.run import report, stages
from gaqprune.run.rundir import RunDir
from gaqprune.settings import ImportanceSettings, PruneSettings


def shows_progress(trainer: L.Trainer) -> bool:
    """Whether this process shows gaqprune's stage bars: rank 0, unless ``--trainer.enable_progress_bar false``."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None


class ProgressBar(TQDMProgressBar):
    """The fit's bar: tqdm like gaqprune's stage bars, so a log file (nohup, SLURM) gets the steps with ETA too, which
    Lightning's default Rich bar (picked whenever ``rich`` is installed) does not write there; without the
    logger's version number (``v_num``), which is no metric."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class LayerImportance(L.Callback):
    """Per-layer importance (removal / activation / block_influence), computed once on rank 0 and broadcast."""

    def __init__(self, settings: ImportanceSettings, prune_settings: PruneSettings, base_model: str, seed: int = 42,
                 out_dir: str | None = None):
        self.settings = settings
        self.prune_settings = prune_settings
        self.base_model = base_model
        self.seed = seed
        self.run_dir = RunDir.at(out_dir) if out_dir else None
        self.scores: dict[int, float] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.scores is not None or stage != "fit":
            return
        hf_model = pl_module.model
        start, end = self.prune_settings.layer_range(len(hf_model.model.layers))
        scores = None
        if trainer.is_global_zero:
            device = trainer.strategy.root_device
            hf_model.to(device)
            meta = stages.importance_meta(hf_model, self.settings, start, end, self.base_model,
                                          trainer.datamodule.source, self.seed)
            scores = stages.layer_importance_stage(hf_model, trainer.datamodule, self.settings, start, end,
                                                   self.run_dir, meta, device, shows_progress(trainer))
        scores = trainer.strategy.broadcast(scores, src=0)
        self.scores = {int(k): float(v) for k, v in scores.items()}
        if trainer.is_global_zero:
            report.log_per_layer(trainer.loggers, report.IMPORTANCE_TAG, self.scores)


class GQAPrune(L.Callback):
    """Taylor-scored removal of GQA groups / MLP channels (and whole layers) at per-layer rates: rank 0 plans and
    prunes, every other rank receives the plan and applies it.

    ``pruned_on_rank_zero``: rank 0 pruned the model before this fit (`prune --finetune`) and holds its ``plan``; in
    ``setup`` the other ranks, which Lightning started when the fit began, receive that plan."""

    def __init__(self, settings: PruneSettings, importance: LayerImportance | None = None, seed: int = 42,
                 out_dir: str | None = None, save_model_of: str | None = None, save_gguf: str | None = None,
                 gguf_name: str | None = None, plan: dict | None = None, pruned_on_rank_zero: bool = False):
        """``save_model_of``: save the pruned model to ``<out_dir>/model`` (before any training), recording this name
        as the dense model it came from; None: do not save it. ``save_gguf``: also write it as ``<out_dir>/model.gguf``
        of that weight type (``gguf_name``: the model's name in the file), as `gaqprune prune --save_gguf` does."""
        self.settings, self.importance, self.seed = settings, importance, seed
        self.run_dir = RunDir.at(out_dir) if out_dir else None
        self.outputs = {"save_model_of": save_model_of, "save_gguf": save_gguf, "gguf_name": gguf_name}  # write_pruned's
        self.plan, self.pruned_on_rank_zero = plan, pruned_on_rank_zero
        self._done = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._done or stage != "fit":
            return
        hf_model = pl_module.model
        device = trainer.strategy.root_device
        hf_model.to(device)
        progress = shows_progress(trainer)
        if not self.pruned_on_rank_zero:
            if self.importance is not None and self.importance.scores is None:
                self.importance.setup(trainer, pl_module, stage)  # callback order must not matter (every rank: a broadcast)
            if trainer.is_global_zero:
                scores = self.importance.scores if self.importance is not None else None  # None: uniform rates
                scores, self.plan = stages.prune_model(hf_model, trainer.datamodule, None, self.settings, self.seed, {},
                                                       device, progress, scores=scores)
                if self.run_dir is not None:
                    stages.write_pruned(hf_model, trainer.datamodule.tokenizer, self.run_dir, self.plan, scores,
                                        progress=progress, **self.outputs)
                report.log_plan(trainer.loggers, self.plan)
        self.plan = trainer.strategy.broadcast(self.plan, src=0)  # rank 0 has pruned: the others cut their copy to it
        if not trainer.is_global_zero:
            taylor = stages.taylor_windows(trainer.datamodule, self.settings, self.seed, device)
            apply_plan(hf_model, self.plan, stages.compensation_windows(trainer.datamodule, self.settings, self.seed,
                                                                        device, taylor), progress=progress)
        pl_module.plan_digest = plan_digest(self.plan)  # a resumed fit checks its checkpoint against it
        self._done = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
