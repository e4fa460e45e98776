"""Taylor scores equal a brute-force |w * dL/dw| per unit, computed from one plain autograd pass."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from gaqprune.core import units
from gaqprune.core.metrics import causal_nll
from gaqprune.core.taylor import taylor_scores


def brute_force(model, windows):
    """Plain autograd over all parameters, then per-unit sums written out index by index."""
    model.zero_grad()
    nll, count = causal_nll(model, windows)
    (nll / count).backward()
    hd, layer_scores = 8, {}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        s_q, s_k, s_v, s_o = ((lin.weight * lin.weight.grad).abs().double() for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        groups = []
        for g in range(2):  # 8 query heads / 2 KV heads: group g owns query heads 4g..4g+3
            q_rows = slice(g * 4 * hd, (g + 1) * 4 * hd)
            kv_rows = slice(g * hd, (g + 1) * hd)
            groups.append(s_q[q_rows].sum() + s_k[kv_rows].sum() + s_v[kv_rows].sum() + s_o[:, q_rows].sum())
        s_gate, s_up, s_down = ((lin.weight * lin.weight.grad).abs().double() for lin in (m.gate_proj, m.up_proj, m.down_proj))
        channels = torch.stack([s_gate[c].sum() + s_up[c].sum() + s_down[:, c].sum() for c in range(128)])
        layer_scores[i] = {"attention": torch.stack(groups), "mlp": channels}
    model.zero_grad()
    return layer_scores


@pytest.mark.parametrize("method", ["streamed", "accumulated"])
def test_scores_match_brute_force(random_windows, method):
    model = tiny_llama()
    fast = taylor_scores(model, random_windows, [0, 1, 2, 3], batch_size=4, method=method)  # 2 micro-batches
    slow = brute_force(tiny_llama(), random_windows)
    for i in range(4):
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(fast[i][kind], slow[i][kind], rtol=1e-4, atol=1e-12)
            assert fast[i][kind].min() > 0
    assert not torch.allclose(fast[0]["mlp"], fast[1]["mlp"])


@pytest.mark.parametrize("method", ["streamed", "accumulated"])
def test_only_selected_layers_and_clean_state(random_windows, method):
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    scores = taylor_scores(model, random_windows, [2], batch_size=3, method=method)
    assert list(scores) == [2]
    assert scores[2]["attention"].shape == (2,) and scores[2]["mlp"].shape == (128,)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_deterministic(random_windows):
    a = taylor_scores(tiny_llama(), random_windows, [1, 3], batch_size=2)
    b = taylor_scores(tiny_llama(), random_windows, [1, 3], batch_size=2)
    for i in (1, 3):
        assert torch.equal(a[i]["mlp"], b[i]["mlp"]) and torch.equal(a[i]["attention"], b[i]["attention"])


def test_unit_ownership_covers_every_weight_once(tiny_model):
    layer = tiny_model.model.layers[0]
    for kind, count in ((units.ATTENTION, 2), (units.MLP, 128)):
        for owner in units.owners(layer, kind):
            lin = units.linear(layer, owner.path)
            assert len(owner.unit_of) == lin.weight.shape[owner.dim]
            assert torch.equal(torch.bincount(owner.unit_of), torch.full((count,), len(owner.unit_of) // count))
    assert units.params_per_unit(layer, units.ATTENTION) * 2 + units.params_per_unit(layer, units.MLP) * 128 == \
        units.prunable_params(layer)


@pytest.mark.parametrize("method", ["streamed", "accumulated"])
def test_nan_in_the_model_stops_the_taylor_pass_with_a_clear_error(method):
    import pytest
    import torch

    from gaqprune.core.taylor import taylor_scores
    from gaqprune.errors import GaqpruneError

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    windows = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(GaqpruneError, match="numerically broken"):
        taylor_scores(model, windows, [0, 1, 2, 3], method=method)


def test_chunked_reduction_equals_one_chunk(random_windows, monkeypatch):
    # Scores are reduced in chunks of CHUNK_ELEMENTS (bounded memory): tiny chunks (a few rows) give the same scores.
    from gaqprune.core import taylor

    whole = taylor_scores(tiny_llama(), random_windows, [1, 2], batch_size=3)
    monkeypatch.setattr(taylor, "CHUNK_ELEMENTS", 100)  # 1 row of a 64-wide weight, 1 row of down_proj
    chunked = taylor_scores(tiny_llama(), random_windows, [1, 2], batch_size=3)
    for i in (1, 2):
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(chunked[i][kind], whole[i][kind], rtol=1e-12, atol=0)


def test_float16_scores_keep_float32_precision():
    # With the mean loss, a float16 model's weight gradients fall below fp16's smallest normal number and lose
    # precision as the calibration set grows; the pass backpropagates a summed loss and rescales.
    # (mean loss: median relative error 0.84 % at these 128 x 64 tokens; summed: 0.016 %)
    windows = torch.randint(3, 4096, (128, 64), generator=torch.Generator().manual_seed(3))
    ref = taylor_scores(tiny_llama(vocab_size=4096), windows, [1, 2], batch_size=16)
    half = taylor_scores(tiny_llama(vocab_size=4096).half(), windows, [1, 2], batch_size=16)
    errors = torch.cat([((half[i][k] - ref[i][k]).abs() / ref[i][k]) for i in (1, 2) for k in ("attention", "mlp")])
    assert errors.median() < 1e-3, errors.median()


def _gradient_census(monkeypatch):
    """Record, each time a layer is scored, which layers hold weight gradients at that moment."""
    from gaqprune.core import taylor

    census = []
    original = taylor.unit_scores_from_grads

    def spy(layer, kind):
        layers = list(spy.model.model.layers)
        held = [i for i, other in enumerate(layers) if any(p.grad is not None for p in other.parameters())]
        census.append((layers.index(layer), kind, held))
        return original(layer, kind)

    monkeypatch.setattr(taylor, "unit_scores_from_grads", spy)
    return spy, census


def test_streamed_backward_holds_one_layers_gradients_at_a_time(random_windows, monkeypatch):
    # The point of the streamed backward: a layer's gradients are scored and freed before the next layer's exist
    # (an 8B model's accumulated gradients take 0.85x its weights). Same scores as the whole-model backward.
    spy, census = _gradient_census(monkeypatch)
    spy.model = model = tiny_llama(layers=6)
    layers = [1, 2, 4, 5]
    streamed = taylor_scores(model, random_windows, layers, batch_size=4, method="streamed")
    assert [(i, held) for i, kind, held in census if kind == "attention"] == [(5, [5]), (4, [4]), (2, [2]), (1, [1])]
    census.clear()
    accumulated = taylor_scores(model, random_windows, layers, batch_size=4, method="accumulated")
    assert census[0][2] == layers  # every selected layer's gradients at once
    for i in layers:
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(streamed[i][kind], accumulated[i][kind], rtol=1e-5, atol=0)


def test_auto_picks_accumulated_for_small_gradients_else_the_method_that_keeps_fewer_bytes(monkeypatch):
    from gaqprune.core import taylor

    model = tiny_llama()
    picked = []
    for name in ("_streamed", "_accumulated"):
        original = getattr(taylor, name)
        monkeypatch.setattr(taylor, name, lambda *a, _n=name, _f=original: (picked.append(_n), _f(*a))[1])
    short = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    taylor_scores(model, short, [1, 2])  # a tiny model's gradients are small: the faster accumulated backward
    assert picked == ["_accumulated"]
    picked.clear()
    monkeypatch.setattr(taylor, "SMALL_GRADIENTS", 0)  # as for an 8B model: the method that keeps fewer bytes
    long = torch.randint(3, 256, (64, 256), generator=torch.Generator().manual_seed(0))
    est_short, est_long = taylor.memory_estimate(model, short, [1, 2]), taylor.memory_estimate(model, long, [1, 2])
    # hidden-state cache: windows x tokens x hidden 64 x 4 bytes x (4 layers - first 1 + 2); gradients: 2 layers' Linears
    layer_bytes = sum(p.numel() for n, p in model.model.layers[1].named_parameters() if "proj" in n) * 4
    assert est_short == {"streamed": 4 * 16 * 64 * 4 * 5 + layer_bytes, "accumulated": 2 * layer_bytes}
    assert est_long["streamed"] > est_long["accumulated"] and est_short["streamed"] < est_short["accumulated"]
    taylor_scores(model, short, [1, 2])
    taylor_scores(model, long, [1, 2])
    assert picked == ["_streamed", "_accumulated"]
