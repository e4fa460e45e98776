"""Lightning callbacks that analyse and prune the model in ``setup``.

``setup`` runs before the strategy wraps the model (DDP/FSDP) and before ``configure_model``
attaches LoRA or the optimizer exists, so shapes may still change here. Rank 0 computes, the
result is broadcast, and every rank applies the identical surgery.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from gaqprune.atomic import write_json
from gaqprune.core.plan import apply_plan, layer_range
from gaqprune.run import stages as pipeline
from gaqprune.settings import ImportanceSettings, PruneSettings


class ProgressBar(TQDMProgressBar):
    """The fit's bar: tqdm like gaqprune's stage bars, so a log file (nohup, SLURM) gets the steps with ETA too, which
    Lightning's default Rich bar (picked whenever ``rich`` is installed) does not write there; without the
    logger's version number (``v_num``), which is no metric."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class LayerImportance(L.Callback):
    """Per-layer importance (removal / activation / block_influence), computed once and cached."""

    def __init__(self, settings: ImportanceSettings, prune_settings: PruneSettings, base_model: str, seed: int = 42,
                 out_dir: str | None = None):
        self.settings = settings
        self.prune_settings = prune_settings
        self.base_model = base_model
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir else None
        self.scores: dict[int, float] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.scores is not None or stage != "fit":
            return
        hf_model = pl_module.model
        start, end = layer_range(self.prune_settings, len(hf_model.model.layers))
        scores = None
        if trainer.is_global_zero:
            device = trainer.strategy.root_device
            hf_model.to(device)
            meta = pipeline.importance_meta(hf_model, self.settings, start, end, self.base_model,
                                            trainer.datamodule.source, self.seed)
            scores = pipeline.layer_importance_stage(hf_model, trainer.datamodule, self.settings, start, end,
                                                     self.out_dir, meta, device, pipeline.shows_progress(trainer))
        scores = trainer.strategy.broadcast(scores, src=0)
        self.scores = {int(k): float(v) for k, v in scores.items()}
        if trainer.is_global_zero:
            pipeline.log_per_layer(trainer.loggers, pipeline.IMPORTANCE_TAG, self.scores)


class GQAPrune(L.Callback):
    """Taylor-scored removal of GQA groups / MLP channels (and whole layers) at per-layer rates."""

    def __init__(self, settings: PruneSettings, importance: LayerImportance | None = None, seed: int = 42,
                 out_dir: str | None = None, save_model_of: str | None = None, save_gguf: str | None = None,
                 gguf_name: str | None = None):
        """``save_model_of``: save the pruned model to ``<out_dir>/model`` (before any training), recording this name
        as the dense model it came from; None: do not save it. ``save_gguf``: also write it as ``<out_dir>/model.gguf``
        of that weight type (``gguf_name``: the model's name in the file), as `gaqprune prune --save_gguf` does."""
        self.settings = settings
        self.importance = importance
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir else None
        self.save_model_of = save_model_of
        self.save_gguf = save_gguf
        self.gguf_name = gguf_name
        self.plan: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.plan is not None or stage != "fit":
            return
        if self.importance is not None and self.importance.scores is None:
            self.importance.setup(trainer, pl_module, stage)  # callback order must not matter
        hf_model = pl_module.model
        device = trainer.strategy.root_device
        hf_model.to(device)
        scores = self.importance.scores if self.importance is not None else None
        windows = pipeline.taylor_windows(trainer.datamodule, self.settings, self.seed, device)
        plan = pipeline.plan_stage(hf_model, scores, windows, self.settings, pipeline.shows_progress(trainer)) \
            if trainer.is_global_zero else None
        self.plan = trainer.strategy.broadcast(plan, src=0)
        pl_module.plan_digest = pipeline.plan_digest(self.plan)  # a resumed fit checks its checkpoint against it
        apply_plan(hf_model, self.plan, pipeline.compensation_windows(trainer.datamodule, self.settings, self.seed, device,
                                                                      windows), progress=pipeline.shows_progress(trainer))
        if trainer.is_global_zero and self.out_dir is not None:
            write_json(self.out_dir / pipeline.PLAN_FILE, self.plan)
            pipeline.plot_rates(scores or {}, self.plan, self.out_dir / "pruning_rates.png")
            if self.save_model_of is not None:
                from gaqprune.models.pruned import save_pretrained_model

                save_pretrained_model(hf_model, trainer.datamodule.tokenizer, self.out_dir / "model", overwrite=True,
                                      base_model=self.save_model_of)
            if self.save_gguf is not None:
                from gaqprune.models.gguf import save_gguf

                save_gguf(hf_model, trainer.datamodule.tokenizer, self.out_dir / "model.gguf", out_type=self.save_gguf,
                          overwrite=True, name=self.gguf_name, progress=pipeline.shows_progress(trainer))
        if trainer.is_global_zero:
            pipeline.log_per_layer(trainer.loggers, pipeline.RATE_TAG,
                                   {e["index"]: e["achieved_rate"] for e in self.plan["layers"]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
