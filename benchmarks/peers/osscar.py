"""OSSCAR (Meng et al., ICML 2024, "OSSCAR: One-Shot Structured Pruning in Vision and Language Models with
Combinatorial Optimization").

Follows the official code, github.com/mazumder-lab/OSSCAR (``prune_algo.py`` at commit
0bd78871ac3730dbd31154620f0a2b759081d76f: ``OSSCAR_fastprune``, ``OSSCAR_local_search``; ``osscar_prune.py`` and
``opt_prune.py`` at commit e0150939ff32e35b9064223be8bcb8473949b02c: ``OSSCAR_prune.add_batch`` / ``prune``,
``opt_sequential`` and the defaults of its arguments), and LinkedIn's packaged version for Llama-family GQA models,
``fmchisel`` 0.1.2 on PyPI (the same code as github.com/weiruichen01/fmchisel ``src/fmchisel/pruning/osscar/``:
``utils/osscar_sparsify.py`` at commit d76cd5a541d77d9abd3fc40682e4578c0ce98e37, ``base.py`` at commit
6f0944dfdfa6f26205ff6014a58859ab4a5c2c97), whose ``OSSCARModifier`` prunes ``down_proj`` inputs (MLP channels) and
``o_proj`` inputs in groups of ``num_key_value_heads`` (GQA groups).

fmchisel is not called: it requires ``torch<2.8`` and ``transformers<5`` and its package ``__init__`` imports
``llmcompressor`` (0.5.1, which pins ``transformers<5``, ``compressed-tensors==0.9.4``, ``numpy<2``, ...) and uses
llmcompressor's tracing pipeline; none of that installs beside torch 2.13 / transformers 5.25 without replacing them.
Its algorithm is the official ``OSSCAR_fastprune`` (float32 instead of float64) and no local search; both are
implemented here from the official code, so no optional dependency is needed.

Notation: for decoder layer ``l`` and an output projection with weight ``W`` ``[out, in]``, ``B = W^T`` ``[in, out]``
(rows = input features), ``X`` ``[tokens, in]`` its calibration inputs, ``XtX = X^T X`` (+ damping),
``XtY = XtX B`` (the dense projection's output as target). The layer-wise objective of a candidate ``B'`` is
``f(B') = sum(-B' * XtY) + 1/2 sum(B' * (XtX B'))`` = ``1/2 ||X B - X B'||^2`` + const. A unit is a block of
``ksize`` consecutive rows of ``B``: an MLP channel of ``down_proj`` (``num_cin = C``, ``ksize = 1``) or a GQA group of
``o_proj`` (``num_cin = G`` KV heads, ``ksize`` = its query heads x head_dim, as fmchisel's ``num_cin =
num_key_value_heads``; the official OPT code uses ``num_heads``, which is the same for multi-head attention).

1. Calibration stream (``opt_sequential``, sequential, not ``--parallel``): layer by layer on the PRUNED stream; the
   dense layer runs once on its inputs with hooks on ``o_proj`` and ``down_proj`` (both ``XtX`` from that one pass,
   so the MLP sees the dense attention), both are pruned, and the pruned layer runs again to give the next layer its
   inputs (fmchisel: llmcompressor's sequential pipeline, calibrate then propagate).
2. ``XtX = sum_t x_t x_t^T``; dead inputs (``XtX_jj = 0``) get a zero row in ``B``; damping
   ``XtX += lambda2 * mean(diag XtX) * I``, ``lambda2 = 1e-2`` (``--lambda2``; fmchisel ``dampening_frac``).
3. ``OSSCAR_fastprune``: backward greedy elimination. With ``XtX_inv = XtX^-1`` restricted to the current support,
   each kept unit's removal cost is ``1/2 tr(B_u^T (XtX_inv_uu)^-1 B_u)``; the ``update_ten[i]`` cheapest units are
   removed together with the OBS update ``B -= XtX_inv[:, S] (XtX_inv_SS)^-1 B_S`` and the inverse downdated; the
   ``num_cin - num_keep`` removals are spread over ``(num_cin - num_keep) / update_iter`` rounds
   (``--update_iter 10`` for the MLP, ``--update_iter2 2`` for attention). Finally the least-squares refit of the kept
   rows, ``B_K = XtX_KK^-1 XtY_K``.
4. ``OSSCAR_local_search`` (``--local_fc`` / ``--local_out``, ``--local_iter 30``): swap moves on the support. Each
   iteration removes the ``num_swap`` cheapest kept units (the removal cost of 3.), then adds back the ``num_swap``
   removed units with the largest gain ``1/2 g^T C^-1 g`` (``g = XtY_u - XtX_uS XtX_SS^-1 XtY_S``,
   ``C = XtX_uu - XtX_uS XtX_SS^-1 XtX_Su``: the exact decrease of ``f`` when unit ``u`` joins support ``S``),
   refits ``B = XtX_SS^-1 XtY_S`` and keeps the new support only if ``f`` decreased (relative ``1e-9``); the search
   stops at the first swap that does not (``switch_lb = 1``). ``num_swap = update_iter`` (10) for the MLP, 5 for
   attention (the official constants), capped here at the number of removed and of kept units. The best support's
   least-squares refit is the new weight.
5. Budget: uniform across layers, as both official codes (``int(num_cin * (1 - sp))`` units kept per layer; fmchisel:
   ``num_drop_mlp_neuron`` / ``num_drop_attn_group`` per block). The attention sparsity is the requested share
   (``sp_out = sp``, the official default): ``G - int(G (1 - fraction))`` groups go (fewer if that alone would
   overshoot); the MLP then loses the number of channels that brings the removed decoder-parameter share closest to
   ``fraction``. SmolLM2-135M (3 groups): one group and 239 channels per layer at 20 %, 1 and 444 at 30 %,
   2 and 478 at 40 %.

Deviations, and why:

* Calibration: the harness's 128 x 128 windows (``calib``) instead of the official 128 C4 windows of the model's
  full context (2048).
* Local search is on for both projections (the paper's OSSCAR; the official script needs ``--local_fc --local_out``);
  ``prune(..., local_fc=False, local_out=False)`` gives ``OSSCAR_fastprune`` alone, i.e. fmchisel's algorithm.
* The pruned set is tracked explicitly instead of being re-read from all-zero rows of ``B`` (``|sum| <= 1e-12``).
* ``num_swap`` is capped (4. above): the official constants assume more units than SmolLM2's 3 KV heads per layer
  (with 5 swaps out of 2 kept groups the official indexing would pick already removed units).
* float64 throughout (the official ``prune_algo.py`` computes in float64; fmchisel in float32).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from benchmarks.peers.flap import Gram, decoder_params, decoder_params_of, layer_output, peer_result, run_with_stats
from gaqprune.core import surgery, units
from gaqprune.core.layers import batch_layer_inputs, micro_batches

BATCH = 16  # calibration windows per layer call (memory only; XtX does not depend on it)
LAMBDA2 = 1e-2  # --lambda2
UPDATE_ITER = 10  # --update_iter (MLP)
UPDATE_ITER2 = 2  # --update_iter2 (attention)
LOCAL_ITER = 30  # --local_iter
LOCAL_SWAP_OUT = 5  # osscar_prune.py: local_swap = 5 for the attention output projection
PATHS = ("self_attn.o_proj", "mlp.down_proj")


def objective(b: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor) -> float:
    """``sum(-B * XtY) + 1/2 sum(B * (XtX B))`` (``1/2 ||X B_dense - X B||^2`` up to a constant)."""
    return float(torch.sum(-b * xty + 0.5 * b * (xtx @ b)))


def rows_of(units_: torch.Tensor, ksize: int) -> torch.Tensor:
    """The rows of ``B`` owned by the units ``units_`` (blocks of ``ksize``)."""
    return (units_.reshape(-1, 1) * ksize + torch.arange(ksize)).reshape(-1)


def removal_costs(b: torch.Tensor, xtx_inv: torch.Tensor, pruned: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per unit ``1/2 tr(B_u^T (XtX_inv_uu)^-1 B_u)``: the increase of the objective when unit ``u`` leaves the
    support (``obj_sum`` of the official code; ``XtX_inv`` is the inverse on the support, zero elsewhere)."""
    num_cin = b.shape[0] // ksize
    if ksize > 1:
        obj_mat = torch.zeros_like(b)
        for u in range(num_cin):
            if pruned[u]:
                continue
            r = slice(u * ksize, (u + 1) * ksize)
            obj_mat[r] = torch.linalg.inv(xtx_inv[r, r]) @ b[r] / 2
    else:
        obj_mat = (1 / (pruned.double() + torch.diag(xtx_inv)))[:, None] * b / 2
    return (b * obj_mat).reshape(num_cin, ksize, -1).sum((1, 2))


def addition_gains(xtx: torch.Tensor, xty: torch.Tensor, pruned: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per removed unit ``u``: ``1/2 g^T C^-1 g`` with ``g = XtY_u - XtX_uS XtX_SS^-1 XtY_S`` and the Schur complement
    ``C = XtX_uu - XtX_uS XtX_SS^-1 XtX_Su`` (``obj_in``): the decrease of the objective when ``u`` joins the support
    ``S`` (both least-squares refit). Zero for kept units."""
    num_cin = xtx.shape[0] // ksize
    supp = rows_of((~pruned).nonzero().flatten(), ksize)
    h_inv = torch.linalg.inv(xtx[supp][:, supp])
    h_inv_g = h_inv @ xty[supp]
    gains = torch.zeros(num_cin, dtype=torch.float64)
    if ksize >= 2:
        for u in range(num_cin):
            if not pruned[u]:
                continue
            r = slice(u * ksize, (u + 1) * ksize)
            b_ori = xtx[supp, r]
            c_inv = torch.linalg.inv(xtx[r, r] - b_ori.T @ h_inv @ b_ori)
            gt = xty[r] - b_ori.T @ h_inv_g
            gains[u] = torch.sum(gt * (c_inv @ gt)) / 2
    else:
        c_list = 1 / (torch.diag(xtx) - torch.sum(xtx[supp, :] * (h_inv @ xtx[supp, :]), 0) + (~pruned) * 1e-8)
        gt = xty - xtx[:, supp] @ h_inv_g
        gains = torch.sum(gt**2, 1) * c_list / 2
        gains = torch.where(pruned, gains, torch.zeros_like(gains))
    return gains


def refit(xtx: torch.Tensor, xty: torch.Tensor, pruned: torch.Tensor, ksize: int) -> torch.Tensor:
    """The least-squares ``B`` on the support (``B_S = XtX_SS^-1 XtY_S``, zero rows elsewhere)."""
    supp = rows_of((~pruned).nonzero().flatten(), ksize)
    b = torch.zeros_like(xty)
    b[supp] = torch.linalg.inv(xtx[supp][:, supp]) @ xty[supp]
    return b


def support_inverse(xtx: torch.Tensor, pruned: torch.Tensor, ksize: int) -> torch.Tensor:
    supp = rows_of((~pruned).nonzero().flatten(), ksize)
    inv = torch.zeros_like(xtx)
    inv[supp[:, None], supp] = torch.linalg.inv(xtx[supp][:, supp])
    return inv


def remove_units(b: torch.Tensor, xtx_inv: torch.Tensor, pruned: torch.Tensor, chosen: torch.Tensor,
                 ksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS removal of the units ``chosen``: ``B -= XtX_inv[:, S] (XtX_inv_SS)^-1 B_S``, rows ``S`` zeroed, the inverse
    downdated to the smaller support (in place on ``pruned``)."""
    upd = rows_of(chosen, ksize)
    tmp = torch.linalg.inv(xtx_inv[upd[:, None], upd])
    b = b - xtx_inv[:, upd] @ tmp @ b[upd]
    b[upd] = 0
    xtx_inv = xtx_inv - xtx_inv[:, upd] @ tmp @ xtx_inv[upd]
    xtx_inv[upd, :] = 0
    xtx_inv[:, upd] = 0
    pruned[chosen] = True
    return b, xtx_inv


def fastprune(b: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, num_cin: int, num_keep: int,
              update_iter: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``OSSCAR_fastprune``: keep ``num_keep`` of ``num_cin`` units. Returns the least-squares ``B`` on the kept
    support and the removal mask over the units."""
    ksize = b.shape[0] // num_cin
    b = b.clone()
    pruned = torch.zeros(num_cin, dtype=torch.bool)
    xtx_inv = torch.linalg.inv(xtx)
    to_remove = num_cin - num_keep
    if to_remove > 0:
        rounds = max(1, int(to_remove / update_iter))
        quo, rem = divmod(to_remove, rounds)
        counts = [quo + (1 if i < rem else 0) for i in range(rounds)]
        for count in counts:
            cost = removal_costs(b, xtx_inv, pruned, ksize)
            order = torch.argsort(cost + 1e20 * pruned.double(), stable=True)
            b, xtx_inv = remove_units(b, xtx_inv, pruned, order[:count], ksize)
    return refit(xtx, xty, pruned, ksize), pruned


def local_search(pruned: torch.Tensor, xtx: torch.Tensor, xty: torch.Tensor, ksize: int, max_iter: int = LOCAL_ITER,
                 num_swap: int = UPDATE_ITER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``OSSCAR_local_search`` from the support ``~pruned`` (with ``switch_lb = 1``: stop at the first swap that does
    not lower the objective). Returns the best support's least-squares ``B``, its removal mask and the number of
    accepted swaps."""
    num_swap = min(num_swap, int(pruned.sum()), int((~pruned).sum()))
    best = pruned.clone()
    b = refit(xtx, xty, best, ksize)
    obj_cur = objective(b, xtx, xty)
    accepted = 0
    if num_swap <= 0:
        return b, best, accepted
    for _ in range(max_iter):
        cur = best.clone()
        xtx_inv = support_inverse(xtx, cur, ksize)
        cost = removal_costs(b, xtx_inv, cur, ksize)
        order = torch.argsort(cost + 1e20 * cur.double(), stable=True)
        remove_units(b, xtx_inv, cur, order[:num_swap], ksize)
        gains = addition_gains(xtx, xty, cur, ksize)
        back = torch.argsort(-gains + 1e20 * (~cur).double(), stable=True)[:num_swap]
        cur[back] = False
        b_new = refit(xtx, xty, cur, ksize)
        obj_new = objective(b_new, xtx, xty)
        if obj_new < obj_cur * (1 + 1e-9):
            best, b, obj_cur = cur, b_new, obj_new
            accepted += 1
        else:
            break
    return b, best, accepted


@torch.no_grad()
def prepare(weight: torch.Tensor, xtx: torch.Tensor, lambda2: float = LAMBDA2) -> tuple[torch.Tensor, ...]:
    """``(B, damped XtX, XtY)`` of ``OSSCAR_prune.prune``: dead rows of ``B`` zeroed, ``XtX`` damped, ``XtY = XtX B``."""
    b = weight.detach().double().t().clone()
    xtx = xtx.double().clone()
    dead = torch.diag(xtx) == 0
    b[dead, :] = 0
    xtx += torch.eye(b.shape[0], dtype=torch.float64) * lambda2 * torch.mean(torch.diag(xtx))
    return b, xtx, xtx @ b


@torch.no_grad()
def osscar_prune(weight: torch.Tensor, xtx: torch.Tensor, num_cin: int, num_keep: int, update_iter: int,
                 local: bool, num_swap: int, local_iter: int = LOCAL_ITER,
                 lambda2: float = LAMBDA2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune the input units of one projection: returns the new weight ``[out, in]`` (float64, removed columns zero),
    the removal mask over the units and a few numbers (objective before / after the local search, swaps)."""
    b, xtx, xty = prepare(weight, xtx, lambda2)
    ksize = b.shape[0] // num_cin
    b_sol, pruned = fastprune(b, xtx, xty, num_cin, num_keep, update_iter)
    stats = {"objective_fastprune": objective(b_sol, xtx, xty), "swaps": 0}
    if local:
        b_sol, pruned, stats["swaps"] = local_search(pruned, xtx, xty, ksize, local_iter, num_swap)
    stats["objective"] = objective(b_sol, xtx, xty)
    return b_sol.t(), pruned, stats


def input_grams(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[dict, list]:
    """One pass of ``layer`` over ``inputs`` with hooks on ``o_proj`` and ``down_proj``: ``{path: X^T X}`` (float64)
    and the layer's outputs."""
    outs, stats = run_with_stats(layer, inputs, PATHS, Gram)
    return {p: s.gram for p, s in stats.items()}, outs


def uniform_counts(layers: list[nn.Module], fraction: float, before: int) -> tuple[int, int]:
    """``(groups, channels)`` removed from every layer (5. of the module docstring)."""
    target = fraction * before
    groups = min(units.num_groups(layer) for layer in layers)
    drop_g = groups - int(groups * (1 - fraction))
    pg = sum(units.params_per_unit(layer, units.ATTENTION) for layer in layers)
    pc = sum(units.params_per_unit(layer, units.MLP) for layer in layers)
    drop_g = min(drop_g, groups - 1)
    while drop_g > 0 and drop_g * pg > target:
        drop_g -= 1
    channels = min(units.num_channels(layer) for layer in layers)
    drop_c = max(0, min(round((target - drop_g * pg) / pc), channels - 1))
    return drop_g, drop_c


@torch.no_grad()
def prune(model, calib: torch.Tensor, fraction: float, update_iter: int = UPDATE_ITER, update_iter2: int = UPDATE_ITER2,
          local_fc: bool = True, local_out: bool = True, local_iter: int = LOCAL_ITER, lambda2: float = LAMBDA2,
          batch_size: int = BATCH) -> dict:
    """OSSCAR: remove ``fraction`` of the decoder-layer parameters of ``model`` in place (see the module docstring)."""
    started = time.time()
    layers = list(model.model.layers)
    before = decoder_params(model)
    drop_g, drop_c = uniform_counts(layers, fraction, before)
    device = next(model.parameters()).device
    inputs = batch_layer_inputs(model, micro_batches(calib, batch_size, device))
    kept_groups, kept_channels, per_layer = [], [], []
    for layer in layers:
        grams, _ = input_grams(layer, inputs)  # the dense layer on the pruned stream
        plan = ((units.ATTENTION, PATHS[0], drop_g, update_iter2, local_out, LOCAL_SWAP_OUT),
                (units.MLP, PATHS[1], drop_c, update_iter, local_fc, update_iter))
        stats, keep_g = {}, list(range(units.num_groups(layer)))
        for kind, path, drop, upd, local, swap in plan:
            if drop == 0:
                continue
            lin = units.linear(layer, path)
            num_cin = units.unit_count(layer, kind)
            w, pruned, stats[kind] = osscar_prune(lin.weight, grams[path], num_cin, num_cin - drop, upd, local, swap,
                                                  local_iter, lambda2)
            lin.weight.data = w.to(lin.weight.dtype).contiguous()
            keep = (~pruned).nonzero().flatten().tolist()
            surgery.keep_units(layer, kind, keep)
            if kind == units.ATTENTION:
                keep_g = keep
        kept_groups.append(keep_g)
        kept_channels.append(units.num_channels(layer))
        per_layer.append(stats)
        inputs = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]  # pruned layer's output
    del inputs
    surgery.remove_layers(model, [])  # syncs a per-layer config with the new shapes (removes nothing)
    after = sum(decoder_params_of(layer) for layer in model.model.layers)
    return peer_result("osscar", fraction, before, after, started,
                       options={"groups_removed_per_layer": drop_g, "channels_removed_per_layer": drop_c,
                                "update_iter": update_iter, "update_iter2": update_iter2, "local_fc": local_fc,
                                "local_out": local_out, "local_iter": local_iter, "lambda2": lambda2,
                                "calib_windows": list(calib.shape)},
                       kept_groups=kept_groups, kept_groups_per_layer=[len(k) for k in kept_groups],
                       kept_channels_per_layer=kept_channels, layer_stats=per_layer)

