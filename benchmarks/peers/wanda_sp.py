"""Wanda-sp: the structured Wanda baseline of FLAP's repository (An et al., AAAI 2024).

Follows the official code, github.com/CASIA-IVA-Lab/FLAP at commit 3bb57db3449dd2fa04a5c2192de80e87e33be2b1
(``lib/prune.py``: ``prune_wanda_sp``, ``compress(bias=False)``; ``lib/layerwrapper.py``: ``WrappedGPT``).

Notation: for decoder layer ``l`` and each of its output projections ``W`` ``[out, in]`` (``o_proj``: input = the
concatenated attention heads; ``down_proj``: input = the MLP channels), ``x_t`` is ``W``'s input at calibration
token ``t`` and ``||X_j||_2 = sqrt(sum_t x_{t,j}^2)`` the L2 norm of input feature ``j`` over all calibration tokens.

1. Score of an input channel ``j``: ``s_j = sum_i |W_ij| * ||X_j||_2`` (Wanda's ``|W| * ||X||`` summed over the
   column). The official code takes ``mean_i`` and ``sqrt(scaler_row) = ||X_j||_2 / sqrt(n_samples)``: constant
   factors per module, the same ranking.
2. A head's score is the SUM of its channels' scores (``reshape(-1, 128).sum(dim=1)``). GQA rule (our model has
   3 query heads per KV head): a GQA group (one KV head and its query heads) is scored by the sum over all its query
   heads' ``o_proj`` channels, i.e. the sum of its heads' Wanda-sp head scores. Removing a group removes its query
   heads and its KV head, so every layer keeps the same number of query heads per KV head.
3. Uniform structure: every layer removes the ``floor(r * G)`` lowest-scoring groups and the ``floor(r * C)``
   lowest MLP channels (``thresh = sort(metric)[int(ratio * n)]``, ``mask = metric >= thresh``) at one rate ``r``
   for attention and MLP, in every layer. The official ``r`` is the requested ``pruning_ratio`` itself; with
   only 3 groups per layer ``floor(r * 3)`` is a step function, so here ``r`` is the smallest rate whose removed
   decoder-parameter share is closest to ``fraction`` (exact counts: the rate is searched over all breakpoints
   ``k / G`` and ``k / C``; e.g. for SmolLM2-135M at 20 %: ``r = 0.267``, no group and 410 of 1536 channels
   per layer).
4. Calibration stream: layer by layer on the PRUNED stream (``prune_wanda_sp``): layer ``l``'s statistics come
   from the output of the already pruned layers ``0 .. l-1``; the layer is compressed (attention and MLP from the
   statistics of one forward pass of the unpruned layer) and then run again to give layer ``l+1`` its inputs.
5. No bias compensation (``compress(..., bias=False)``).

Deviations: calibration is the harness's 128 x 128 windows (``calib``) instead of the official 128 C4 samples of
128 tokens; the rate ``r`` is solved for the parameter budget (3. above) instead of taken as the ratio; every layer
keeps at least one group and one channel (``r < 1``), as the official code does for ratios below 1.
"""

from __future__ import annotations

import time
from fractions import Fraction

import torch
from torch import nn

from benchmarks.peers.flap import decoder_params, decoder_params_of, layer_output, peer_result, run_with_stats
from gaqprune.core import surgery, units
from gaqprune.core.layers import batch_layer_inputs, micro_batches

BATCH = 16  # calibration windows per layer call (memory only)


def channel_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """``s_j = sum_i |W_ij| * sqrt(sum_t x_{t,j}^2)`` for a Linear weight ``[out, in]`` and its inputs' ``sum x^2``."""
    return weight.detach().double().abs().sum(0) * sumsq.double().sqrt()


def layer_scores(layer: nn.Module, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group scores [G], channel scores [C])``: group = sum of its query heads' ``o_proj`` channel scores."""
    attn = channel_scores(layer.self_attn.o_proj.weight, stats["self_attn.o_proj"].sumsq)
    groups = attn.reshape(units.num_groups(layer), -1).sum(1)  # o_proj columns are ordered group by group
    return groups, channel_scores(layer.mlp.down_proj.weight, stats["mlp.down_proj"].sumsq)


def removed_counts(layer: nn.Module, rate: Fraction) -> tuple[int, int]:
    """``(floor(r G), floor(r C))``: groups and channels a layer loses at rate ``r`` (exact rational arithmetic)."""
    return (int(rate * units.num_groups(layer)), int(rate * units.num_channels(layer)))


def solve_rate(model, fraction: float) -> Fraction:
    """The smallest uniform rate ``r < 1`` whose removed share of the decoder parameters is closest to ``fraction``.

    Removed(r) = sum_l floor(r G_l) * p_group_l + floor(r C_l) * p_channel_l changes only at ``k / G_l`` and
    ``k / C_l``, so these breakpoints are all the candidates."""
    layers = list(model.model.layers)
    total = decoder_params(model)
    candidates = {Fraction(0)}
    for layer in layers:
        for n in (units.num_groups(layer), units.num_channels(layer)):
            candidates.update(Fraction(k, n) for k in range(n))
    shapes = [(units.num_groups(layer), units.num_channels(layer), units.params_per_unit(layer, units.ATTENTION),
               units.params_per_unit(layer, units.MLP)) for layer in layers]
    best, best_err = Fraction(0), float("inf")
    for rate in sorted(candidates):
        removed = sum(int(rate * g) * pg + int(rate * c) * pc for g, c, pg, pc in shapes)
        err = abs(removed / total - fraction)
        if err < best_err:
            best, best_err = rate, err
    return best


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """The units to keep after removing the ``k`` lowest scores (stable order, so ties go to the lower index)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[k:].tolist())


@torch.no_grad()
def prune(model, calib: torch.Tensor, fraction: float, batch_size: int = BATCH) -> dict:
    """Wanda-sp: remove ``fraction`` of the decoder-layer parameters of ``model`` in place (see the module docstring)."""
    started = time.time()
    before = decoder_params(model)
    rate = solve_rate(model, fraction)
    device = next(model.parameters()).device
    inputs = batch_layer_inputs(model, micro_batches(calib, batch_size, device))
    kept_groups, kept_channels = [], []
    for layer in model.model.layers:
        _, stats = run_with_stats(layer, inputs)  # the unpruned layer on the pruned stream
        group_s, channel_s = layer_scores(layer, stats)
        drop_g, drop_c = removed_counts(layer, rate)
        keep_g, keep_c = lowest(group_s, drop_g), lowest(channel_s, drop_c)
        surgery.keep_units(layer, units.ATTENTION, keep_g)
        surgery.keep_units(layer, units.MLP, keep_c)
        kept_groups.append(keep_g)
        kept_channels.append(len(keep_c))
        inputs = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]  # pruned layer's output
    del inputs
    surgery.remove_layers(model, [])  # syncs a per-layer config with the new shapes (removes nothing)
    after = sum(decoder_params_of(layer) for layer in model.model.layers)
    return peer_result("wanda_sp", fraction, before, after, started,
                       options={"rate": float(rate), "rate_exact": str(rate), "bias": False,
                                "calib_windows": list(calib.shape)},
                       kept_groups=kept_groups, kept_groups_per_layer=[len(k) for k in kept_groups],
                       kept_channels_per_layer=kept_channels)
