"""Typed settings of each pipeline stage. The CLI exposes every field as a flag of the same name
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
    """removal = PPL(layer skipped) - PPL(dense); activation = mean |output|; block_influence = 1 - cos(in, out)."""
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
    """Lower bound on each selected layer's rate."""
    max_pruning_rate: float = 0.5
    """Upper bound on each selected layer's rate."""
    layer_start: int | None = None
    """First layer to prune (default: 0)."""
    layer_end: int | None = None
    """One past the last layer to prune (default: all layers)."""
    num_examples: int = 10
    """Calibration windows for the Taylor scores (guide: 5-10 quick, 10-20 standard, 32-64 precise)."""
    max_seq_len: int = 64
    """Tokens per Taylor window (guide: 64-128)."""
