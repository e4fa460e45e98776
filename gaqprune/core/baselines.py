"""Peer pruning methods for the quality benchmark, expressed as gaqprune plans (same surgery, same counting).

* uniform magnitude: the LLM-Pruner layer range and split, units scored by the L2 norm of what they own;
* uniform Taylor (LLM-Pruner): the same rate in every layer of the range, groups and channels;
* uniform Taylor MLP-only: the same, channels only;
* ShortGPT: remove the layers whose output is most similar (cosine) to their input, no width pruning.
"""

from __future__ import annotations

import torch

from gaqprune.core import units
from gaqprune.core.plan import plan_from_scores
from gaqprune.core.taylor import taylor_scores
from gaqprune.settings import PruneSettings


def magnitude_scores(hf_model, layers: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """L2 norm of all weights each unit owns (the magnitude baseline of structured-pruning papers)."""
    decoder = hf_model.model.layers
    scores = {}
    for idx in layers:
        layer = decoder[idx]
        scores[idx] = {}
        for kind in (units.ATTENTION, units.MLP):
            sq = torch.zeros(units.unit_count(layer, kind), dtype=torch.float64)
            for owner in units.owners(layer, kind):
                w = units.linear(layer, owner.path).weight.detach().double().cpu().pow(2)
                sq.index_add_(0, owner.unit_of, w.sum(1 - owner.dim))
            scores[idx][kind] = sq.sqrt()
        del layer
    return scores


def uniform_plan(hf_model, windows: torch.Tensor, settings: PruneSettings, scoring: str = "taylor") -> dict:
    """Same rate (``settings.pruning_ratio``) in every layer of the range; ``scoring`` taylor | magnitude."""
    start, end = settings.layer_range(len(hf_model.model.layers))
    selected = list(range(start, end))
    if scoring == "magnitude":
        scores = magnitude_scores(hf_model, selected)
    else:
        scores = taylor_scores(hf_model, windows, selected, batch_size=settings.taylor_batch_size)
    target = {i: settings.pruning_ratio for i in selected}
    return plan_from_scores(hf_model, target, scores, settings, {}, (start, end), tuple(windows.shape))


def shortgpt_plan(hf_model, windows: torch.Tensor, num_remove: int, settings: PruneSettings) -> dict:
    """Remove the ``num_remove`` layers with the lowest block influence (1 - cos(input, output)) on ``windows``."""
    from gaqprune.core.importance import compute_layer_importance

    influence = compute_layer_importance(hf_model, windows, "block_influence", progress=False)
    order = sorted(influence, key=lambda i: (influence[i], i))[:num_remove]
    target = {i: 1.0 for i in order}
    return plan_from_scores(hf_model, target, {}, settings, dict(influence), (0, len(hf_model.model.layers)),
                            tuple(windows.shape))
