"""EvoPress depth-search peer (benchmarks/peers/evopress.py) on tiny random Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from benchmarks.peers import evopress
from gaqprune.core.surgery import remove_layers

SMALL = {"generations": 6, "offspring": 8, "initially_generated": 4, "initial_tokens": 128,
         "survivors_per_selection": (2, 1), "tokens_per_selection": (128, 256)}


def _calib(seed: int = 0, n: int = 8, t: int = 32) -> torch.Tensor:
    return torch.randint(3, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _decoder(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def _near_identity(model, layers: list[int], scale: float = 1e-3):
    """Blocks whose attention and MLP outputs are scaled down: dropping them barely changes the model."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def _reference_kl(dense, dropped: list[int], ids: torch.Tensor) -> float:
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, dropped)
    with torch.no_grad():
        p = F.log_softmax(dense(ids).logits[:, :-1].float(), -1).flatten(0, 1)
        q = F.log_softmax(pruned(ids).logits[:, :-1].float(), -1).flatten(0, 1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def test_fitness_is_the_kl_to_the_dense_model() -> None:
    model = tiny_llama(layers=4)
    calib = _calib()
    fit = evopress.DropFitness(model, calib)
    assert fit(frozenset({1, 2}), [(3, 32), (5, 32)]) == pytest.approx(_reference_kl(model, [1, 2], calib[[3, 5]]),
                                                                       rel=1e-4)
    # A window cut short (the last draw of a selection stage) is scored on its prefix alone.
    assert fit(frozenset({0}), [(2, 20)]) == pytest.approx(_reference_kl(model, [0], calib[2:3, :20]), rel=1e-4)
    assert fit(frozenset(), [(0, 32)]) == pytest.approx(0.0, abs=1e-6)


def test_search_finds_the_near_identity_blocks_and_params() -> None:
    model = _near_identity(tiny_llama(layers=6), [2, 4])
    before = _decoder(model)
    info = evopress.prune(model, _calib(), 1 / 3, seed=0, **SMALL)
    assert info["removed_layers"] == [2, 4]
    assert len(model.model.layers) == 4 == model.config.num_hidden_layers
    assert abs((1 - _decoder(model) / before) - 1 / 3) <= 0.005
    assert info["decoder_params_after"] == _decoder(model) and info["decoder_params_before"] == before
    assert info["options"]["default_generations"] == int(2 * 4 / 1.5) and info["options"]["generations"] == 6
    logits = model(_calib(1, 2, 16)).logits
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()
    # the search improved on its initial population's best point or kept the optimum
    assert info["search_log"][-1]["fitness"] <= info["search_log"][0]["fitness"] + 1e-9 or \
        info["search_log"][0]["best"] == [2, 4]


def test_max_generations_caps_and_is_deterministic() -> None:
    a, b = tiny_llama(layers=4), tiny_llama(layers=4)
    opts = {**SMALL, "generations": None, "max_generations": 2}
    ia = evopress.prune(a, _calib(), 0.5, seed=3, **opts)
    ib = evopress.prune(b, _calib(), 0.5, seed=3, **opts)
    assert ia["options"]["generations"] == 2 and len(ia["search_log"]) == 3
    assert ia["removed_layers"] == ib["removed_layers"] and ia["fitness_kl"] == ib["fitness_kl"]
    assert len(ia["removed_layers"]) == 2


def test_draw_windows_holds_exactly_the_tokens() -> None:
    import random

    w = evopress.draw_windows(random.Random(0), 8, 32, 100)
    assert sum(t for _, t in w) == 100 and [t for _, t in w] == [32, 32, 32, 4]
