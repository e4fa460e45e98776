"""Least-squares compensation: refit the weights that read pruned units so a layer's output barely changes.

For a Linear ``y = x W^T`` whose input units ``K`` are kept (o_proj after removing GQA groups,
down_proj after removing MLP channels) the refit weight solves

    min_W'  || X_K W'^T - X W^T ||^2 + lam ||W' - W_K||^2  =>  W'^T = (G_KK + lam I)^-1 (G_K: W^T + lam W_K^T),

with G = X^T X the Gram matrix of the layer's dense input activations on calibration tokens and
lam = ridge * mean(diag G_KK). The ridge pulls toward the *original* kept columns W_K (not toward 0),
so few calibration tokens (fewer than input features) cannot drag the weights far from the dense ones.
Only G is accumulated (no token-sized copies). Layers are processed
in order on the calibration stream of the *already pruned* earlier layers, so each refit sees the
inputs the final model will give it. Everything is deterministic for fixed windows and hardware.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Stop(Exception):
    pass


def capture_layer_inputs(hf_model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states entering decoder layer 0 and the keyword arguments HF passes to every layer, per micro-batch."""
    captured: list[tuple[torch.Tensor, dict]] = []
    first = hf_model.model.layers[0]

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(hf_model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                try:
                    hf_model.model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def input_gram(layer: nn.Module, linear: nn.Linear, batches: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """Gram matrix X^T X (float64) of ``linear``'s input while ``layer`` runs over ``batches``."""
    gram = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device)

    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        gram.addmm_(x.T, x)

    handle = linear.register_forward_pre_hook(hook)
    try:
        run_layer(layer, batches)
    finally:
        handle.remove()
    return gram


def run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The layer's outputs for every micro-batch (same kwargs)."""
    with torch.no_grad():
        return [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in batches]


def refit_weight(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares weight ``[out, len(kept)]`` reading only input positions ``kept`` (see module docstring)."""
    kept = kept.to(gram.device)
    g_kk = gram.index_select(0, kept).index_select(1, kept)
    g_kf = gram.index_select(0, kept)
    lam = ridge * g_kk.diagonal().mean().clamp(min=1e-12)
    g_kk = g_kk + lam * torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    w = weight.detach().double()
    rhs = g_kf @ w.T + lam * w.index_select(1, kept).T
    solution = torch.linalg.solve(g_kk, rhs)  # [kept, out]
    return solution.T.to(weight.dtype).contiguous()


def prune_with_refit(layer: nn.Module, linear_getter: Callable[[], nn.Linear], prune: Callable[[], None],
                     kept_inputs: torch.Tensor, batches: list[tuple[torch.Tensor, dict]], ridge: float) -> None:
    """Accumulate the dense input Gram of the reading Linear, apply ``prune``, then refit the reading Linear."""
    dense = linear_getter()
    gram = input_gram(layer, dense, batches)
    weight = dense.weight.detach().clone()
    prune()
    pruned = linear_getter()
    with torch.no_grad():
        pruned.weight.copy_(refit_weight(weight, gram, kept_inputs, ridge))
