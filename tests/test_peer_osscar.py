"""OSSCAR peer (benchmarks/peers/osscar.py) on tiny random Llama models: budget and exact count, shapes, logits,
determinism, the uniform budget rule, the exactness of the swap-out / swap-in objective changes, the least-squares
update against plain removal, the local search against the greedy start and against brute force, and the pruned
calibration stream."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import TINY_CHANNEL_PARAMS as CHANNEL
from helpers import TINY_GROUP_PARAMS as GROUP
from helpers import peer_calib as calib
from helpers import tiny_llama

from benchmarks.peers import flap, osscar
from gaqprune.core.layers import batch_layer_inputs, micro_batches


def problem(seed: int, num_cin: int, ksize: int, tokens: int = 80, out: int = 4):
    """A random layer-wise problem with correlated inputs: ``(B, damped XtX, XtY)``."""
    g = torch.Generator().manual_seed(seed)
    n = num_cin * ksize
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    return osscar.prepare(w, x.T @ x)


def mask_of(removed, num_cin: int) -> torch.Tensor:
    return torch.tensor([u in set(removed) for u in range(num_cin)])


@pytest.mark.parametrize(("fraction", "groups", "channels"), [(0.2, 1, 118), (0.4, 1, 82)])
def test_budget_exact_count_shapes_and_logits(fraction, groups, channels):
    model = tiny_llama()
    before = flap.decoder_params(model)
    info = osscar.prune(model, calib(), fraction)
    after = flap.decoder_params(model)
    assert info["decoder_params_before"] == before and info["decoder_params_after"] == after
    assert abs((1 - after / before) - fraction) <= 0.005
    # 20 %: 2 - int(2 * 0.8) = 1 group, then round((27955.2 - 4 * 5120) / (4 * 192)) = 10 channels per layer
    assert after == before - 4 * ((2 - groups) * GROUP + (128 - channels) * CHANNEL)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.k_proj.out_features == attn.v_proj.out_features == groups * 8
        assert attn.q_proj.out_features == attn.o_proj.in_features == 4 * groups * 8  # 4 query heads per KV head kept
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == channels
        assert attn.o_proj.out_features == mlp.down_proj.out_features == 64
        assert attn.o_proj.bias is None and mlp.down_proj.bias is None
    assert info["kept_groups_per_layer"] == [groups] * 4 and info["kept_channels_per_layer"] == [channels] * 4
    weights = sum(lin.weight.numel() for lin in model.model.layers.modules() if isinstance(lin, torch.nn.Linear))
    assert after == weights + 4 * 2 * 64
    logits = model(calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_uniform_counts():
    model = tiny_llama()
    layers, before = list(model.model.layers), flap.decoder_params(model)
    assert osscar.uniform_counts(layers, 0.2, before) == (1, 10)
    assert osscar.uniform_counts(layers, 0.5, before) == (1, 64)
    # 5 %: one group per layer alone would remove 14.6 %, so the attention is left whole
    assert osscar.uniform_counts(layers, 0.05, before) == (0, 9)


def test_deterministic():
    a, b = tiny_llama(), tiny_llama()
    ia, ib = osscar.prune(a, calib(), 0.3), osscar.prune(b, calib(), 0.3)
    assert ia["kept_groups"] == ib["kept_groups"]
    ids = calib(2, 2, 16)
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(("num_cin", "ksize"), [(7, 1), (5, 3)])
def test_removal_and_addition_estimates_are_exact(num_cin, ksize):
    """The swap-out cost and the swap-in gain are the exact objective changes (least-squares refit on both sides)."""
    _, xtx, xty = problem(0, num_cin, ksize)
    pruned = mask_of([1, 4], num_cin)
    b = osscar.refit(xtx, xty, pruned, ksize)
    f = osscar.objective(b, xtx, xty)
    cost = osscar.removal_costs(b, osscar.support_inverse(xtx, pruned, ksize), pruned, ksize)
    gain = osscar.addition_gains(xtx, xty, pruned, ksize)
    for u in range(num_cin):
        other = pruned.clone()
        other[u] = not pruned[u]
        f_other = osscar.objective(osscar.refit(xtx, xty, other, ksize), xtx, xty)
        if pruned[u]:
            assert gain[u].item() == pytest.approx(f - f_other, rel=1e-7)
        else:
            assert cost[u].item() == pytest.approx(f_other - f, rel=1e-7)
            assert gain[u] == 0


def test_objective_is_half_the_reconstruction_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    b, xtx, xty = osscar.prepare(w, x.T @ x, lambda2=0.0)
    b2 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    const = 0.5 * float(torch.sum(b * (xtx @ b)))
    assert osscar.objective(b2, xtx, xty) + const == pytest.approx(0.5 * float(((x @ b - x @ b2) ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize(("num_cin", "ksize", "keep", "update_iter"), [(30, 1, 18, 4), (6, 4, 4, 1)])
def test_least_squares_update_beats_plain_removal(num_cin, ksize, keep, update_iter):
    b, xtx, xty = problem(1, num_cin, ksize, tokens=200)
    b_sol, pruned = osscar.fastprune(b, xtx, xty, num_cin, keep, update_iter)
    assert int((~pruned).sum()) == keep
    rows = osscar.rows_of(pruned.nonzero().flatten(), ksize)
    assert torch.all(b_sol[rows] == 0)
    plain = b.clone()
    plain[rows] = 0
    assert osscar.objective(b_sol, xtx, xty) < osscar.objective(plain, xtx, xty)
    assert torch.allclose(b_sol, osscar.refit(xtx, xty, pruned, ksize))


def brute_force(xtx, xty, num_cin, keep, ksize):
    return min(osscar.objective(osscar.refit(xtx, xty, mask_of(set(range(num_cin)) - set(s), num_cin), ksize), xtx, xty)
               for s in itertools.combinations(range(num_cin), keep))


def test_local_search_improves_on_the_greedy_start_and_reaches_the_brute_force_optimum():
    found = {"fastprune": 0, "local": 0}
    for seed in range(40):
        for num_cin, ksize, keep in ((8, 1, 4), (6, 2, 3)):
            b, xtx, xty = problem(seed, num_cin, ksize, tokens=40)
            b_fast, pruned = osscar.fastprune(b, xtx, xty, num_cin, keep, 1)
            b_local, best, _ = osscar.local_search(pruned, xtx, xty, ksize, num_swap=1)
            f_fast, f_local = osscar.objective(b_fast, xtx, xty), osscar.objective(b_local, xtx, xty)
            optimum = brute_force(xtx, xty, num_cin, keep, ksize)
            assert int((~best).sum()) == keep
            assert optimum <= f_local + 1e-9 * abs(optimum) and f_local <= f_fast + 1e-9 * abs(f_fast)
            found["fastprune"] += abs(f_fast - optimum) <= 1e-9 * abs(optimum)
            found["local"] += abs(f_local - optimum) <= 1e-9 * abs(optimum)
    assert found["local"] >= found["fastprune"] + 8 and found["local"] >= 55  # of 80 problems
    # a tiny case where the greedy start misses and one swap finds the exhaustive optimum
    for seed in range(40):
        b, xtx, xty = problem(seed, 6, 2, tokens=40)
        b_fast, pruned = osscar.fastprune(b, xtx, xty, 6, 3, 1)
        optimum = brute_force(xtx, xty, 6, 3, 2)
        if abs(osscar.objective(b_fast, xtx, xty) - optimum) <= 1e-9 * abs(optimum):
            continue  # the greedy start is already optimal
        b_local, _, swaps = osscar.local_search(pruned, xtx, xty, 2, num_swap=1)
        if osscar.objective(b_local, xtx, xty) == pytest.approx(optimum, rel=1e-9):
            assert swaps >= 1
            break
    else:
        pytest.fail("no tiny case where the local search repairs the greedy start")


def test_osscar_lowers_the_calibration_reconstruction_error_of_a_real_layer():
    model = tiny_llama(3)
    layer = model.model.layers[0]
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    xs = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda _m, a, _o: xs.append(a[0].reshape(-1, 128).double()))
    grams, _ = osscar.input_grams(layer, inputs)
    handle.remove()
    x = torch.cat(xs)
    assert torch.allclose(grams["mlp.down_proj"], x.T @ x)
    w = layer.mlp.down_proj.weight.detach().double()
    w_new, pruned, stats = osscar.osscar_prune(w, grams["mlp.down_proj"], 128, 64, 10, True, 10)
    assert stats["objective"] <= stats["objective_fastprune"]
    kept = ~pruned
    target = x @ w.T
    ls = ((target - x[:, kept] @ w_new[:, kept].T) ** 2).sum()
    plain = ((target - x[:, kept] @ w[:, kept].T) ** 2).sum()
    assert ls < 0.75 * plain


def test_layers_are_pruned_on_the_pruned_stream():
    """Layer 0's statistics are the dense model's; layer 1's come from the PRUNED layer 0's outputs, both projections
    from one pass of the dense layer."""
    dense, model = tiny_llama(), tiny_llama()
    osscar.prune(model, calib(), 0.4)
    inputs = batch_layer_inputs(dense, micro_batches(calib(), osscar.BATCH, "cpu"))
    drop_g, drop_c = osscar.uniform_counts(list(dense.model.layers), 0.4, flap.decoder_params(dense))

    def prune_copy(layer, inputs_):
        grams, _ = osscar.input_grams(layer, inputs_)
        out = {}
        for path, num_cin, drop, upd, swap in (("self_attn.o_proj", 2, drop_g, 2, 5), ("mlp.down_proj", 128, drop_c, 10, 10)):
            w, pruned, _ = osscar.osscar_prune(getattr(getattr(layer, path.split(".")[0]), path.split(".")[1]).weight,
                                               grams[path], num_cin, num_cin - drop, upd, True, swap)
            out[path] = w[:, ~pruned.repeat_interleave(w.shape[1] // num_cin)].float()
        return out

    layer0 = dense.model.layers[0]
    expected0 = prune_copy(layer0, inputs)
    assert torch.equal(expected0["mlp.down_proj"], model.model.layers[0].mlp.down_proj.weight)
    assert torch.equal(expected0["self_attn.o_proj"], model.model.layers[0].self_attn.o_proj.weight)
    pruned0 = copy.deepcopy(model.model.layers[0])
    pruned_out = [(flap.layer_output(pruned0, h, kw), kw) for h, kw in inputs]
    dense_out = [(flap.layer_output(layer0, h, kw), kw) for h, kw in inputs]
    on_pruned = prune_copy(dense.model.layers[1], pruned_out)
    on_dense = prune_copy(dense.model.layers[1], dense_out)
    assert torch.equal(on_pruned["mlp.down_proj"], model.model.layers[1].mlp.down_proj.weight)
    assert not torch.allclose(on_dense["mlp.down_proj"], on_pruned["mlp.down_proj"])
