"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models").

Follows the official code, github.com/CASIA-IVA-Lab/FLAP at commit 3bb57db3449dd2fa04a5c2192de80e87e33be2b1
(``lib/prune.py``: ``prune_flap``, ``compress``, ``metrics``; ``lib/layerwrapper.py``: ``BiasGPT``; ``main.py``:
defaults ``--metrics WIFV --structure AL-AM``).

Notation: for decoder layer ``l`` and each of its two output projections ``W`` (``o_proj``, input = the concatenated
attention heads; ``down_proj``, input = the MLP channels), ``x_t`` is ``W``'s input at calibration token ``t``
(``N`` tokens in all), ``mu_j = mean_t x_{t,j}`` (``BiasGPT.baseline_inp``).

1. Calibration stream (``prune_flap``): every layer's statistics are gathered on the DENSE model: layer ``l`` sees
   the output of the unpruned layers ``0 .. l-1`` (``outs[j] = layer(inps[j])`` before any ``compress``; all layers
   are compressed only at the end, after the global ranking). Wanda-sp, by contrast, feeds the pruned stream.
2. Fluctuation metric WIFV (``metrics['WIFV']``): ``S_j = Var_t(x_{t,j}) * ||W[:, j]||_2^2`` with the sample variance
   ``Var_t = 1/(N-1) sum_t (x_{t,j} - mu_j)^2``.
3. Per layer and module the scores are standardised (``standarlization``): ``Z = (S - mean(S)) / std(S)`` over the
   module's input channels (unbiased std). For attention the official code squares the metric first
   (``W_metric = metrics[...] ** 2`` for ``o_proj`` only), standardises the squared per-channel values, and scores a
   head by the MEAN of its ``head_dim`` standardised channels (``reshape(L, -1, 128).mean(dim=2)``).
   GQA rule (our model has 3 query heads per KV head; FLAP was written for multi-head attention): a GQA group (one
   KV head and its query heads) is scored by the mean of the standardised channels of all its query heads, i.e. the
   mean of its heads' FLAP head scores, the same aggregation FLAP applies over a head's channels. Removing a group
   removes its query heads' ``q_proj`` rows / ``o_proj`` columns and its KV head's ``k_proj`` / ``v_proj`` rows, so
   every layer keeps the same number of query heads per KV head.
4. Adaptive structure AL-AM: the attention-group and MLP-channel scores of all layers are ranked together and the
   lowest removed until the budget is met. The official code weighs each head by its parameters relative to a
   channel (``compression_weight = 512/3`` = ``4 d_h d / 3 d`` for LLaMA-7B) and cuts where the cumulative weight
   of the kept units is closest to ``(1 - ratio)`` of the total. Here the cut is made on the exact parameter count:
   units are removed in ascending score order and the prefix whose decoder-parameter count (everything under
   ``model.model.layers``: norms and the added biases included) is closest to ``(1 - fraction)`` of the original
   is chosen; a group costs ``params_per_unit`` (``(2 q + 2) d_h d`` for ``q`` query heads per group), a channel
   ``3 d``.
5. Bias compensation (``compress(bias=True)``): a removed channel set ``R`` of ``W`` is replaced by its mean
   contribution, ``b = W[:, R] mu_R`` added as a bias of ``o_proj`` / ``down_proj``, so the pruned projection's
   output equals the dense one's on average over the calibration tokens.

Deviations, and why:

* Calibration: the harness's 128 x 128 windows (``calib``) instead of the paper's 1024 WikiText-2 samples of 128
  tokens (``main.py`` defaults ``--nsamples 2048``; the paper's scripts use 1024).
* The variance is the exact two-pass sample variance over all calibration tokens in float64. The official
  ``BiasGPT.add_batch`` keeps a running estimate per sample in which ``old_baseline_inp`` aliases the updated mean
  (so deviations are taken from the running mean) and the first sample's deviations are dropped; it approximates
  ``T * Var`` (``T`` tokens per window), a constant factor per channel that the standardisation removes.
  The baselines are kept in float32 (the official code stores them in float16).
* Every layer keeps at least one GQA group and one MLP channel (``gaqprune.core.surgery.keep_units`` never leaves a
  module empty; the official ``AL-AM`` mask could, and FLAP's code never removes whole layers): a unit that would
  empty its module is skipped in the removal order.
* A bias is added only to projections that lost at least one unit (the official modified ``modeling_llama.py``
  gives every ``o_proj`` / ``down_proj`` a bias, which is zero where nothing was removed: the same function with
  fewer parameters), and it is counted in the budget.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from gaqprune.core import surgery, units
from gaqprune.core.layers import batch_layer_inputs, call_layer, micro_batches

BATCH = 16  # calibration windows per layer call (memory only; the statistics do not depend on it)
METRICS = ("WIFV", "IFV", "WIFN")
STRUCTURES = ("AL-AM",)


def decoder_params(model) -> int:
    """Parameters under ``model.model.layers`` (norms and biases included): what ``fraction`` is measured against."""
    return sum(p.numel() for p in model.model.layers.parameters())


def layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The decoder layer's output hidden states (HF returns a tensor or, in older versions, a tuple)."""
    out = call_layer(layer, hidden, kwargs)
    return out[0] if isinstance(out, tuple) else out


class InputStats:
    """Per-input-channel sums of a Linear's inputs over all calibration tokens (float64): ``n``, ``sum x``,
    ``sum x^2``; gives the mean ``mu``, the sample variance and the squared L2 norm ``sum_t x_t^2``."""

    def __init__(self, size: int):
        self.n = 0
        self.sum = torch.zeros(size, dtype=torch.float64)
        self.sumsq = torch.zeros(size, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def variance(self) -> torch.Tensor:
        """``1/(N-1) sum_t (x_t - mu)^2``, from the sums (float64 keeps the cancellation harmless at these sizes)."""
        return ((self.sumsq - self.n * self.mean**2) / (self.n - 1)).clamp_min(0)


class Gram:
    """``X^T X`` (float64, ``[in, in]``) of a Linear's inputs over all calibration tokens (SlimGPT's and OSSCAR's
    layer-wise Hessian, unscaled)."""

    def __init__(self, size: int):
        self.gram = torch.zeros(size, size, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram.add_(x.T @ x)


@torch.no_grad()
def run_with_stats(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]],
                   paths: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj"),
                   kind: type = InputStats) -> tuple[list[torch.Tensor], dict]:
    """Run ``layer`` on every micro-batch and collect ``kind`` statistics (``InputStats`` or ``Gram``) of the inputs
    of the Linears ``paths``."""
    stats = {p: kind(units.linear(layer, p).in_features) for p in paths}
    handles = [units.linear(layer, p).register_forward_hook(lambda _m, args, _o, p=p: stats[p].add(args[0]))
               for p in paths]
    try:
        outs = [layer_output(layer, hidden, kwargs) for hidden, kwargs in inputs]
    finally:
        for h in handles:
            h.remove()
    return outs, stats


def channel_metric(weight: torch.Tensor, stats: InputStats, metric: str = "WIFV") -> torch.Tensor:
    """FLAP's per-input-channel metric (``lib/prune.py: metrics``) of a Linear with weight ``W`` ``[out, in]``.

    * ``IFV``:  ``Var_t(x_j)``;
    * ``WIFV``: ``Var_t(x_j) * sum_i W_ij^2`` (the default);
    * ``WIFN``: ``mean_i |W_ij| * sqrt(mean_t x_j^2)`` (the official code divides by the sample count, here the
      token count: a constant factor).
    """
    w = weight.detach().double()
    if metric == "IFV":
        return stats.variance
    if metric == "WIFV":
        return stats.variance * w.pow(2).sum(0)
    if metric == "WIFN":
        return (w.abs() * (stats.sumsq / stats.n).sqrt()).mean(0)
    raise ValueError(f"unknown FLAP metric {metric!r}; one of {METRICS}")


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean(x)) / std(x)`` over the last dimension (``standarlization``; unbiased std as ``torch.std``)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


def layer_scores(layer: nn.Module, stats: dict, metric: str = "WIFV") -> tuple[torch.Tensor, torch.Tensor]:
    """``(group scores [G], channel scores [C])`` of one layer, standardised per module as in ``prune_flap``:
    attention: the squared metric of each ``o_proj`` input channel, standardised over the channels, averaged over
    each GQA group's query-head channels; MLP: the metric of each ``down_proj`` input channel, standardised."""
    o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
    attn = standardise(channel_metric(o_proj.weight, stats["self_attn.o_proj"], metric) ** 2)
    groups = units.num_groups(layer)
    group_scores = attn.reshape(groups, -1).mean(1)  # o_proj columns are ordered group by group (q heads of g together)
    mlp = standardise(channel_metric(down.weight, stats["mlp.down_proj"], metric))
    return group_scores, mlp


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``W[:, R] mu_R``: the removed input channels' mean contribution to the output (``compress``'s
    ``(baseline_inp * ~mask) @ W.T``)."""
    return weight.detach().double()[:, removed] @ mean[removed]


@torch.no_grad()
def compress_layer(layer: nn.Module, keep_groups: list[int], keep_channels: list[int],
                   stats: dict | None = None, bias: bool = True) -> None:
    """Keep GQA groups ``keep_groups`` and MLP channels ``keep_channels`` of ``layer`` in place; with ``bias``,
    add the removed units' mean contribution as a bias of ``o_proj`` / ``down_proj`` (``stats`` gives the means).
    A projection that loses nothing is left as it is."""
    plan = ((units.ATTENTION, "self_attn.o_proj", keep_groups), (units.MLP, "mlp.down_proj", keep_channels))
    for kind, path, keep in plan:
        count = units.unit_count(layer, kind)
        if len(set(keep)) == count:
            continue
        if bias:
            lin = units.linear(layer, path)
            owner = next(o for o in units.owners(layer, kind) if o.path == path)
            removed = (~torch.isin(owner.unit_of, torch.as_tensor(sorted(keep)))).nonzero().flatten()
            extra = compensation_bias(lin.weight, stats[path].mean, removed).to(lin.weight.dtype)
            old = lin.bias.detach() if lin.bias is not None else torch.zeros_like(extra)
            new = nn.Linear(lin.in_features, lin.out_features, bias=True, device="meta")
            new.weight = lin.weight
            new.bias = nn.Parameter(old + extra, requires_grad=lin.weight.requires_grad)
            parent_path, _, name = path.rpartition(".")
            setattr(units.linear(layer, parent_path), name, new)
        surgery.keep_units(layer, kind, keep)


def select_global(layers: list[nn.Module], group_scores: list[torch.Tensor], channel_scores: list[torch.Tensor],
                  target_after: float, bias: bool = True) -> tuple[list[list[int]], list[list[int]], int]:
    """AL-AM: rank all groups and channels of all layers together (ascending standardised score) and remove the
    prefix of that order whose resulting decoder-parameter count is closest to ``target_after``.

    Exact accounting: removing a group frees ``params_per_unit(attention)``, a channel ``params_per_unit(mlp)``;
    the first removal in a projection adds its compensation bias (``hidden`` parameters, when ``bias`` and the
    projection has none yet). A unit that would empty its module is skipped. Returns the kept groups and channels of
    each layer and the decoder-parameter count after pruning."""
    entries = []  # (score, kind code, layer, unit): kind 0 = attention group, 1 = MLP channel
    for li, (g, c) in enumerate(zip(group_scores, channel_scores, strict=True)):
        entries += [(float(s), 0, li, u) for u, s in enumerate(g.tolist())]
        entries += [(float(s), 1, li, u) for u, s in enumerate(c.tolist())]
    entries.sort()  # ties broken by kind, layer, unit: deterministic
    kinds = (units.ATTENTION, units.MLP)
    paths = ("self_attn.o_proj", "mlp.down_proj")
    cost = [[units.params_per_unit(layer, k) for k in kinds] for layer in layers]
    left = [[units.unit_count(layer, k) for k in kinds] for layer in layers]
    has_bias = [[units.linear(layer, p).bias is not None for p in paths] for layer in layers]
    hidden = [units.linear(layer, paths[0]).out_features for layer in layers]
    params = sum(decoder_params_of(layer) for layer in layers)
    best_len, best_params, order = 0, params, []
    for _score, kind, li, u in entries:
        if left[li][kind] == 1:
            continue
        left[li][kind] -= 1
        params -= cost[li][kind]
        if bias and not has_bias[li][kind]:
            has_bias[li][kind] = True
            params += hidden[li]
        order.append((kind, li, u))
        if abs(params - target_after) < abs(best_params - target_after):
            best_len, best_params = len(order), params
    removed = [[set(), set()] for _ in layers]
    for kind, li, u in order[:best_len]:
        removed[li][kind].add(u)
    keep_groups = [[u for u in range(units.num_groups(layer)) if u not in removed[li][0]] for li, layer in enumerate(layers)]
    keep_channels = [[u for u in range(units.num_channels(layer)) if u not in removed[li][1]]
                     for li, layer in enumerate(layers)]
    return keep_groups, keep_channels, int(best_params)


def decoder_params_of(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@torch.no_grad()
def prune(model, calib: torch.Tensor, fraction: float, metrics: str = "WIFV", structure: str = "AL-AM",
          bias: bool = True, batch_size: int = BATCH) -> dict:
    """FLAP: remove ``fraction`` of the decoder-layer parameters of ``model`` in place (see the module docstring).

    ``metrics`` / ``structure`` / ``bias`` are the official options (defaults ``WIFV``, ``AL-AM``, bias
    compensation on); only the paper's default structure AL-AM is implemented."""
    if structure not in STRUCTURES:
        raise ValueError(f"only FLAP's default structure AL-AM is implemented, got {structure!r}")
    if metrics not in METRICS:
        raise ValueError(f"unknown FLAP metric {metrics!r}; one of {METRICS}")
    started = time.time()
    layers = list(model.model.layers)
    before = decoder_params(model)
    device = next(model.parameters()).device
    inputs = batch_layer_inputs(model, micro_batches(calib, batch_size, device))
    all_stats, group_scores, channel_scores = [], [], []
    for layer in layers:  # the dense stream: each layer sees the unpruned layers' outputs (prune_flap)
        outs, stats = run_with_stats(layer, inputs)
        g, c = layer_scores(layer, stats, metrics)
        all_stats.append(stats)
        group_scores.append(g)
        channel_scores.append(c)
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(outs, inputs, strict=True)]
    del inputs
    keep_groups, keep_channels, predicted = select_global(layers, group_scores, channel_scores,
                                                          (1 - fraction) * before, bias)
    for layer, kg, kc, stats in zip(layers, keep_groups, keep_channels, all_stats, strict=True):
        compress_layer(layer, kg, kc, stats, bias)
    surgery.remove_layers(model, [])  # syncs a per-layer config with the new shapes (removes nothing)
    after = decoder_params(model)
    assert after == predicted, (after, predicted)
    return peer_result("flap", fraction, before, after, started,
                       options={"metrics": metrics, "structure": structure, "bias": bias,
                                "calib_windows": list(calib.shape)},
                       kept_groups=keep_groups, kept_channels_per_layer=[len(k) for k in keep_channels],
                       kept_groups_per_layer=[len(k) for k in keep_groups])


def peer_result(method: str, fraction: float, before: int, after: int, started: float, **details) -> dict:
    """The harness's result dict of a width-only peer (no layer removed): counts, achieved share, seconds, details."""
    return {"method": method, "fraction": fraction, "decoder_params_before": before, "decoder_params_after": after,
            "achieved_fraction": 1 - after / before, "seconds": time.time() - started, "removed_layers": [], **details}
