"""SlimGPT peer (benchmarks/peers/slimgpt.py) on tiny random Llama models: budget and exact count, shapes, logits,
determinism, the log-increasing schedule, the OBS update (exact least squares, better than plain removal), the
grouped-Cholesky head selection against brute force, and the pruned calibration stream."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import TINY_CHANNEL_PARAMS as CHANNEL
from helpers import TINY_GROUP_PARAMS as GROUP
from helpers import peer_calib as calib
from helpers import tiny_llama

from benchmarks.peers import flap, slimgpt
from gaqprune.core.layers import batch_layer_inputs, micro_batches


def reconstruction_error(w: torch.Tensor, h: torch.Tensor, w_new: torch.Tensor) -> float:
    """``||W X - W' X||^2 = tr((W - W') H (W - W')^T)`` for ``H = X X^T``."""
    d = (w - w_new).double()
    return float(torch.trace(d @ h.double() @ d.T))


def least_squares(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """argmin over ``W'`` with columns outside ``keep`` zero of ``tr((W - W') H (W - W')^T)``: ``W H_:K H_KK^-1``."""
    out = torch.zeros_like(w, dtype=torch.float64)
    out[:, keep] = w.double() @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
    return out


def damped(h: torch.Tensor, percdamp: float = slimgpt.PERCDAMP) -> torch.Tensor:
    return h + percdamp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)


@pytest.mark.parametrize("fraction", [0.3, 0.4])
def test_budget_exact_count_shapes_and_logits(fraction):
    model = tiny_llama()
    before = flap.decoder_params(model)
    info = slimgpt.prune(model, calib(), fraction)
    after = flap.decoder_params(model)
    assert info["decoder_params_before"] == before and info["decoder_params_after"] == after
    assert abs((1 - after / before) - fraction) <= 0.005
    removed = 0
    for layer, s, groups, channels in zip(model.model.layers, info["sparsities"], info["kept_groups_per_layer"],
                                          info["kept_channels_per_layer"], strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.k_proj.out_features == attn.v_proj.out_features == groups * 8
        assert attn.q_proj.out_features == attn.o_proj.in_features == 4 * groups * 8  # 4 query heads per KV head kept
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == channels
        assert attn.q_proj.in_features == attn.k_proj.in_features == mlp.gate_proj.in_features == 64
        assert attn.o_proj.out_features == mlp.down_proj.out_features == 64
        assert attn.o_proj.bias is None and mlp.down_proj.bias is None  # OBS updates weights, adds no bias
        # the official targets: round(G s) groups and round(C s) channels at the layer's ratio
        assert (2 - groups, 128 - channels) == (round(2 * s), round(128 * s))
        removed += (2 - groups) * GROUP + (128 - channels) * CHANNEL
    assert after == before - removed
    weights = sum(lin.weight.numel() for lin in model.model.layers.modules() if isinstance(lin, torch.nn.Linear))
    assert after == weights + 4 * 2 * 64  # exact count: the kept weights + the RMSNorms
    logits = model(calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_expected_units_at_40_percent():
    """s_max solved for 40 %: the schedule, the units per layer and the parameter count, written out."""
    model = tiny_llama()
    info = slimgpt.prune(model, calib(), 0.4)
    s = info["sparsities"]
    assert s == pytest.approx(slimgpt.log_schedule(4, info["options"]["max_sparsity"]))
    assert info["kept_groups_per_layer"] == [2, 1, 1, 1]
    assert info["kept_channels_per_layer"] == [128 - round(128 * x) for x in s]
    assert info["decoder_params_after"] == 139776 - 3 * GROUP - sum(round(128 * x) for x in s) * CHANNEL


def test_log_increase_schedule():
    # the README's 20 % setting on LLaMA-7B (32 layers): s_l = 0.0625 + 0.1875 ln(1 + l) / ln(32), mean ~ 0.2
    s = slimgpt.log_schedule(32, 0.25)
    assert s == pytest.approx([0.0625 + 0.1875 * math.log(1 + i) / math.log(32) for i in range(32)])
    assert sum(s) / 32 == pytest.approx(0.2004, abs=1e-4)
    assert all(a < b for a, b in zip(s, s[1:], strict=False)) and s[-1] == pytest.approx(0.25)
    model = tiny_llama()
    s_max, sched = slimgpt.solve_schedule(list(model.model.layers), 0.4 * flap.decoder_params(model))
    assert sched[0] == pytest.approx(s_max / 4) and sched[-1] == pytest.approx(s_max)


def test_deterministic():
    a, b = tiny_llama(), tiny_llama()
    ia, ib = slimgpt.prune(a, calib(), 0.4), slimgpt.prune(b, calib(), 0.4)
    assert ia["kept_groups"] == ib["kept_groups"] and ia["kept_channels_per_layer"] == ib["kept_channels_per_layer"]
    ids = calib(2, 2, 16)
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(("headsize", "units_", "drop"), [(1, 40, 13), (4, 6, 2)])
def test_obs_update_is_the_least_squares_refit_and_beats_plain_removal(headsize, units_, drop):
    g = torch.Generator().manual_seed(0)
    n = headsize * units_
    x = torch.randn(300, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(7, n, generator=g, dtype=torch.float64)
    h = x.T @ x
    w_new, mask = slimgpt.struct_prune(w, h, headsize, drop)
    assert int(mask.sum()) == drop * headsize and torch.all(w_new[:, mask] == 0)
    assert torch.equal(mask.view(-1, headsize).all(1), mask.view(-1, headsize).any(1))  # whole heads
    keep = (~mask).nonzero().flatten()
    # the batched OBS removals (local + global updates) end at the exact least-squares refit of the kept columns
    assert torch.allclose(w_new, least_squares(w, damped(h), keep), atol=1e-8, rtol=1e-6)
    plain = w.clone()
    plain[:, mask] = 0
    assert reconstruction_error(w, h, w_new) < 0.8 * reconstruction_error(w, h, plain)


def test_obs_update_lowers_the_calibration_reconstruction_error_of_a_real_layer():
    model = tiny_llama(3)
    layer = model.model.layers[0]
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    xs = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, 128).double()))
    for hidden, kw in inputs:
        flap.layer_output(layer, hidden, kw)
    handle.remove()
    x = torch.cat(xs)  # [tokens, 128]
    h = slimgpt.hessian(layer, inputs, "mlp.down_proj")
    assert torch.allclose(h, x.T @ x)
    w = layer.mlp.down_proj.weight.detach().double()
    w_new, mask = slimgpt.struct_prune(w, h, 1, 64)
    kept = ~mask
    target = x @ w.T
    obs = ((target - x[:, kept] @ w_new[:, kept].T) ** 2).sum()
    plain = ((target - x[:, kept] @ w[:, kept].T) ** 2).sum()
    assert obs < 0.75 * plain


def test_head_criterion_is_the_grouped_cholesky():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(9, 9, generator=g, dtype=torch.float64)
    hinv = a @ a.T + torch.eye(9, dtype=torch.float64)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    errors = slimgpt.head_errors(w, hinv, 3)
    for head in range(3):
        block = hinv[3 * head:3 * head + 3, 3 * head:3 * head + 3]
        chol = torch.linalg.cholesky(block)
        for k in range(3):
            j = 3 * head + k
            assert errors[j].item() == pytest.approx(float((w[:, j] ** 2).sum() / chol[k, k] ** 2), rel=1e-12)
    assert torch.allclose(slimgpt.head_errors(w, hinv, 1), (w**2).sum(0) / hinv.diagonal())


def brute_force_best(w, h, headsize):
    """The head whose removal (with the least-squares refit of the rest) loses the least: exhaustive."""
    heads = w.shape[1] // headsize
    errs = []
    for head in range(heads):
        keep = torch.tensor([c for c in range(w.shape[1]) if c // headsize != head])
        errs.append(reconstruction_error(w, h, least_squares(w, h, keep)))
    return min(range(heads), key=errs.__getitem__)


def test_single_column_choice_matches_brute_force():
    """For channels (headsize 1) the OBS error W_j^2 / Hinv_jj is exact: the first pick is the brute-force best."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(60, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
        w = torch.randn(5, 8, generator=g, dtype=torch.float64)
        h = x.T @ x
        _, mask = slimgpt.struct_prune(w, h, 1, 1, percdamp=0.0)
        assert int(mask.nonzero()[0]) == brute_force_best(w, h, 1)


def test_grouped_head_choice_matches_brute_force():
    # a tiny case: 3 heads of 2 columns, correlated inputs; the pick is the exhaustive best
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    h = x.T @ x
    _, mask = slimgpt.struct_prune(w, h, 2, 1, percdamp=0.0)
    assert int(mask.nonzero()[0]) // 2 == brute_force_best(w, h, 2)
    # over many random cases the grouped Cholesky agrees with brute force far more often than scoring each column by
    # its own Hinv_jj (the paper's motivation for the grouped decomposition)
    grouped = naive = 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
        w = torch.randn(5, 12, generator=g, dtype=torch.float64)
        h = x.T @ x
        hinv = torch.linalg.inv(h)
        best = brute_force_best(w, h, 4)
        grouped += int(slimgpt.head_errors(w, hinv, 4).view(3, 4).sum(1).argmin()) == best
        naive += int(slimgpt.head_errors(w, hinv, 1).view(3, 4).sum(1).argmin()) == best
    assert grouped >= 65 and grouped >= naive + 20


def test_layers_are_pruned_on_the_pruned_stream():
    """Layer 1 of the pruned model is what prune_layer gives on the PRUNED layer 0's outputs, not the dense ones."""
    dense, model = tiny_llama(), tiny_llama()
    info = slimgpt.prune(model, calib(), 0.4)
    inputs = batch_layer_inputs(dense, micro_batches(calib(), slimgpt.BATCH, "cpu"))
    layer0 = copy.deepcopy(dense.model.layers[0])
    slimgpt.prune_layer(layer0, inputs, info["sparsities"][0])
    assert torch.equal(layer0.mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)
    pruned_out = [(flap.layer_output(layer0, h, kw), kw) for h, kw in inputs]
    dense_out = [(flap.layer_output(dense.model.layers[0], h, kw), kw) for h, kw in inputs]
    on_pruned, on_dense = copy.deepcopy(dense.model.layers[1]), copy.deepcopy(dense.model.layers[1])
    slimgpt.prune_layer(on_pruned, pruned_out, info["sparsities"][1])
    slimgpt.prune_layer(on_dense, dense_out, info["sparsities"][1])
    assert torch.equal(on_pruned.self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)
    assert torch.equal(on_pruned.mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    assert not torch.allclose(on_dense.mlp.down_proj.weight, on_pruned.mlp.down_proj.weight)


def test_mlp_is_calibrated_after_the_attention_is_pruned():
    """The down_proj Hessian comes from a pass through the PRUNED attention (model_slimming's sequential list)."""
    model = tiny_llama()
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    layer = model.model.layers[0]
    calls = []
    original = slimgpt.hessian

    def spy(layer_, inputs_, path):
        calls.append((path, layer_.self_attn.k_proj.out_features))
        return original(layer_, inputs_, path)

    slimgpt.hessian = spy
    try:
        pruned = copy.deepcopy(layer)
        slimgpt.prune_layer(pruned, inputs, 0.5)
    finally:
        slimgpt.hessian = original
    assert calls == [("self_attn.o_proj", 16), ("mlp.down_proj", 8)]  # MLP statistics after one group went
