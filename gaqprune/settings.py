"""Typed settings of each pipeline stage and of a run as a whole, and the checks of their values.

The CLI exposes every field as a flag of the same name (``--importance_samples``, ``--pruning_ratio``, ...), so names
follow the parameter guide. Each dataclass checks its own values (``check``): one place and one message per rule,
used alike by the command line, the Python API and the Lightning callbacks, before any model is loaded."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gaqprune.errors import GaqpruneError


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

    def check(self, context: int | None = None) -> None:
        """Every layer-importance value (``context``: the model's, if known); a reused record must be a readable file."""
        if self.importance_samples < 1:
            raise GaqpruneError(f"--importance_samples {self.importance_samples} must be at least 1")
        if self.importance_method not in IMPORTANCE_METHODS:
            raise GaqpruneError(f"--importance_method {self.importance_method!r} is not supported; use one of "
                                f"{', '.join(IMPORTANCE_METHODS)}")
        if self.importance_seq_len < 2:
            raise GaqpruneError(f"--importance_seq_len {self.importance_seq_len} must be at least 2 tokens")
        check_context("--importance_seq_len", self.importance_seq_len, context)
        if not self.skip_importance_analysis:
            if self.importance_config:
                raise GaqpruneError(f"--importance_config {self.importance_config!r} is only read with "
                                    "--skip_importance_analysis true")
            return
        if not self.importance_config:
            raise GaqpruneError("--skip_importance_analysis true needs --importance_config PATH (a "
                                "layer_importance_config.json)")
        path = Path(self.importance_config)
        if path.is_dir():
            raise GaqpruneError(f"--importance_config {self.importance_config!r} is a folder; give the "
                                "layer_importance_config.json file in it")
        if not path.is_file():
            raise GaqpruneError(f"--importance_config {self.importance_config!r}: file not found")
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise GaqpruneError(f"--importance_config {self.importance_config!r} is not valid JSON ({err})") from None


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
    allocation: Literal["search", "fixed"] = "search"
    """How the budget is split between layers. fixed: the rates of --pruning_strategy / --alpha within
    [--min_pruning_rate, --max_pruning_rate] (and --whole_layer_rate), as the parameter guide describes; search:
    depth + width in one budget, the number of contiguous blocks removed whole (the span whose residual stream changes
    least, folded into the block before it by the residual refit) chosen by the pruned model's loss on the refit
    windows after the full surgery and refit, the rest spread by --pruning_strategy / --alpha (the guide's rates seed
    the search; a candidate with no block removed is the fixed allocation). Costs one scored candidate (the time of
    the surgery and refit) per depth tried, about 4-7. Measured on the embedded model (128 x 128 Taylor, 64 x 128
    refit windows; window-128 perplexity, Wikipedia evaluation split / State of the Union speeches): at 20 % of the
    decoder fixed 50.85 / 49.06, search 49.15 / 46.94 (3 blocks); at 30 % fixed 69.68 / 68.31, search 67.30 / 58.33
    (6 blocks); ``benchmarks/lever_depth.py``, ``benchmarks/quality.py``."""
    whole_layer_rate: float | None = None
    """With --allocation fixed: depth + width in one budget, a layer whose (unclipped) allocated rate reaches this
    value is removed whole and the rest of the budget is spread over the other layers. None: never remove whole
    layers. Measured at 20 % on the embedded model: 0.6 removed no layer (the default bounds keep every rate well
    below it), so it is off."""
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
    (--num_examples x --max_seq_len); the refit also reuses them when they hold more tokens than
    --compensation_samples x --compensation_seq_len (``refits_on_taylor_windows``): more refit tokens fit better.
    Measured on the embedded model at 20 % with 10 x 64 Taylor windows, all 298 eval windows: refit on those 10 x 64
    -> PPL 60.73, on 64 x 128 -> 55.38, on 128 x 128 -> 54.62; at 40 % with 128 x 128 Taylor windows (wiki / State of
    the Union): refit on 64 x 128 other windows 98.49 / 84.73, on the 128 x 128 Taylor windows 94.73 / 81.69."""
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

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """``--layer_start`` / ``--layer_end`` as ``[start, end)`` (None: skip the edge layers, see the fields)."""
        return layer_span(self.layer_start, self.layer_end, num_layers, round(EDGE_START_FRACTION * num_layers),
                          num_layers - round(EDGE_END_FRACTION * num_layers))

    def refits_on_taylor_windows(self) -> bool:
        """Whether the compensation refits on the Taylor windows rather than on --compensation_samples windows of its
        own: asked to (None), or they are more tokens (the refit gains from every token it sees)."""
        return self.compensation_samples is None or (
            self.num_examples * self.max_seq_len > self.compensation_samples * self.compensation_seq_len)

    def check(self, num_layers: int, mlp_channels: int | None = None, context: int | None = None) -> tuple[int, int]:
        """Every pruning value against the model's shape (``mlp_channels``: its MLP width, ``context``: its
        context, if known), without touching the model; returns the resolved layer range."""
        if self.allocation not in ALLOCATIONS:
            raise GaqpruneError(f"--allocation {self.allocation!r} is invalid; use one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "search" and self.whole_layer_rate is not None:
            raise GaqpruneError(f"--whole_layer_rate {self.whole_layer_rate} applies to --allocation fixed; --allocation "
                                "search chooses the layers removed whole itself")
        check_ratio_bounds(self.pruning_ratio, self.min_pruning_rate, self.max_pruning_rate,
                           self.whole_layer_rate is not None or self.allocation == "search")
        if self.pruning_strategy not in STRATEGIES:
            raise GaqpruneError(f"--pruning_strategy {self.pruning_strategy!r} is invalid; use one of "
                                f"{', '.join(STRATEGIES)}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise GaqpruneError(f"--alpha {self.alpha} is invalid; give a number >= 0 (0 = uniform, 1 = standard)")
        if self.whole_layer_rate is not None and not 0.0 < self.whole_layer_rate <= 1.0:
            # above 1 it reads as "never", yet a ratio above the maximum rate still removed whole layers (their
            # unclipped rates are then unbounded)
            raise GaqpruneError(f"--whole_layer_rate {self.whole_layer_rate} is invalid; give a rate in (0, 1], or "
                                "None to never remove whole layers")
        if self.num_examples < 1:
            raise GaqpruneError(f"--num_examples {self.num_examples} is invalid; give at least 1 calibration window")
        if self.max_seq_len < 2:
            raise GaqpruneError(f"--max_seq_len {self.max_seq_len} is invalid; give at least 2 tokens (guide: 64-128)")
        if self.unit_split not in SPLITS:
            raise GaqpruneError(f"--unit_split {self.unit_split!r} is invalid; use one of {', '.join(SPLITS)}")
        if self.compensation not in COMPENSATIONS:
            raise GaqpruneError(f"--compensation {self.compensation!r} is invalid; use one of {', '.join(COMPENSATIONS)}")
        if self.compensation_samples is not None and self.compensation_samples < 1:
            raise GaqpruneError(f"--compensation_samples {self.compensation_samples} is invalid; give at least 1 "
                                "window, or None to refit on the Taylor windows")
        if self.compensation_seq_len < 2:
            raise GaqpruneError(f"--compensation_seq_len {self.compensation_seq_len} is invalid; give at least 2 tokens")
        if not (self.compensation_ridge >= 0 and math.isfinite(self.compensation_ridge)):
            raise GaqpruneError(f"--compensation_ridge {self.compensation_ridge} is invalid; give a number >= 0, "
                                "e.g. 1.0")
        if self.channel_multiple is not None and self.channel_multiple < 1:
            raise GaqpruneError(f"--channel_multiple {self.channel_multiple} is invalid; give a count >= 1 (1 = no "
                                "alignment) or None")
        if self.channel_multiple is not None and mlp_channels and self.channel_multiple >= mlp_channels:
            raise GaqpruneError(f"--channel_multiple {self.channel_multiple} leaves no MLP channel prunable (the MLP "
                                f"has {mlp_channels}); give a multiple below {mlp_channels}, e.g. 64, or 1 for no "
                                "alignment")
        if self.taylor_batch_size < 1:
            raise GaqpruneError(f"--taylor_batch_size {self.taylor_batch_size} is invalid; give at least 1")
        for flag, value in (("--max_seq_len", self.max_seq_len), ("--compensation_seq_len", self.compensation_seq_len)):
            check_context(flag, value, context)
        return self.layer_range(num_layers)


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

    def check(self) -> None:
        """The run folder's name (a plain folder name) and the seed."""
        name = self.save_ckpt_log_name
        if not name or name in (".", "..") or Path(name).name != name:
            raise GaqpruneError(f"--save_ckpt_log_name {name!r} is invalid; give a plain folder name (no '/', not '.' "
                                "or '..')")
        check_seed(self.seed)


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

    def check(self) -> None:
        """The fine-tune's own values (the LoRA ones are ``--model.*``: ``LitCausalLM.check_args``)."""
        if self.finetune_samples < 1:
            raise GaqpruneError(f"--finetune_samples {self.finetune_samples} must be at least 1")
        if self.finetune_epochs < 1:
            raise GaqpruneError(f"--finetune_epochs {self.finetune_epochs} must be at least 1")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise GaqpruneError(f"--distill_weight {self.distill_weight} must be in [0, 1] (0 = no distillation)")
        if not self.distill_temperature > 0:
            raise GaqpruneError(f"--distill_temperature {self.distill_temperature} must be > 0")
        if self.teacher_model and self.distill_weight == 0:
            raise GaqpruneError(f"--teacher_model {self.teacher_model!r} is only used with --distill_weight > 0")


# ----------------------------------------------------------------------------------------------- the rules
# Each rule is written once, here, with its one message; the command line, the Python API and the callbacks call
# these methods before any model is loaded or any work is done.

STRATEGIES = ("inverse", "proportional", "uniform")
SPLITS = ("per_param", "same_rate", "mlp_only")
ALLOCATIONS = ("search", "fixed")
COMPENSATIONS = ("residual", "lstsq", "none")
IMPORTANCE_METHODS = ("removal", "activation", "block_influence")
# Default layer range (None flags): skip the most important edge layers, like LLM-Pruner's 4..30 of 32.
EDGE_START_FRACTION = 0.1
EDGE_END_FRACTION = 0.07


def check_context(flag: str, value: int, context: int | None) -> None:
    """A window of ``value`` tokens (``flag``) must fit the model's context (``max_position_embeddings``)."""
    if context and value > context:
        raise GaqpruneError(f"{flag} {value} exceeds the model's context of {context} tokens")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise GaqpruneError(f"--seed {seed} is invalid; give an integer in [0, 2**63)")


def layer_span(start: int | None, end: int | None, num_layers: int, default_start: int = 0,
               default_end: int | None = None) -> tuple[int, int]:
    """``--layer_start`` / ``--layer_end`` as ``[start, end)``: None takes the default, a negative value counts from
    the end; an empty or out-of-range span is refused."""
    lo = default_start if start is None else start + num_layers if start < 0 else start
    hi = (num_layers if default_end is None else default_end) if end is None else end + num_layers if end < 0 else end
    if not 0 <= lo < hi <= num_layers:
        raise GaqpruneError(
            f"--layer_start {start} / --layer_end {end} give the layers [{lo}, {hi}), empty or outside the model's "
            f"{num_layers} layers; need 0 <= layer_start < layer_end <= {num_layers}")
    return lo, hi


def check_ratio_bounds(ratio: float, min_rate: float, max_rate: float, whole_layers: bool = False) -> None:
    """The target ratio and the per-layer rate bounds: each in range, and the ratio reachable with every
    width-pruned layer's rate in [min_rate, max_rate] (or, with whole layers removed, at least min_rate)."""
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise GaqpruneError(f"--pruning_ratio {ratio} is invalid; give a fraction in (0, 1), e.g. 0.25")
    for flag, value in (("--min_pruning_rate", min_rate), ("--max_pruning_rate", max_rate)):
        if not 0.0 <= value < 1.0:
            raise GaqpruneError(f"{flag} {value} is invalid; give a rate in [0, 1)")
    if min_rate > max_rate:
        raise GaqpruneError(f"--min_pruning_rate {min_rate} is above --max_pruning_rate {max_rate}; need min <= max")
    if whole_layers and ratio < min_rate - 1e-12:
        raise GaqpruneError(f"--pruning_ratio {ratio} is not reachable: it is below --min_pruning_rate {min_rate}, the "
                            "least any width-pruned layer removes; give a ratio >= the minimum rate")
    if not whole_layers and not min_rate - 1e-12 <= ratio <= max_rate + 1e-12:
        raise GaqpruneError(
            f"--pruning_ratio {ratio} is not reachable with every layer's rate in [--min_pruning_rate {min_rate}, "
            f"--max_pruning_rate {max_rate}]; give a ratio in that range or widen the bounds")
