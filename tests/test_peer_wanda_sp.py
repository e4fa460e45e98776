"""Wanda-sp peer (benchmarks/peers/wanda_sp.py) on tiny random Llama models: budget, uniform shapes, determinism,
the scores against a hand computation, and the pruned calibration stream."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers import peer_calib as calib
from helpers import tiny_llama

from benchmarks.peers import flap, wanda_sp
from gaqprune.core.layers import batch_layer_inputs, micro_batches


@pytest.mark.parametrize(("fraction", "groups", "channels"), [(0.2, 2, 92), (0.5, 1, 64)])
def test_budget_uniform_shapes_and_logits(fraction, groups, channels):
    model = tiny_llama()
    before = flap.decoder_params(model)
    info = wanda_sp.prune(model, calib(), fraction)
    after = flap.decoder_params(model)
    assert info["decoder_params_after"] == after and abs((1 - after / before) - fraction) <= 0.005
    # tiny layer: group 5120 parameters, channel 192, layer 34944. 20 %: floor(r * 2) = 0 groups for r < 1/2, so
    # 36 channels (0.1978; 37 would give 0.2033); 50 %: r = 1/2, one group and 64 channels (0.4982)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.k_proj.out_features == attn.v_proj.out_features == groups * 8
        assert attn.q_proj.out_features == attn.o_proj.in_features == 4 * groups * 8
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == channels
        assert attn.o_proj.bias is None and mlp.down_proj.bias is None  # no bias compensation
    assert after == before - 4 * ((2 - groups) * 5120 + (128 - channels) * 192)
    logits = model(calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_rate_is_solved_exactly():
    model = tiny_llama()
    assert wanda_sp.solve_rate(model, 0.2) == Fraction(36, 128)
    assert wanda_sp.solve_rate(model, 0.5) == Fraction(1, 2)
    assert wanda_sp.removed_counts(model.model.layers[0], Fraction(1, 2)) == (1, 64)


def test_deterministic():
    a, b = tiny_llama(), tiny_llama()
    ia, ib = wanda_sp.prune(a, calib(), 0.5), wanda_sp.prune(b, calib(), 0.5)
    assert ia["kept_groups"] == ib["kept_groups"]
    ids = calib(2, 2, 16)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_scores_match_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    x = torch.randn(2, 5, 4)
    stats = flap.InputStats(4)
    stats.add(x)
    scores = wanda_sp.channel_scores(w, stats.sumsq)
    for j in range(4):
        norm = sum(float(x[b, t, j]) ** 2 for b in range(2) for t in range(5)) ** 0.5
        hand = sum(abs(float(w[i, j])) * norm for i in range(3))
        assert scores[j].item() == pytest.approx(hand, rel=1e-9)
    # a group's score is the sum of its query heads' channels: layer with 2 groups of 32 o_proj columns
    model = tiny_llama()
    layer = model.model.layers[0]
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    _, st = flap.run_with_stats(layer, inputs)
    groups, channels = wanda_sp.layer_scores(layer, st)
    attn = wanda_sp.channel_scores(layer.self_attn.o_proj.weight, st["self_attn.o_proj"].sumsq)
    assert torch.allclose(groups, torch.stack([attn[:32].sum(), attn[32:].sum()]))
    assert channels.shape == (128,)


def test_layers_are_scored_on_the_pruned_stream():
    """Layer 0's choice is the lowest scores on the model's inputs; layer 1's the lowest on the PRUNED layer 0's outputs."""
    dense = tiny_llama()
    model = tiny_llama()
    info = wanda_sp.prune(model, calib(), 0.5)
    inputs = batch_layer_inputs(dense, micro_batches(calib(), 16, "cpu"))
    layer0 = dense.model.layers[0]
    _, st = flap.run_with_stats(layer0, inputs)
    groups, _ = wanda_sp.layer_scores(layer0, st)
    assert info["kept_groups"][0] == [int(torch.argmax(groups))]
    pruned_out = [(flap.layer_output(model.model.layers[0], h, kw), kw) for h, kw in inputs]
    dense_out = [(flap.layer_output(layer0, h, kw), kw) for h, kw in inputs]
    layer1 = dense.model.layers[1]
    g_pruned, c_pruned = wanda_sp.layer_scores(layer1, flap.run_with_stats(layer1, pruned_out)[1])
    g_dense, c_dense = wanda_sp.layer_scores(layer1, flap.run_with_stats(layer1, dense_out)[1])
    assert info["kept_groups"][1] == [int(torch.argmax(g_pruned))]
    keep_pruned, keep_dense = wanda_sp.lowest(c_pruned, 64), wanda_sp.lowest(c_dense, 64)
    assert keep_pruned != keep_dense  # the two streams choose different channels here ...
    # ... and the pruned model holds the pruned stream's choice
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, layer1.mlp.down_proj.weight[:, keep_pruned])
