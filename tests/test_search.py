"""``--allocation search`` (gaqprune.core.search and the scored plans of gaqprune.core.plan) on tiny random Llamas: a
scored candidate is exactly what applying it gives, scoring leaves the model alone, the walk over depths finds the
best with fewer scores than depths, the span distances match the model's own hidden states, the plan is reproduced
for a fixed seed, and the folded span tracks the dense model better than plain removal."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import random_ids, settings, tiny_llama

from gaqprune.core import search
from gaqprune.core.compensation import capture_layer_inputs, run_layer
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import _run_plan, apply_plan, build_plan, depth_width_targets
from gaqprune.errors import GaqpruneError

IMPORTANCE = {i: 1.0 + (i * 7) % 5 for i in range(6)}


def search_settings(**kw):
    return settings(**{"layer_end": 6, "pruning_ratio": 0.35, "compensation": "residual", "allocation": "search",
                       **kw})


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("compensation", ["residual", "lstsq", "none"])
def test_a_scored_plan_is_what_applying_it_gives_and_the_model_is_untouched(compensation):
    model = tiny_llama(layers=6)
    calib, fit = random_ids(6, 32, 0), random_ids(8, 32, 1)
    plan = build_plan(model, IMPORTANCE, calib, search_settings(compensation=compensation, allocation="fixed",
                                                                whole_layer_rate=0.5), progress=False)
    assert plan["removed_layers"], "the plan should remove a whole layer (a folded span) as well as width"
    before = state(model)
    windows = calib if compensation == "none" else fit
    scored = _run_plan(model, plan, windows, score=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(model.model.layers) == 6
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan, fit)
    assert scored == pytest.approx(math.log(perplexity(pruned, windows, batch_size=4)), rel=1e-6)


def test_the_walk_over_depths_finds_the_best_with_fewer_scores():
    for best in (0, 3, 7, 12):
        calls: list[int] = []

        def loss(k: int, best=best, calls=calls) -> float:
            calls.append(k)
            return (k - best) ** 2 + 0.5

        found, scores = search.depth_order(12, loss)
        assert found == best and len(calls) == len(set(calls)) == len(scores) < 13
    # ties go to the shallower model; a flat loss stops after the first rise never comes: every stride point
    assert search.depth_order(4, lambda k: 1.0)[0] == 0
    assert search.depth_order(0, lambda k: 2.0) == (0, {0: 2.0})


def test_span_distances_are_the_cosine_distances_of_the_models_hidden_states():
    model = tiny_llama(layers=6)
    windows = random_ids(5, 16, 3)
    got = search.span_distances(model, windows, 3, 1, 5, batch_size=2)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states  # [0] embeddings = input of layer 0
    for k in (1, 2, 3):
        assert sorted(got[k]) == list(range(1, 5 - k + 1))
        for s, value in got[k].items():
            expected = float((1 - torch.nn.functional.cosine_similarity(hidden[s], hidden[s + k], dim=-1)).mean())
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert search.best_span(got, 2) == [min(got[2], key=got[2].get), min(got[2], key=got[2].get) + 1]


def test_the_search_reproduces_its_plan_and_records_every_candidate():
    calib, fit = random_ids(6, 32, 0), random_ids(8, 32, 1)
    plans = [build_plan(tiny_llama(layers=6), IMPORTANCE, calib, search_settings(), progress=False, fit_windows=fit)
             for _ in range(2)]
    assert json.dumps(plans[0], sort_keys=True) == json.dumps(plans[1], sort_keys=True)
    record = plans[0]["search"]
    losses = {c["blocks"]: c["calibration_loss"] for c in record["candidates"]}
    assert record["chosen_blocks"] == min(losses, key=lambda k: (losses[k], k))
    assert len(plans[0]["removed_layers"]) == record["chosen_blocks"]
    # 35 % of 6 equal layers: 2 whole layers leave the others 0.1 / 4 of theirs, 3 would overshoot
    assert record["max_blocks"] == 2 and 0 in losses
    assert abs(plans[0]["totals"]["achieved_ratio_selected"] - 0.35) < 0.01
    # the chosen candidate's loss is the applied model's loss on the refit windows
    model = tiny_llama(layers=6)
    apply_plan(model, plans[0], fit)
    assert math.log(perplexity(model, fit, 4)) == pytest.approx(losses[record["chosen_blocks"]], rel=1e-6)


def test_search_reaches_a_ratio_beyond_the_width_bound_and_refuses_an_impossible_one():
    calib = random_ids(6, 32, 0)
    plan = build_plan(tiny_llama(layers=6), IMPORTANCE, calib, search_settings(pruning_ratio=0.7, max_pruning_rate=0.5),
                      progress=False, fit_windows=random_ids(8, 32, 1))
    assert plan["search"]["chosen_blocks"] >= 2 and abs(plan["totals"]["achieved_ratio_selected"] - 0.7) < 0.01
    with pytest.raises(GaqpruneError, match="--pruning_ratio 0.95 is not reachable: no number of whole layers"):
        build_plan(tiny_llama(layers=6), IMPORTANCE, calib, search_settings(pruning_ratio=0.95, max_pruning_rate=0.5),
                   progress=False)
    with pytest.raises(GaqpruneError, match="--whole_layer_rate 0.5 applies to --allocation fixed"):
        build_plan(tiny_llama(layers=6), IMPORTANCE, calib, search_settings(whole_layer_rate=0.5), progress=False)
    with pytest.raises(GaqpruneError, match="--allocation 'deep' is invalid; use one of search, fixed"):
        build_plan(tiny_llama(layers=6), IMPORTANCE, calib, search_settings(allocation="deep"), progress=False)


def test_depth_width_targets_spend_the_budget_the_span_leaves():
    prunable = dict.fromkeys(range(6), 1000)
    target = depth_width_targets(IMPORTANCE, prunable, [2, 3], search_settings(pruning_ratio=0.5))
    assert [target[2], target[3]] == [1.0, 1.0]
    assert sum(target[i] * 1000 for i in prunable) == pytest.approx(3000)
    assert depth_width_targets(IMPORTANCE, prunable, [0, 1, 2], search_settings(pruning_ratio=0.5)) is None  # no width


def test_a_folded_span_tracks_the_dense_stream_better_than_plain_removal():
    model = tiny_llama(layers=6)
    fit = random_ids(16, 32, 1)
    base = search_settings(allocation="fixed", pruning_ratio=0.2, layer_start=2, layer_end=5)
    plan = build_plan(model, IMPORTANCE, fit, base, progress=False)
    span_plan = copy.deepcopy(plan)
    for e in span_plan["layers"]:  # no width change: only layers 3 and 4 removed whole
        e.update(kept_groups=list(range(e["groups_before"])), kept_channels=list(range(e["channels_before"])),
                 groups_after=e["groups_before"], channels_after=e["channels_before"],
                 removed_whole=e["index"] in (3, 4))
    span_plan["removed_layers"] = [3, 4]
    with torch.no_grad():
        stream = capture_layer_inputs(model, fit, 4)
        for i in range(5):
            stream = run_layer(model.model.layers[i], stream)
    dense_after = torch.cat([h for h, _ in stream])  # the dense residual stream after layer 4
    errors = {}
    for fold in (True, False):
        pruned = copy.deepcopy(model)
        span_plan["settings"]["fold_spans"] = fold
        apply_plan(pruned, span_plan, fit)
        with torch.no_grad():
            out = capture_layer_inputs(pruned, fit, 4)
            for i in range(3):  # layers 0, 1, 2 of the pruned model = 0, 1, 2 of the dense one, 3 and 4 gone
                out = run_layer(pruned.model.layers[i], out)
        errors[fold] = float((torch.cat([h for h, _ in out]) - dense_after).pow(2).mean())
    assert errors[True] < 0.8 * errors[False], errors
