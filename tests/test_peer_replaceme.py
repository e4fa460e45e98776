"""ReplaceMe peer (benchmarks/peers/replaceme.py) on tiny random Llama models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_llama

from benchmarks.peers import replaceme
from gaqprune.core.surgery import remove_layers


def _calib(seed: int = 0, n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _decoder(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


@pytest.mark.parametrize("fraction,n", [(0.25, 1), (0.5, 2)])
def test_params_shapes_and_contiguous_span(fraction: float, n: int) -> None:
    model = tiny_llama(layers=4)
    before = _decoder(model)
    info = replaceme.prune(model, _calib(), fraction)
    assert len(model.model.layers) == 4 - n == model.config.num_hidden_layers
    assert abs((1 - _decoder(model) / before) - fraction) <= 0.005
    assert info["decoder_params_before"] == before and info["decoder_params_after"] == _decoder(model)
    removed = info["removed_layers"]
    assert removed == list(range(removed[0], removed[0] + n)) and removed[0] >= 1
    assert info["folded_into_layer"] == removed[0] - 1
    # Stock layout: every kept Linear has its dense shape.
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)
    logits = model(_calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_span_is_the_smallest_block_distance_and_distance_is_hand_computed() -> None:
    model = tiny_llama(layers=4)
    calib = _calib()
    first, dist = replaceme.choose_span(model, calib, 2)
    assert len(dist) == 2 and first == 1 + min(range(2), key=lambda i: dist[i])
    out = model(calib, output_hidden_states=True)
    a, b = out.hidden_states[1][:, -1], out.hidden_states[3][:, -1]
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert dist[0] == pytest.approx((torch.acos(cos) / math.pi).mean().item(), rel=1e-6)


@pytest.mark.parametrize("loss", ["lstsq", "cosine"])
def test_folded_map_beats_plain_removal_after_the_span(loss: str) -> None:
    dense = tiny_llama(layers=5)
    calib = _calib()
    first, n = 1, 2  # remove layers 1, 2; layer 3 follows, so h_2 (dense) is an unnormed residual stream
    target = dense(calib, output_hidden_states=True).hidden_states[first + n]  # h_{first+n-1}
    plain = copy.deepcopy(dense)
    remove_layers(plain, list(range(first, first + n)))
    folded = copy.deepcopy(dense)
    res = replaceme.replace_span(folded, calib, first, n, loss=loss, epochs=30, lr=1e-3)
    err_plain = (plain(calib, output_hidden_states=True).hidden_states[first] - target).pow(2).sum().item()
    err_fold = (folded(calib, output_hidden_states=True).hidden_states[first] - target).pow(2).sum().item()
    assert res["plain_removal"] == pytest.approx(err_plain, rel=1e-3)
    assert res["with_transform"] == pytest.approx(err_fold, rel=1e-3)
    if loss == "lstsq":
        assert err_fold < 0.9 * err_plain  # least squares: never worse than T = I, here clearly better
    else:  # the cosine objective: compare angles, not squared error
        def angle(h: torch.Tensor) -> float:
            return torch.nn.functional.cosine_similarity(h, target, dim=-1).mean().item()
        assert angle(folded(calib, output_hidden_states=True).hidden_states[first]) > \
            angle(plain(calib, output_hidden_states=True).hidden_states[first])
    assert len(folded.model.layers) == 3 and _decoder(folded) == _decoder(plain)


def test_deterministic() -> None:
    a, b = tiny_llama(layers=4), tiny_llama(layers=4)
    ia = replaceme.prune(a, _calib(), 0.5, loss="cosine", epochs=2)
    ib = replaceme.prune(b, _calib(), 0.5, loss="cosine", epochs=2)
    assert ia["removed_layers"] == ib["removed_layers"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
