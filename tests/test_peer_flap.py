"""FLAP peer (benchmarks/peers/flap.py) on tiny random Llama models: budget, shapes, determinism, the WIFV metric,
the AL-AM global ranking, and the bias compensation lowering the calibration reconstruction error."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import peer_calib as calib
from helpers import tiny_llama

from benchmarks.peers import flap
from gaqprune.core.layers import batch_layer_inputs, micro_batches


@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_budget_shapes_and_logits(fraction):
    model = tiny_llama()
    before = flap.decoder_params(model)
    info = flap.prune(model, calib(), fraction)
    after = flap.decoder_params(model)
    assert info["decoder_params_before"] == before and info["decoder_params_after"] == after
    assert abs((1 - after / before) - fraction) <= 0.005
    biases = 0
    for layer, groups, channels in zip(model.model.layers, info["kept_groups_per_layer"],
                                       info["kept_channels_per_layer"], strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.k_proj.out_features == attn.v_proj.out_features == groups * 8  # head_dim 8
        assert attn.q_proj.out_features == attn.o_proj.in_features == 4 * groups * 8  # 4 query heads per KV head kept
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == channels
        assert groups >= 1 and channels >= 1
        # a compensation bias exactly where units were removed
        assert (attn.o_proj.bias is not None) == (groups < 2)
        assert (mlp.down_proj.bias is not None) == (channels < 128)
        biases += sum(b.numel() for b in (attn.o_proj.bias, mlp.down_proj.bias) if b is not None)
    assert biases > 0
    weights = sum(lin.weight.numel() for layer in model.model.layers for lin in layer.modules()
                  if isinstance(lin, torch.nn.Linear))
    assert after == weights + biases + 4 * 2 * 64  # exact count: weights + added biases + the RMSNorms
    logits = model(calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_deterministic():
    a, b = tiny_llama(), tiny_llama()
    ia, ib = flap.prune(a, calib(), 0.3), flap.prune(b, calib(), 0.3)
    assert ia["kept_groups"] == ib["kept_groups"] and ia["kept_channels_per_layer"] == ib["kept_channels_per_layer"]
    ids = calib(2, 2, 16)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_wifv_matches_hand_computation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3, bias=False)
    x = torch.randn(2, 7, 5) * torch.tensor([0.1, 1.0, 2.0, 0.5, 3.0]) + 1.0
    stats = flap.InputStats(5)
    stats.add(x[:1])
    stats.add(x[1:])
    flat = x.reshape(-1, 5).double()
    for j in range(5):
        var = sum((flat[t, j] - flat[:, j].mean()) ** 2 for t in range(14)) / 13
        norm2 = sum(lin.weight[i, j].double() ** 2 for i in range(3))
        assert flap.channel_metric(lin.weight, stats, "WIFV")[j].item() == pytest.approx((var * norm2).item(), rel=1e-9)
        assert stats.mean[j].item() == pytest.approx(flat[:, j].mean().item(), rel=1e-12)


def test_scores_standardised_per_layer_and_groups_average_their_channels():
    model = tiny_llama()
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    layer = model.model.layers[0]
    _, stats = flap.run_with_stats(layer, inputs)
    groups, channels = flap.layer_scores(layer, stats)
    assert channels.shape == (128,) and channels.mean().abs() < 1e-9 and abs(channels.std().item() - 1) < 1e-9
    squared = flap.channel_metric(layer.self_attn.o_proj.weight, stats["self_attn.o_proj"]) ** 2
    z = (squared - squared.mean()) / squared.std()
    # o_proj columns 0..31 are group 0's 4 query heads (head_dim 8), 32..63 group 1's
    assert torch.allclose(groups, torch.stack([z[:32].mean(), z[32:].mean()]))


def test_al_am_removes_the_globally_lowest_units():
    model = tiny_llama()
    layers = list(model.model.layers)
    scores_g = [torch.tensor([5.0, 6.0]) for _ in layers]
    # channel c of layer l scores l + c / 1000: every channel of layer 0 ranks below every channel of layer 1, ...
    scores_c = [torch.arange(128, dtype=torch.float64) / 1000 + li for li in range(4)]
    before = flap.decoder_params(model)
    keep_g, keep_c, after = flap.select_global(layers, scores_g, scores_c, 0.8 * before)
    assert all(k == [0, 1] for k in keep_g)  # attention scores above all channels: untouched
    assert abs(after / before - 0.8) < 0.005
    # ~146 channels of 192 x 4 removed: layer 0 keeps only its one highest channel (never emptied), layer 1 loses the rest
    assert keep_c[0] == [127]
    removed_1 = 128 - len(keep_c[1])
    assert keep_c[1] == list(range(removed_1, 128)) and keep_c[2] == keep_c[3] == list(range(128))
    # exact accounting: 127 + removed_1 channels of 192 parameters, plus two down_proj biases of 64
    assert after == before - (127 + removed_1) * 192 + 2 * 64


def test_bias_compensation_lowers_calibration_reconstruction_error():
    model = tiny_llama(3)
    inputs = batch_layer_inputs(model, micro_batches(calib(), 4, "cpu"))
    for layer in model.model.layers:  # the dense stream, as FLAP calibrates
        outs, stats = flap.run_with_stats(layer, inputs)
        groups, channels = flap.layer_scores(layer, stats)
        keep_g, keep_c = [int(torch.argmax(groups))], sorted(torch.argsort(channels)[64:].tolist())
        errors = {}
        for bias in (True, False):
            pruned = copy.deepcopy(layer)
            flap.compress_layer(pruned, keep_g, keep_c, stats, bias)
            errors[bias] = sum(((flap.layer_output(pruned, h, kw) - o) ** 2).sum().item()
                               for (h, kw), o in zip(inputs, outs, strict=True))
        assert errors[True] < 0.95 * errors[False]
        # at the projection itself the compensated output's mean over the calibration tokens equals the dense one
        pruned = copy.deepcopy(layer)
        flap.compress_layer(pruned, keep_g, keep_c, stats, True)
        dense_mean = layer.mlp.down_proj.weight.double() @ stats["mlp.down_proj"].mean
        kept = torch.tensor(keep_c)
        pruned_mean = pruned.mlp.down_proj.weight.double() @ stats["mlp.down_proj"].mean[kept] \
            + pruned.mlp.down_proj.bias.double()
        assert torch.allclose(dense_mean, pruned_mean, atol=1e-5)
        inputs = [(o, kw) for o, (_, kw) in zip(outs, inputs, strict=True)]


def test_without_bias_meets_the_budget_too():
    model = tiny_llama()
    info = flap.prune(model, calib(), 0.3, bias=False)
    assert abs(info["achieved_fraction"] - 0.3) <= 0.005
    assert all(layer.mlp.down_proj.bias is None and layer.self_attn.o_proj.bias is None for layer in model.model.layers)
