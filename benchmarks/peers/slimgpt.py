"""SlimGPT (Ling et al., NeurIPS 2024, "SlimGPT: Layer-wise Structured Pruning for Large Language Models").

Follows the official code released with the paper (its ``README.md``: "Pruning with SlimGPT", ``model_slimming.py``
``model_slimming`` / ``main`` and ``slim_utils/slimgpt.py`` ``SlimGPT.add_batch`` / ``struct_prune``). The authors
published it as the paper's code archive; the search index holds these files without naming their repository
(``README.md``, ``model_slimming.py``), and the public copy read here is github.com/aden9460/EdgeVAR at commit
c004e57e11cd59a7b10a8a719bb514b5643892f6, ``slimgpt_pub/slim_utils/slimgpt.py`` (``SlimGPT.struct_prune`` as
released, plus a ``no_compensate`` switch that defaults to off; its ``prune.py`` keeps ``main``'s non-uniform schedule
unchanged).

Notation: for decoder layer ``l`` and an output projection ``W`` ``[out, in]`` (``o_proj``: input = the concatenated
query heads; ``down_proj``: input = the MLP channels), ``X`` ``[in, tokens]`` is ``W``'s input on the calibration
tokens and ``H = X X^T`` (+ damping). The layer-wise objective is ``||W X - W' X||^2`` over ``W'`` with the removed
input columns zero.

1. Calibration stream (``model_slimming``): layer by layer on the PRUNED stream. For layer ``l``: the layer runs on
   all calibration windows with a hook on ``o_proj`` (``H`` of its input), ``o_proj`` is pruned; the layer runs
   again (attention already pruned) with a hook on ``down_proj``, ``down_proj`` is pruned; then the pruned layer's
   outputs become layer ``l+1``'s inputs (the ``sequential = [["self_attn.o_proj"], ["mlp.down_proj"]]`` loop).
2. Damping (``struct_prune``): dead inputs (``H_jj = 0``) get ``H_jj = 1`` and a zero column; then
   ``H += percdamp * mean(diag H) * I`` with ``percdamp = 0.01`` (``--percdamp`` default; the README's example
   passes 0).
3. Batched greedy pruning with OBS updates (``struct_prune``), repeated until the target is removed:
   ``Hinv = H^-1`` (Cholesky); per column the error ``e_j = sum_i W_ij^2 / d_j``, the lowest removed; the columns
   are reordered removed-first, ``U = chol(Hinv[order, order], upper)[:cnt]`` and the ``cnt`` columns are removed
   one after the other with the OBS update of the later ones (local update inside the batch, ``Err_i = W_i / U_ii``,
   ``W[:, i:] -= Err_i U[i, i:]``) and of all remaining columns (global update ``W_rest -= Err U[:, rest]``); the
   removed rows / columns of ``H`` are replaced by the identity, so the next ``Hinv`` is that of the kept columns.
   The result is the exact least-squares refit of the kept columns to ``W X`` (tests check this).

   * Attention heads (``headsize > 1``): ``d_j`` comes from the grouped Cholesky: each head's ``headsize`` x
     ``headsize`` block of ``Hinv`` is Cholesky-factored and ``d_j`` is the squared diagonal entry of column ``j``;
     a head's error is the sum over its columns; one head (``cnt = headsize``) per round.
     GQA rule (our model has 3 query heads per KV head; SlimGPT was written for LLaMA's multi-head attention with
     ``headsize = hidden / num_heads``): the unit is a GQA group, one KV head with its query heads, i.e. the
     ``headsize = (query heads per KV head) * head_dim`` contiguous ``o_proj`` columns of the group; the official
     code zeroes ``o_proj`` columns and removes the matching q/k/v rows afterwards (``params_remove.py``), here
     ``gaqprune.core.surgery.keep_units`` removes the group's ``q_proj`` / ``k_proj`` / ``v_proj`` rows and
     ``o_proj`` columns, so every layer keeps the same number of query heads per KV head.
   * FFN channels (``headsize = 1``): ``d_j = Hinv_jj``, the exact OBS error of one column; Dynamic Group Size:
     ``cnt = min(left, max(b, 64), 1024)`` with ``b = (target - 512) // 2`` at the start and ``b = (b - 512) // 2``
     after each round. Removing ``down_proj`` column ``c`` removes ``gate_proj`` / ``up_proj`` row ``c``.
   * Targets: ``round(G * s_l)`` groups and ``round(C * s_l)`` channels (``round(columns // headsize * sparsity)``),
     ``s_l`` the layer's ratio, the same for attention and MLP.
4. Incremental Pruning Ratio (``main``, ``--non_uniform --non_uniform_strategy log_increase``):
   ``s_l = s_min + (s_max - s_min) * ln(1 + l) / ln(32)`` for ``l = 0 .. L-1`` (LLaMA-7B, ``L = 32``). Here
   ``ln(32)`` is ``ln(L)`` (the same for 32 layers; for our 30 it keeps ``s_{L-1} = s_max``). The README's 20 %
   setting is ``s_min = 0.0625, s_max = 0.25``; the ratio ``s_min = s_max / 4`` is kept and ``s_max`` solved
   (bisection on the exact, monotone count of removed units) so that the removed share of the decoder-layer
   parameters is closest to ``fraction``. SmolLM2-135M (30 layers, 3 groups): ``s_max`` = 0.232 / 0.371 / 0.515
   at 20 / 30 / 40 % (the README's 0.25 for LLaMA-7B at 20 %); with 3 groups, a layer loses one group for
   ``1/6 < s_l < 1/2`` (layers 8..29 at 20 %) and two from ``s_l = 1/2`` on (Python's ``round``).

Deviations, and why:

* Calibration: the harness's 128 x 128 windows (``calib``) instead of the README's 128 C4 sequences of 2048 tokens
  (the paper: 256); every window is a full-length sequence, as the official loader's.
* ``H`` and the OBS arithmetic are float64 (official: float32 on the GPU): cheap on this CPU and free of Cholesky
  failures; ``H`` is the plain sum ``X X^T`` (official: ``2 / n_samples X X^T``: a constant factor, which neither the
  relative damping nor the OBS update sees).
* ``ln(32)`` -> ``ln(L)`` and ``s_max`` solved for the budget (4. above); a layer keeps at least one group and one
  channel (a target is capped at ``G - 1`` / ``C - 1``; the official ``s < 1`` assertion only guarantees this for
  ``round``-ing that stays below ``G``); ties in the error sort go to the lower index (stable sort).
* The official code keeps the pruned columns as zeros in the dense checkpoint and strips them on saving
  (``LLaMAParamsPruner``); here the layer is cut right after each projection is pruned: the same function.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from benchmarks.peers.flap import Gram, decoder_params, decoder_params_of, layer_output, peer_result, run_with_stats
from gaqprune.core import surgery, units
from gaqprune.core.layers import batch_layer_inputs, micro_batches

BATCH = 16  # calibration windows per layer call (memory only; H does not depend on it)
PERCDAMP = 0.01  # model_slimming.py --percdamp default
MIN_OVER_MAX = 0.25  # README: --min_sparsity 0.0625 --max_sparsity 0.25
ATTN, MLP_PATH = "self_attn.o_proj", "mlp.down_proj"


def hessian(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]], path: str) -> torch.Tensor:
    """``X X^T`` (float64, ``[in, in]``) of the inputs of the Linear ``path`` while ``layer`` runs on ``inputs``
    (``SlimGPT.add_batch``, unscaled)."""
    return run_with_stats(layer, inputs, (path,), Gram)[1][path].gram


def head_errors(weight: torch.Tensor, hinv: torch.Tensor, headsize: int) -> torch.Tensor:
    """Per-column error ``sum_i W_ij^2 / d_j`` of ``struct_prune``: ``d_j`` = the squared diagonal of the Cholesky
    factor of column ``j``'s ``headsize`` x ``headsize`` diagonal block of ``Hinv`` (grouped Cholesky), or
    ``Hinv_jj`` for ``headsize = 1``."""
    if headsize > 1:
        n = hinv.shape[0] // headsize
        blocks = torch.stack([hinv[i * headsize:(i + 1) * headsize, i * headsize:(i + 1) * headsize] for i in range(n)])
        d = torch.linalg.cholesky(blocks).diagonal(dim1=-2, dim2=-1).reshape(-1) ** 2
    else:
        d = hinv.diagonal()
    return (weight**2 / d.unsqueeze(0)).sum(0)


@torch.no_grad()
def struct_prune(weight: torch.Tensor, h: torch.Tensor, headsize: int, target_units: int,
                 percdamp: float = PERCDAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``SlimGPT.struct_prune``: remove ``target_units`` heads of ``headsize`` columns (or single columns) of
    ``weight`` ``[out, in]`` by batched greedy OBS pruning on ``H`` (``[in, in]``). Returns the updated weight
    (float64, removed columns zero) and the removal mask over the input columns."""
    w = weight.detach().double().clone()
    h = h.double().clone()
    columns = w.shape[1]
    assert columns % headsize == 0
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if percdamp > 0:
        h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    mask = torch.zeros(columns, dtype=torch.bool)
    pruned, target = 0, target_units * headsize
    blocksize = (target - 512) // 2
    while pruned < target:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        error = head_errors(w, hinv, headsize)
        error[mask] = torch.inf
        if headsize > 1:
            heads = torch.argsort(error.view(-1, headsize).sum(1), stable=True)
            order = (heads[:, None] * headsize + torch.arange(headsize)).reshape(-1)
            cnt = headsize
        else:
            order = torch.argsort(error, stable=True)
            cnt = min(target - pruned, max(blocksize, 64), 1024)
        w = w[:, order]
        u = torch.linalg.cholesky(hinv[order][:, order], upper=True)[:cnt]
        w1 = w[:, :cnt].clone()
        u1 = u[:, :cnt]
        err = torch.zeros_like(w1)
        for i in range(cnt):
            err[:, i:i + 1] = w1[:, i:i + 1] / u1[i, i]
            w1[:, i:] -= err[:, i:i + 1] @ u1[i:i + 1, i:]  # local update
        w[:, :cnt] = 0
        end = columns - pruned
        w[:, cnt:end] -= err @ u[:, cnt:end]  # global update
        w = w[:, torch.argsort(order)]
        idx = order[:cnt]
        h[idx, :] = 0
        h[:, idx] = 0
        h[idx, idx] = 1
        mask[idx] = True
        pruned += cnt
        blocksize = (blocksize - 512) // 2
    return w, mask


def log_schedule(num_layers: int, s_max: float, min_over_max: float = MIN_OVER_MAX) -> list[float]:
    """``s_l = s_min + (s_max - s_min) ln(1 + l) / ln(L)``, ``s_min = min_over_max * s_max`` (``log_increase``)."""
    s_min = min_over_max * s_max
    if num_layers == 1:
        return [s_max]
    return [s_min + (s_max - s_min) * math.log(1 + i) / math.log(num_layers) for i in range(num_layers)]


def unit_targets(layer: nn.Module, sparsity: float) -> tuple[int, int]:
    """``(groups, channels)`` a layer loses at ratio ``s``: ``round(G s)``, ``round(C s)``, each capped so that one
    unit stays."""
    g, c = units.num_groups(layer), units.num_channels(layer)
    return min(round(g * sparsity), g - 1), min(round(c * sparsity), c - 1)


def removed_params(layers: list[nn.Module], sparsities: list[float]) -> int:
    total = 0
    for layer, s in zip(layers, sparsities, strict=True):
        dg, dc = unit_targets(layer, s)
        total += dg * units.params_per_unit(layer, units.ATTENTION) + dc * units.params_per_unit(layer, units.MLP)
    return total


def solve_schedule(layers: list[nn.Module], target_removed: float,
                   min_over_max: float = MIN_OVER_MAX) -> tuple[float, list[float]]:
    """``(s_max, per-layer ratios)`` whose removed parameter count is closest to ``target_removed``: bisection for the
    first ``s_max`` that reaches the target (the count is a nondecreasing step function of ``s_max``), then the
    closer of that step and the one below it (the lower on a tie)."""
    n = len(layers)

    def removed(s):
        return removed_params(layers, log_schedule(n, s, min_over_max))

    lo, hi = 0.0, 1.0 - 1e-9
    if removed(hi) < target_removed:
        raise ValueError(f"SlimGPT cannot remove {target_removed:.0f} parameters with s_max < 1")
    for _ in range(200):
        mid = (lo + hi) / 2
        if removed(mid) >= target_removed:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-13:
            break
    best = lo if abs(removed(lo) - target_removed) <= abs(removed(hi) - target_removed) else hi
    return best, log_schedule(n, best, min_over_max)


@torch.no_grad()
def prune_layer(layer: nn.Module, inputs: list, sparsity: float, percdamp: float = PERCDAMP) -> tuple[list[int], int]:
    """Prune one decoder layer in place as ``model_slimming`` does (attention first, then the MLP on the stream
    through the pruned attention). Returns the kept groups and the kept channel count."""
    drop_g, drop_c = unit_targets(layer, sparsity)
    keep_groups = list(range(units.num_groups(layer)))
    for kind, path, drop in ((units.ATTENTION, ATTN, drop_g), (units.MLP, MLP_PATH, drop_c)):
        if drop == 0:
            continue
        lin = units.linear(layer, path)
        headsize = lin.in_features // units.unit_count(layer, kind)  # a GQA group's o_proj columns, or 1
        w, mask = struct_prune(lin.weight, hessian(layer, inputs, path), headsize, drop, percdamp)
        lin.weight.data = w.to(lin.weight.dtype)
        keep = [u for u in range(units.unit_count(layer, kind)) if not mask[u * headsize]]
        surgery.keep_units(layer, kind, keep)
        if kind == units.ATTENTION:
            keep_groups = keep
    return keep_groups, units.num_channels(layer)


@torch.no_grad()
def prune(model, calib: torch.Tensor, fraction: float, percdamp: float = PERCDAMP, min_over_max: float = MIN_OVER_MAX,
          batch_size: int = BATCH) -> dict:
    """SlimGPT: remove ``fraction`` of the decoder-layer parameters of ``model`` in place (see the module docstring)."""
    started = time.time()
    layers = list(model.model.layers)
    before = decoder_params(model)
    s_max, sparsities = solve_schedule(layers, fraction * before, min_over_max)
    predicted = before - removed_params(layers, sparsities)
    device = next(model.parameters()).device
    inputs = batch_layer_inputs(model, micro_batches(calib, batch_size, device))
    kept_groups, kept_channels = [], []
    for layer, s in zip(layers, sparsities, strict=True):
        groups, channels = prune_layer(layer, inputs, s, percdamp)
        kept_groups.append(groups)
        kept_channels.append(channels)
        inputs = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]  # the pruned stream
    del inputs
    surgery.remove_layers(model, [])  # syncs a per-layer config with the new shapes (removes nothing)
    after = sum(decoder_params_of(layer) for layer in model.model.layers)
    assert after == predicted, (after, predicted)
    return peer_result("slimgpt", fraction, before, after, started,
                       options={"percdamp": percdamp, "non_uniform_strategy": "log_increase",
                                "min_sparsity": min_over_max * s_max, "max_sparsity": s_max,
                                "calib_windows": list(calib.shape)},
                       sparsities=sparsities, kept_groups=kept_groups,
                       kept_groups_per_layer=[len(k) for k in kept_groups], kept_channels_per_layer=kept_channels)
