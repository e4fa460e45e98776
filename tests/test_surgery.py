"""Surgery and plans on tiny random Llamas: exactness, parameter counts, KV cache, depth pruning, determinism."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import settings, tiny_llama

from gaqprune.core import surgery, units
from gaqprune.core.plan import apply_plan, build_plan

IMPORTANCE = {0: 4.0, 1: 0.5, 2: 1.5, 3: 2.5}




def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def keep_everything(plan: dict) -> dict:
    plan = copy.deepcopy(plan)
    for e in plan["layers"]:
        e.update(kept_groups=list(range(e["groups_before"])), kept_channels=list(range(e["channels_before"])),
                 groups_after=e["groups_before"], channels_after=e["channels_before"], removed_whole=False)
    plan["removed_layers"] = []
    return plan


@pytest.mark.parametrize("compensation", ["none", "lstsq", "residual"])
def test_nothing_removed_is_bit_equal(random_windows, compensation):
    dense, model = tiny_llama(), tiny_llama()
    plan = keep_everything(build_plan(model, IMPORTANCE, random_windows, settings(compensation=compensation), progress=False))
    apply_plan(model, plan, random_windows)
    with torch.no_grad():
        assert torch.equal(dense(random_windows).logits, model(random_windows).logits)
    assert n_params(model) == n_params(dense)


def test_removal_equals_masking_the_dense_model(random_windows):
    """Without compensation, removing units == zeroing the o_proj / down_proj columns they own."""
    model, masked = tiny_llama(), tiny_llama()
    plan = build_plan(model, IMPORTANCE, random_windows, settings(unit_split="same_rate", pruning_ratio=0.4), progress=False)
    assert any(e["groups_after"] < e["groups_before"] for e in plan["layers"])
    apply_plan(model, plan, random_windows)
    with torch.no_grad():
        for e, layer in zip(plan["layers"], masked.model.layers):
            o_owner = units.owners(layer, units.ATTENTION)[-1]
            drop_cols = torch.ones(layer.self_attn.o_proj.in_features, dtype=torch.bool)
            drop_cols[units.kept_positions(o_owner, torch.tensor(e["kept_groups"]))] = False
            layer.self_attn.o_proj.weight[:, drop_cols] = 0
            drop_ch = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            drop_ch[e["kept_channels"]] = False
            layer.mlp.down_proj.weight[:, drop_ch] = 0
        torch.testing.assert_close(model(random_windows).logits, masked(random_windows).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", ["per_param", "same_rate", "mlp_only"])
@pytest.mark.parametrize("compensation", ["none", "lstsq", "residual"])
def test_parameter_count_matches_plan(random_windows, split, compensation):
    model = tiny_llama()
    before = n_params(model)
    plan = build_plan(model, IMPORTANCE, random_windows, settings(unit_split=split, compensation=compensation), progress=False)
    assert n_params(model) == before  # planning does not modify the model
    apply_plan(model, plan, random_windows)
    t = plan["totals"]
    assert n_params(model) == t["model_params_after"] < t["model_params_before"] == before
    assert t["achieved_ratio_selected"] == pytest.approx(0.3, abs=4 * 192 / t["prunable_params_before"])  # <= 1 unit/layer
    for e, layer in zip(plan["layers"], model.model.layers):
        assert units.num_groups(layer) == e["groups_after"] >= 1
        assert units.num_channels(layer) == e["channels_after"] >= 1
        assert layer.self_attn.q_proj.out_features // 8 == 4 * units.num_groups(layer)  # 4 query heads per KV head
    logits = model(random_windows).logits
    assert torch.isfinite(logits).all()


def test_parameter_count_matches_plan_with_biases(random_windows):
    # o_proj's and down_proj's biases belong to no unit and stay: the plan counted only the kept units' parameters,
    # so a layer left whole reported a positive rate and the model total was off by the biases.
    model = tiny_llama(attention_bias=True, mlp_bias=True)
    plan = build_plan(model, IMPORTANCE, random_windows, settings(layer_start=1), progress=False)
    untouched = plan["layers"][0]
    assert not untouched["selected"] and untouched["achieved_rate"] == 0.0
    assert untouched["prunable_params_after"] == untouched["prunable_params_before"]
    apply_plan(model, plan, random_windows)
    for e, layer in zip(plan["layers"], model.model.layers):
        assert units.prunable_params(layer) == e["prunable_params_after"]
    assert n_params(model) == plan["totals"]["model_params_after"]


def greedy_no_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("whole", [None, 0.5])
def test_kv_cache_generation_after_pruning(random_windows, whole):
    model = tiny_llama()
    plan = build_plan(model, IMPORTANCE, random_windows,
                      settings(unit_split="same_rate", pruning_ratio=0.4, whole_layer_rate=whole, compensation="lstsq"),
                      progress=False)
    assert bool(plan["removed_layers"]) == (whole is not None)
    apply_plan(model, plan, random_windows)
    prompt = random_windows[:2, :10]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, min_new_tokens=5)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, greedy_no_cache(model, prompt, 5))


def test_whole_layer_removal_equals_skipping(random_windows):
    model, dense = tiny_llama(), tiny_llama()
    surgery.remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 == len(model.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    for i in (1, 2):  # the dense model with layers 1 and 2 turned into identities
        dense.model.layers[i].forward = lambda hidden_states, *a, **k: hidden_states
    with torch.no_grad():
        torch.testing.assert_close(model(random_windows).logits, dense(random_windows).logits)


def test_compensation_reduces_output_error(random_windows):
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(random_windows).logits
    errors = {}
    for comp in ("none", "lstsq"):
        model = tiny_llama()
        plan = build_plan(model, IMPORTANCE, random_windows, settings(compensation=comp, pruning_ratio=0.4), progress=False)
        apply_plan(model, plan, random_windows)
        with torch.no_grad():
            errors[comp] = (model(random_windows).logits - ref).pow(2).mean().item()
    assert errors["lstsq"] < 0.7 * errors["none"]


def test_plan_is_deterministic_json(random_windows):
    s = settings(whole_layer_rate=0.5, pruning_ratio=0.35)
    a = json.dumps(build_plan(tiny_llama(), IMPORTANCE, random_windows, s, progress=False), sort_keys=True)
    b = json.dumps(build_plan(tiny_llama(), IMPORTANCE, random_windows, s, progress=False), sort_keys=True)
    assert a == b
    plan = json.loads(a)
    assert plan["settings"]["pruning_ratio"] == 0.35 and len(plan["layers"]) == 4


def test_plan_for_other_model_refused(random_windows):
    from gaqprune.errors import GaqpruneError

    model = tiny_llama()
    plan = build_plan(model, IMPORTANCE, random_windows, settings(), progress=False)
    apply_plan(model, plan)
    with pytest.raises(GaqpruneError, match="already pruned"):
        apply_plan(model, plan)


def test_bf16_apply(random_windows):
    model = tiny_llama().to(torch.bfloat16)
    plan = build_plan(model, IMPORTANCE, random_windows, settings(compensation="lstsq"), progress=False)
    apply_plan(model, plan, random_windows)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert n_params(model) == plan["totals"]["model_params_after"]


class _Windows:
    """A datamodule stand-in that records which calibration windows were asked for."""

    def __init__(self):
        self.calls = []

    def calibration_windows(self, n, seq_len, seed=None, what=""):
        self.calls.append((n, seq_len, seed, what))
        return torch.randint(3, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_compensation_windows_follow_the_settings():
    from gaqprune.run.stages import compensation_windows, taylor_windows

    data = _Windows()
    taylor = taylor_windows(data, settings(), 42, torch.device("cpu"))
    assert taylor.shape == (6, 32) and data.calls[-1][3] == "--num_examples"
    refit = compensation_windows(data, settings(compensation="lstsq", compensation_samples=10, compensation_seq_len=48),
                                 42, torch.device("cpu"), taylor)
    assert refit.shape == (10, 48) and data.calls[-1] == (10, 48, 44, "--compensation_samples")
    assert compensation_windows(data, settings(compensation="lstsq", compensation_samples=None), 42,
                                torch.device("cpu"), taylor) is taylor
    assert compensation_windows(data, settings(compensation="none"), 42, torch.device("cpu"), taylor) is None
    assert len(data.calls) == 2  # neither reuse nor "none" draws windows
    # Taylor windows of more tokens than the refit's own (6 x 32 > 5 x 38) are reused; as many tokens (6 x 32) are not
    assert compensation_windows(data, settings(compensation="lstsq", compensation_samples=5, compensation_seq_len=38),
                                42, torch.device("cpu"), taylor) is taylor
    assert compensation_windows(data, settings(compensation="lstsq", compensation_samples=6, compensation_seq_len=32),
                                42, torch.device("cpu"), taylor).shape == (6, 32) and len(data.calls) == 3


def test_more_refit_windows_fit_better_than_the_taylor_windows_alone():
    """Refitting on more calibration tokens than the Taylor pass saw lowers the pruned model's error on held-out text."""
    held_out = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(11))
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(held_out).logits
    taylor = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(12))
    many = torch.randint(3, 256, (48, 32), generator=torch.Generator().manual_seed(13))
    s = settings(compensation="lstsq", pruning_ratio=0.4, num_examples=2, max_seq_len=16)
    plan = build_plan(tiny_llama(), IMPORTANCE, taylor, s, progress=False)
    errors = {}
    for name, windows in (("taylor", taylor), ("many", many)):
        model = tiny_llama()
        apply_plan(model, plan, windows)
        with torch.no_grad():
            errors[name] = (model(held_out).logits - ref).pow(2).mean().item()
    assert errors["many"] < errors["taylor"], errors


def test_residual_target_beats_the_layers_own_output_on_held_out_text():
    """--compensation residual (refit toward the dense model's residual stream, correcting earlier layers' drift)
    ends closer to the dense model than lstsq (each layer's own dense output), which beats plain removal."""
    held_out = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(11))
    calib = torch.randint(3, 256, (32, 32), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ref = tiny_llama()(held_out).logits
    errors = {}
    for comp in ("none", "lstsq", "residual"):
        model = tiny_llama()
        plan = build_plan(model, IMPORTANCE, calib, settings(compensation=comp, pruning_ratio=0.4, num_examples=32),
                          progress=False)
        apply_plan(model, plan, calib)
        with torch.no_grad():
            errors[comp] = (model(held_out).logits - ref).pow(2).mean().item()
    assert errors["residual"] < errors["lstsq"] < errors["none"], errors


def test_residual_compensation_with_a_removed_layer_matches_the_plan(random_windows):
    model = tiny_llama()
    s = settings(compensation="residual", whole_layer_rate=0.45, pruning_ratio=0.35)
    plan = build_plan(model, IMPORTANCE, random_windows, s, progress=False)
    assert plan["removed_layers"]
    apply_plan(model, plan, random_windows)
    assert n_params(model) == plan["totals"]["model_params_after"]
    with torch.no_grad():
        assert torch.isfinite(model(random_windows).logits).all()


def test_residual_refit_of_a_biased_layer_equals_lstsq_when_the_streams_agree(random_windows):
    # Pruning only layer 0's MLP, the dense and pruned streams entering it are the same, so the residual target (the
    # dense sub-block output, bias included) and the lstsq target (X W^T) must give the same refit: the Linear's
    # bias is added again after the refit weight, so it has to come off the residual target. (The attention's own
    # bias handling is the same code path, `_weight_target`.)
    logits = {}
    for comp in ("lstsq", "residual"):
        model = tiny_llama(attention_bias=True, mlp_bias=True)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.normal_(0, 0.5)
                layer.mlp.down_proj.bias.normal_(0, 0.5)
        s = settings(compensation=comp, unit_split="mlp_only", pruning_ratio=0.4, layer_end=1, min_pruning_rate=0.0)
        plan = build_plan(model, {0: 1.0}, random_windows, s, progress=False)
        assert plan["layers"][0]["channels_after"] < 128
        apply_plan(model, plan, random_windows)
        with torch.no_grad():
            logits[comp] = model(random_windows).logits
    torch.testing.assert_close(logits["residual"], logits["lstsq"], rtol=1e-4, atol=1e-4)


def test_refit_at_ridge_zero_with_fewer_tokens_than_inputs_stays_near_the_weights():
    # 16 tokens, 100 kept inputs: G_KK is singular. The solve at ridge 0 used to return the float32 round-off's
    # solution (weights 40x the dense ones); it must stay the least-squares solution closest to the original weights.
    from gaqprune.core.compensation import refit_weight

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 128, generator=gen), torch.randn(64, 128, generator=gen) * 0.1
    kept = torch.arange(100)
    gram = x.T @ x  # float32, as the refit accumulates it
    refit = refit_weight(weight, gram, kept, ridge=0.0)
    target = x @ weight.T
    residual = (x[:, kept] @ refit.T - target).norm() / target.norm()
    assert residual < 1e-3  # still fits the calibration tokens (16 equations per output, 100 unknowns)
    assert refit.abs().max() < 3 * weight.abs().max()
    assert (refit - weight[:, kept]).norm() < 1.5 * weight[:, 100:].norm()  # moved about as far as the removed part


def test_a_removed_span_folded_into_the_block_before_matches_the_dense_stream_better(random_windows):
    """Residual refit: down_proj of the block before a whole-removed span is refit toward the dense residual stream
    after the span (ReplaceMe's linear replacement, as the residual refit of W): on the calibration windows the pruned
    stream after that block is closer to the dense one after the span than with plain removal, at the same size."""
    from gaqprune.core.plan import plan_from_scores

    dense = tiny_llama(layers=6)
    with torch.no_grad():
        target = dense(random_windows, output_hidden_states=True).hidden_states[4]  # after dense layers 0..3
    errors, sizes = {}, {}
    for fold in (False, True):
        model = copy.deepcopy(dense)
        s = settings(compensation="residual", layer_start=0, layer_end=6)
        plan = plan_from_scores(model, {2: 1.0, 3: 1.0}, {}, s, {}, (0, 6), tuple(random_windows.shape))
        if not fold:  # the default folds; plain removal for comparison
            plan["settings"]["fold_spans"] = False
        apply_plan(model, plan, random_windows)
        assert len(model.model.layers) == 4
        with torch.no_grad():
            got = model(random_windows, output_hidden_states=True).hidden_states[2]  # after layers 0, 1
        errors[fold], sizes[fold] = (got - target).pow(2).mean().item(), n_params(model)
    assert sizes[True] == sizes[False] == plan["totals"]["model_params_after"]
    assert errors[True] < 0.5 * errors[False], errors


@pytest.mark.parametrize("scoring", ["taylor", "magnitude"])
def test_uniform_baseline_prunes_every_selected_layer_at_the_same_rate(random_windows, scoring):
    from gaqprune.core import baselines

    model = tiny_llama()
    s = settings(pruning_strategy="uniform", unit_split="mlp_only", pruning_ratio=0.25, compensation="none",
                 layer_start=1, layer_end=4, min_pruning_rate=0.0)
    plan = baselines.uniform_plan(model, random_windows, s, scoring)
    rates = [e["achieved_rate"] for e in plan["layers"]]
    assert rates[0] == 0.0 and all(abs(r - 0.25) < 0.02 for r in rates[1:]), rates
    channels = [e["channels_after"] for e in plan["layers"]]
    assert channels[0] == 128 and len(set(channels[1:])) == 1 and channels[1] < 128, channels  # the same cut
    assert [e["groups_after"] for e in plan["layers"]] == [2, 2, 2, 2]  # mlp_only
    apply_plan(model, plan)
    assert n_params(model) == plan["totals"]["model_params_after"]


def test_shortgpt_baseline_removes_the_layers_of_lowest_block_influence(random_windows):
    from gaqprune.core import baselines
    from gaqprune.core.importance import compute_layer_importance

    model = tiny_llama()
    influence = compute_layer_importance(model, random_windows, "block_influence", progress=False)
    plan = baselines.shortgpt_plan(model, random_windows, 2, settings(compensation="none"))
    assert plan["removed_layers"] == sorted(sorted(influence, key=influence.get)[:2])
    apply_plan(model, plan)
    assert len(model.model.layers) == 2 and n_params(model) == plan["totals"]["model_params_after"]


def test_each_removed_layer_runs_once_on_the_dense_stream(random_windows, monkeypatch):
    """A folded span's layers advance the dense stream once (for the fold's target), not again when the loop reaches
    them: a width-pruned layer after the span must get the dense stream after the span, not after it twice."""
    from gaqprune.core import baselines, compensation
    from gaqprune.core.plan import plan_from_scores

    model = tiny_llama(layers=6)
    runs: dict[int, int] = {}
    original = compensation.run_layer

    def counted(layer, batches):
        runs[layer.self_attn.layer_idx] = runs.get(layer.self_attn.layer_idx, 0) + 1
        return original(layer, batches)

    monkeypatch.setattr(compensation, "run_layer", counted)
    s = settings(compensation="residual", layer_start=0, layer_end=6, unit_split="mlp_only")
    plan = plan_from_scores(model, {2: 1.0, 4: 0.3}, baselines.magnitude_scores(model, [4]), s, {}, (0, 6),
                            tuple(random_windows.shape))
    apply_plan(model, plan, random_windows)
    assert runs[2] == 1, runs  # the removed layer: once, inside the fold of layer 1
    assert n_params(model) == plan["totals"]["model_params_after"]
