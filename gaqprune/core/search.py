"""Searched allocation (``--allocation search``): how many blocks to remove whole, chosen by measured calibration loss.

Depth and width share one budget. For ``k`` blocks removed whole, the span is the run of ``k`` contiguous selected
layers whose residual stream changes least (smallest mean cosine distance between the hidden states entering the
span and leaving it, over the calibration tokens: ReplaceMe's span rule, github.com/mts-ai/ReplaceMe
``ReplaceMe/distance.py`` at 5bb71d9, there on the last token, here on every token), the span is folded into the block
before it by the residual refit, and the rest of the budget goes to width pruning with the rates
``--pruning_strategy`` / ``--alpha`` give the other selected layers (the guide's ``inverse`` rates seed the search).
Each candidate ``k`` is applied in full on a scratch copy of one layer at a time (surgery and refit, the model itself
unchanged) and scored by the pruned model's next-token loss on the refit windows; the search keeps the best.

The loss over ``k`` falls while removed blocks cost less than the width they spare and rises after, measured on
the embedded model (``benchmarks/lever_depth.py``, 64 x 128 refit windows): at 20 % of the decoder k = 0..4 give
3.520, 3.506, 3.503, 3.501, 3.512 nats, at 30 % k = 0, 2, 4, 6, 8 give 3.619, 3.583, 3.568, 3.547, 3.663. So the
search walks ``k`` coarse to fine (``depth_order``): a stride of about a quarter of the largest feasible ``k`` until
the loss rises, then halving strides around the best, instead of scoring every ``k``.

This module holds the parts that do not apply plans (the span distances and the walk); ``gaqprune.core.plan``
scores the candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gaqprune.core import compensation
from gaqprune.core.layers import resident

DISTANCE_WINDOWS = 32  # calibration windows the span distances are measured on (the lever's measurement)


@torch.no_grad()
def span_distances(hf_model, windows: torch.Tensor, max_k: int, start: int, end: int,
                   batch_size: int = 4) -> dict[int, dict[int, float]]:
    """``{k: {s: mean over tokens of 1 - cos(h_s, h_{s+k})}}`` for every span ``[s, s + k)`` inside ``[start, end)``
    and ``1 <= k <= max_k`` (``h_s``: the residual stream entering layer ``s``). One sweep up the decoder, one resident
    layer at a time; only the last ``max_k + 1`` boundaries' hidden states are kept."""
    stream = compensation.capture_layer_inputs(hf_model, windows, batch_size)
    tokens = sum(h.shape[0] * h.shape[1] for h, _ in stream)
    sums: dict[int, dict[int, float]] = {k: {} for k in range(1, max_k + 1)}
    kept: dict[int, list[torch.Tensor]] = {}  # boundary index -> hidden states per micro-batch
    for boundary in range(end + 1):
        if boundary > 0:
            with resident(hf_model, boundary - 1) as layer:
                stream = compensation.run_layer(layer, stream)
        if boundary < start:
            continue
        kept[boundary] = [h for h, _ in stream]
        for k in range(1, max_k + 1):
            if boundary - k in kept:
                sums[k][boundary - k] = sum(
                    float((1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)).sum())
                    for a, b in zip(kept[boundary - k], kept[boundary])) / tokens
        kept.pop(boundary - max_k, None)
    return sums


def best_span(distances: dict[int, dict[int, float]], k: int) -> list[int]:
    """The ``k`` contiguous layers with the smallest distance (the first on a tie)."""
    if k == 0:
        return []
    by_start = distances[k]
    s = min(by_start, key=lambda i: (by_start[i], i))
    return list(range(s, s + k))


def depth_order(max_k: int, loss: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """The ``k`` in ``[0, max_k]`` with the smallest ``loss(k)``, walking coarse to fine (see the module docstring):
    ``k = 0, d, 2d, ...`` (``d`` about ``max_k / 4``) until the loss rises above the best so far, then the midpoints
    on both sides of the best at strides ``d/2, d/4, ..., 1``. Each ``k`` is scored once; returns ``(best, scores)``.
    Deterministic for a deterministic ``loss``; ties go to the smaller ``k`` (the less deep model)."""
    scores: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in scores:
            scores[k] = loss(k)
        return scores[k]

    def best() -> int:
        return min(scores, key=lambda k: (scores[k], k))

    stride = max(1, round(max_k / 4))
    k = 0
    while k <= max_k:
        if score(k) > min(scores.values()):  # the loss rose: the best lies behind
            break
        k += stride
    while stride > 1:
        stride = max(1, stride // 2)
        centre = best()
        for k in (centre - stride, centre + stride):
            if 0 <= k <= max_k:
                score(k)
    return best(), scores
