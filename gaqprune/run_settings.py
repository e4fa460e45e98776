"""Settings of a run as a whole: where results go, evaluation, and the single-command fine-tune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RunSettings:
    """Where results go and what a `gaqprune prune` run does besides pruning."""

    save_ckpt_log_name: str = "gaqprune_run"
    """Run folder name: results land in <output_dir>/<save_ckpt_log_name>/."""
    output_dir: str = "prune_log"
    """Parent folder of run folders."""
    save_model: bool = False
    """Save the pruned model to <run folder>/model (safetensors + tokenizer + config)."""
    save_gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = None
    """Also write the model for llama.cpp (and the runtimes built on it) as <run folder>/model.gguf (and
    model_finetuned.gguf after a fine-tune) with these weight types; per-layer shapes use llama.cpp's 'deci'
    architecture. None: no GGUF."""
    test_after_prune: bool = False
    """Evaluate perplexity before and after pruning on the evaluation split."""
    overwrite: bool = False
    """Replace an existing complete run folder of the same name (otherwise refused)."""
    seed: int = 42
    """Seed for sampling calibration windows (same seed + model + data = byte-identical plan)."""


@dataclass
class FinetuneSettings:
    """Single-command workflow: `gaqprune prune ... --finetune true` recovers quality with LoRA right after pruning."""

    finetune: bool = False
    """Fine-tune the pruned model right after pruning (the guide's single-command workflow)."""
    finetune_method: Literal["lora", "full"] = "lora"
    """lora: train low-rank adapters only (merged into the exported model); full: train every weight."""
    finetune_samples: int = 1000
    """Training windows (of --data.max_seq_len tokens) drawn from the calibration/training text."""
    finetune_epochs: int = 3
    """Epochs over the fine-tune windows."""
    distill_weight: float = 0.0
    """Knowledge distillation from the dense model during the fine-tune: loss = (1 - w) * next-token NLL
    + w * T^2 * KL(teacher || student), per predicted token. 0 (default) = plain language-model loss; in [0, 1]."""
    distill_temperature: float = 1.0
    """Softmax temperature T of the distillation term (> 0)."""
    teacher_model: str | None = None
    """Teacher for --distill_weight > 0 (any --base_model form). Default: the dense model the pruned one came from
    (--base_model itself when pruning in the same run; the recorded source model of a saved pruned checkpoint)."""
