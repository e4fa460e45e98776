"""Least-squares compensation: refit the weights that read pruned units so the pruned model stays close to the dense one.

For a Linear ``y = x W^T`` whose input units ``K`` are kept (o_proj after removing GQA groups, down_proj after
removing MLP channels), with ``X`` its input on the calibration stream of the *already pruned* earlier layers,
the refit weight solves

    min_W'  || X_K W'^T - T ||^2 + lam ||W' - W_K||^2  =>  W'^T = (G_KK + lam I)^-1 (X_K^T T + lam W_K^T),

with G = X^T X and lam = ridge * mean(diag G_KK). The ridge pulls toward the *original* kept columns W_K (not
toward 0), so few calibration tokens cannot drag the weights far from the dense ones. Two targets ``T``:

* ``lstsq``: T = X W^T, the layer's own dense output on the pruned stream (X_K^T T = G_K: W^T, so only G is
  accumulated);
* ``residual``: the dense model's residual stream. For o_proj T = h_mid,dense - h_in,pruned (the attention output
  that brings the pruned stream after the attention's residual add back to the dense model's); for down_proj
  T = h_out,dense - h_mid,pruned. Each refit also corrects the drift that earlier pruned layers left in the
  residual stream. It needs the dense stream next to the pruned one (each still-dense layer runs once more on it)
  and the cross term X_K^T T; neither keeps a token-sized copy beyond the calibration hidden states.

Layers are processed in order; every Linear's statistics stop the layer's forward at that Linear (no wasted
work). Everything is deterministic for fixed windows and hardware.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gaqprune.core.layers import batch_layer_inputs, call_layer, micro_batches

MIN_RIDGE = 1e-6  # smallest relative ridge the refit uses (see refit_weight)
FIT_ROWS = 512  # rows of X_K^T X W^T formed at once in float64 (refit_weight)


class _Stop(Exception):
    pass


def capture_layer_inputs(hf_model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states entering decoder layer 0 and the keyword arguments HF passes to every layer, per micro-batch."""
    return batch_layer_inputs(hf_model, micro_batches(windows, batch_size, next(hf_model.parameters()).device))


def run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The layer's outputs for every micro-batch (same kwargs)."""
    with torch.no_grad():
        return [(call_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in batches]


def _run_to(layer: nn.Module, linear: nn.Linear, batches: list[tuple[torch.Tensor, dict]],
            on_input: Callable[[int, torch.Tensor], None], before: Callable[[int, torch.Tensor], None] | None = None,
            before_module: nn.Module | None = None) -> None:
    """Run ``layer`` over ``batches`` up to ``linear`` and call ``on_input(batch_index, x)`` with its input (then stop);
    ``before(batch_index, h)`` sees the input of ``before_module`` earlier in the same pass."""
    current = {"b": 0}

    def at_linear(_module, args):
        on_input(current["b"], args[0])
        raise _Stop

    handles = [linear.register_forward_pre_hook(at_linear)]
    if before is not None:
        handles.append(before_module.register_forward_pre_hook(lambda _m, args: before(current["b"], args[0])))
    try:
        with torch.no_grad():
            for b, (hidden, kwargs) in enumerate(batches):
                current["b"] = b
                try:
                    call_layer(layer, hidden, kwargs)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


class LinearStats:
    """Gram ``X^T X`` of a Linear's input and, with targets, the cross term ``X^T T``.

    Accumulated in float32: these products are the refit's bulk (tokens x in_features^2 multiply-adds, 3.4 TFLOP
    per down_proj of an 8B model over 8,192 tokens), and float64 runs them at 1/64 of the float32 rate on most
    GPUs that are not HPC parts (L40S, RTX, A10). The ridge makes the solve well-conditioned, so float32 sums are
    exact enough; the solve itself (``refit_weight``) is float64.
    """

    def __init__(self, linear: nn.Linear, with_cross: bool):
        kw = {"dtype": torch.float32, "device": linear.weight.device}
        self.gram = torch.zeros(linear.in_features, linear.in_features, **kw)
        self.cross = torch.zeros(linear.in_features, linear.out_features, **kw) if with_cross else None

    def add(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.T, x)
        if target is not None:
            self.cross.addmm_(x.T, target.reshape(-1, target.shape[-1]).float())


def refit_weight(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float,
                 cross: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares weight ``[out, len(kept)]`` reading only input positions ``kept`` (see module docstring).

    ``cross`` = X^T T ``[in, out]`` for an explicit target; None: the target is the dense output X W^T.
    """
    held = LinearStats.__new__(LinearStats)
    held.gram, held.cross = gram, cross
    return _solve(weight, held, kept, ridge)


def _solve(weight: torch.Tensor, stats: LinearStats, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """``refit_weight`` on ``stats``, whose Gram matrix and cross term it drops (``stats.gram = None``) as soon as the
    solve's own float64 matrices are built: the refit is the largest transient of an offloaded run, so its peak is
    the k x k float64 system and the right-hand side, not those plus the float32 statistics. G_KK and the right-hand
    side are built from row blocks of G, the ridge goes onto the diagonal in place, and the Cholesky factor overwrites
    G_KK."""
    gram, cross = stats.gram, stats.cross
    stats.gram = stats.cross = None
    kept = kept.to(gram.device)
    k = len(kept)
    g_kk = torch.empty(k, k, dtype=torch.float64, device=gram.device)
    w = None
    if cross is None:  # X_K^T T = G_K: W^T
        w = weight.detach().double()
        fit = torch.empty(k, w.shape[0], dtype=torch.float64, device=gram.device)
    else:
        fit = cross.index_select(0, kept).double()
    del cross
    for start in range(0, k, FIT_ROWS):
        block = gram.index_select(0, kept[start : start + FIT_ROWS]).double()
        g_kk[start : start + FIT_ROWS] = block.index_select(1, kept)
        if w is not None:
            torch.mm(block, w.T, out=fit[start : start + FIT_ROWS])
        del block
    del gram, w
    # With fewer calibration tokens than kept inputs G_KK is singular, and at ridge 0 the solve returns whatever the
    # float32 round-off in G dictates (weights 80x the dense ones); MIN_RIDGE keeps it the least-squares solution
    # nearest the original weights, and is far below any ridge that changes a well-determined fit.
    lam = max(ridge, MIN_RIDGE) * g_kk.diagonal().mean().clamp(min=1e-12)
    g_kk.diagonal().add_(lam)
    fit += lam * weight.detach().index_select(1, kept.to(weight.device)).T.double()
    # G_KK + lam I is symmetric positive definite: its Cholesky factor overwrites it (no second k x k copy)
    solution = torch.cholesky_solve(fit, torch.linalg.cholesky(g_kk, out=g_kk))  # [kept, out]
    return solution.T.to(weight.dtype).contiguous()


def _refit(linear_getter: Callable[[], nn.Linear], prune: Callable[[], None], stats: LinearStats, kept: torch.Tensor,
           ridge: float) -> None:
    weight = linear_getter().weight.detach().clone()
    prune()
    with torch.no_grad():
        linear_getter().weight.copy_(_solve(weight, stats, kept, ridge))


def _weight_target(target: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """What the refit weight must produce for ``linear`` to output ``target``: the target less the bias the Linear
    keeps adding (Llama's attention_bias / mlp_bias)."""
    return target if linear.bias is None else target - linear.bias.detach().float()


def prune_layer_with_refit(layer: nn.Module, attention: tuple[Callable[[], None], torch.Tensor] | None,
                           mlp: tuple[Callable[[], None], torch.Tensor] | None, stream: list[tuple[torch.Tensor, dict]],
                           ridge: float, dense: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
    """Prune one layer's attention and/or MLP (``(prune_fn, kept input columns of the reading Linear)`` each) and
    refit o_proj / down_proj on ``stream`` (the pruned model's input micro-batches of this layer).

    ``dense`` = (mid, out): the dense model's hidden states after this layer's attention residual add and after
    the layer, per micro-batch: the ``residual`` target. None: the ``lstsq`` target.
    """
    if attention is not None:
        o_proj = layer.self_attn.o_proj
        stats = LinearStats(o_proj, with_cross=dense is not None)

        def at_o(b: int, x: torch.Tensor) -> None:
            stats.add(x, None if dense is None else _weight_target(dense[0][b].float() - stream[b][0].float(), o_proj))

        _run_to(layer, o_proj, stream, at_o)
        _refit(lambda: layer.self_attn.o_proj, attention[0], stats, attention[1], ridge)
    if mlp is not None:
        down = layer.mlp.down_proj
        stats = LinearStats(down, with_cross=dense is not None)
        mid: dict[int, torch.Tensor] = {}

        def at_down(b: int, x: torch.Tensor) -> None:
            stats.add(x, None if dense is None else _weight_target(dense[1][b].float() - mid.pop(b).float(), down))

        _run_to(layer, down, stream, at_down, before=mid.__setitem__, before_module=layer.post_attention_layernorm)
        _refit(lambda: layer.mlp.down_proj, mlp[0], stats, mlp[1], ridge)


def run_dense_layer(layer: nn.Module, stream: list[tuple[torch.Tensor, dict]]):
    """The still-dense layer on the dense stream: (mid-layer hidden states per micro-batch, the next dense stream)."""
    mid: list[torch.Tensor] = []
    handle = layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args: mid.append(args[0].detach()))
    try:
        out = run_layer(layer, stream)
    finally:
        handle.remove()
    return mid, out
