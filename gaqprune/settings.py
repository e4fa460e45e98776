"""Typed settings of each pipeline stage and of a run as a whole. The CLI exposes every field as a flag of the same name
(``--importance_samples``, ``--pruning_ratio``, ...), so names follow the parameter guide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ImportanceSettings:
    """Stage 1: how important each whole decoder layer is."""

    importance_samples: int = 50
    """Calibration windows for the layer-importance analysis (guide: quick 10-20, standard 50, precise 128)."""
    importance_method: Literal["removal", "activation", "block_influence"] = "removal"
    """removal = PPL(layer skipped) - PPL(dense); activation = mean |output - input|; block_influence = 1 - cos(in, out)."""
    importance_seq_len: int = 128
    """Tokens per importance window."""
    skip_importance_analysis: bool = False
    """Reuse --importance_config instead of running the analysis."""
    importance_config: str | None = None
    """Path of a layer_importance_config.json to reuse (with --skip_importance_analysis)."""


@dataclass
class PruneSettings:
    """Stage 2: per-layer rates, Taylor scores of GQA groups / MLP channels, and surgery."""

    pruning_ratio: float = 0.25
    """Fraction of the prunable parameters (attention + MLP weights of the selected layers) to remove."""
    pruning_strategy: Literal["inverse", "proportional", "uniform"] = "inverse"
    """inverse: important layers pruned less; proportional: pruned more; uniform: same rate everywhere."""
    alpha: float = 1.0
    """How strongly rates differ between layers (0 = uniform; 0.5 mild, 1 standard, 2 strong)."""
    min_pruning_rate: float = 0.15
    """Lower bound on each selected (width-pruned) layer's rate."""
    max_pruning_rate: float = 0.5
    """Upper bound on each selected (width-pruned) layer's rate."""
    layer_start: int | None = None
    """First layer to prune. Default (None): skip the first ~10 % of layers (3 of 30, 3 of 32), which are the
    most important ones by removal importance. Negative values count from the end."""
    layer_end: int | None = None
    """One past the last layer to prune. Default (None): stop before the last ~7 % of layers (28 of 30, 30 of 32).
    Negative values count from the end (-2 = all but the last two); ``--layer_start 0 --layer_end <n>`` = all layers."""
    num_examples: int = 10
    """Calibration windows for the Taylor scores (guide: 5-10 quick, 10-20 standard, 32-64 precise)."""
    max_seq_len: int = 64
    """Tokens per Taylor window (guide: 64-128)."""
    unit_split: Literal["per_param", "same_rate", "mlp_only"] = "per_param"
    """How a layer's rate is split between GQA groups and MLP channels. per_param: rank all the layer's units
    (groups and channels) by Taylor score per parameter and remove the cheapest until the rate is met;
    same_rate: LLM-Pruner's split, the same rate for attention groups and MLP channels (channels absorb the
    rounding of the coarse group step); mlp_only: MLP channels only. Measured on the embedded model (3 KV heads) at
    20 % of decoder params, no compensation, 80 eval windows, 10 x 64 calibration tokens: per_param with the
    default allocation 72.6, uniform mlp_only 75.1 (per_param removed a group in only 6 of the 25 layers there,
    where the group's score per parameter was below the cheapest channels'), so it is the default."""
    whole_layer_rate: float | None = None
    """Depth + width in one budget: a layer whose (unclipped) allocated rate reaches this value is removed whole
    and the rest of the budget is spread over the other layers. None: never remove whole layers. Measured at 20 % on
    the embedded model: 0.6 removed no layer (the default bounds keep every rate well below it), so it is off."""
    compensation: Literal["residual", "lstsq", "none"] = "residual"
    """After pruning a layer, refit the weights that read the pruned units (o_proj, down_proj) by ridge-regularised
    least squares on calibration activations, layer by layer (keeps the bias-free Llama layout; deterministic for
    fixed windows and hardware). residual: toward the dense model's residual stream, so each refit also undoes the
    drift earlier pruned layers left (needs the dense stream alongside: one extra forward of each pruned layer);
    lstsq: toward each layer's own dense output on the pruned stream; none: plain removal. Measured on the embedded
    model, all 298 eval windows, the same plan for each: 64 x 128 calibration, 20 % / 30 %: none 61.63 / 106.53,
    lstsq 51.87 / 73.70, residual 50.14 / 67.06; CLI defaults (10 x 64 Taylor, 64 x 128 refit) at 20 %: lstsq 55.33,
    residual 53.51."""
    compensation_samples: int | None = 64
    """Calibration windows (of --compensation_seq_len tokens) for the least-squares compensation. It needs forward
    passes only (no backward), so many more windows than the Taylor ones cost little, and the refit needs them: a
    Gram matrix over 640 tokens cannot pin down 1,536 input features. None: refit on the Taylor windows
    (--num_examples x --max_seq_len). Measured on the embedded model at 20 % with 10 x 64 Taylor windows, all 298
    eval windows: refit on those 10 x 64 -> PPL 60.73, on 64 x 128 -> 55.38, on 128 x 128 -> 54.62."""
    compensation_seq_len: int = 128
    """Tokens per compensation window (at most the model's context)."""
    compensation_ridge: float = 1.0
    """Ridge strength of the compensation (relative to the mean diagonal of the kept activations' Gram matrix),
    pulling the refit toward the original weights. Measured on the embedded model at 20 %, 64 x 128 calibration
    tokens, 80 eval windows: 0.01 -> PPL 62.3, 0.1 -> 60.4, 1.0 -> 59.9 (plain removal 71.7). Values below 1e-6
    (0 included) act as 1e-6: with fewer calibration tokens than kept inputs, plain least squares has no unique
    solution."""
    taylor_batch_size: int = 4
    """Windows per micro-batch of the Taylor backward pass (all micro-batches accumulate into one gradient)."""
    channel_multiple: int | None = None
    """Keep each layer's MLP channel count a multiple of this, so the pruned GEMMs stay aligned for GPU tensor
    cores (bf16 needs multiples of 8 elements; odd sizes fall back to kernels several times slower, which made an
    unaligned pruned 8B model 2x SLOWER than the dense one on an H200). None: 64 for MLPs of 8192+ channels,
    8 for 512+, 1 below (tiny test models); 1 disables alignment."""


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
