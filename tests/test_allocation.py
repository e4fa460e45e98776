"""Allocation of per-layer rates: target, bounds, monotonicity, edge cases (pure math, no model)."""

from __future__ import annotations

import pytest

from gaqprune.core.allocation import allocate_rates, positive_importance
from gaqprune.core.plan import select_units
from gaqprune.errors import GaqpruneError
from gaqprune.settings import PruneSettings

IMPORTANCE = [3.2, 0.4, 12.0, 1.1, 7.5, 0.9, 2.2, 5.0]
PARAMS = [100, 100, 100, 100, 100, 100, 100, 100]


def removed_fraction(rates, params=PARAMS):
    return sum(r * p for r, p in zip(rates, params)) / sum(params)


@pytest.mark.parametrize("strategy", ["inverse", "proportional", "uniform"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_target_and_bounds(strategy, alpha):
    rates = allocate_rates(IMPORTANCE, 0.25, strategy, alpha, 0.1, 0.45, PARAMS)
    assert removed_fraction(rates) == pytest.approx(0.25, abs=1e-9)
    assert all(0.1 - 1e-12 <= r <= 0.45 + 1e-12 for r in rates)


def test_guide_example_inverse():
    rates = allocate_rates([0.8, 1.0, 0.6], 0.25, "inverse", 1.0, 0.0, 0.9)
    assert sum(rates) / 3 == pytest.approx(0.25)
    assert rates[2] > rates[0] > rates[1]  # guide: about 35 %, 20 %, 15 %
    assert 0.30 < rates[2] < 0.36 and 0.17 < rates[1] < 0.21


def test_inverse_monotone_proportional_antimonotone():
    inv = allocate_rates(IMPORTANCE, 0.3, "inverse", 1.0, 0.05, 0.6, PARAMS)
    prop = allocate_rates(IMPORTANCE, 0.3, "proportional", 1.0, 0.05, 0.6, PARAMS)
    order = sorted(range(len(IMPORTANCE)), key=lambda i: IMPORTANCE[i])
    inv_sorted = [inv[i] for i in order]
    prop_sorted = [prop[i] for i in order]
    assert all(a >= b - 1e-12 for a, b in zip(inv_sorted, inv_sorted[1:]))
    assert all(a <= b + 1e-12 for a, b in zip(prop_sorted, prop_sorted[1:]))
    assert inv_sorted[0] > inv_sorted[-1] and prop_sorted[0] < prop_sorted[-1]


def test_alpha_zero_is_uniform_and_alpha_spreads():
    assert allocate_rates(IMPORTANCE, 0.25, "inverse", 0.0, 0.0, 0.9) == pytest.approx([0.25] * 8)
    spread = [max(r) - min(r) for r in (allocate_rates(IMPORTANCE, 0.25, "inverse", a, 0.0, 0.99) for a in (0.5, 1, 2))]
    assert spread[0] < spread[1] < spread[2]


def test_zero_negative_and_huge_importance():
    imp = [68000.0, 900.0, -0.7, 0.0, 4.0, 3.0, 300.0]
    rates = allocate_rates(imp, 0.2, "inverse", 1.0, 0.05, 0.5)
    assert removed_fraction(rates, [1] * 7) == pytest.approx(0.2)
    assert rates[2] >= rates[3] >= rates[5] >= rates[4] >= rates[6] >= rates[1] >= rates[0]  # no order inversion
    assert allocate_rates([0.0, 0.0, 0.0], 0.2, "inverse", 1.0, 0.0, 0.5) == pytest.approx([0.2] * 3)


def test_a_very_negative_importance_does_not_flatten_the_others():
    # Shifting every importance by the most negative one made [1, 2, 3] all but equal: [0.5, 0.167, 0.167, 0.167].
    rates = allocate_rates([-1000.0, 1.0, 2.0, 3.0], 0.25, "inverse", 1.0, 0.0, 0.5)
    assert removed_fraction(rates, [1] * 4) == pytest.approx(0.25)
    assert rates[0] == pytest.approx(0.5)  # the layer whose skipping helps is pruned most
    # the others keep inverse proportions: rate ~ 1 / importance
    assert rates[1] / rates[2] == pytest.approx(2.0) and rates[1] / rates[3] == pytest.approx(3.0)
    assert positive_importance([-5.0, -1000.0, 0.0, 2.0])[1] < positive_importance([-5.0, -1000.0, 0.0, 2.0])[0]


def test_unequal_layer_params_hit_target():
    params = [10, 300, 50, 1000]
    rates = allocate_rates([1.0, 2.0, 3.0, 4.0], 0.3, "inverse", 2.0, 0.1, 0.6, params)
    assert removed_fraction(rates, params) == pytest.approx(0.3)


def test_whole_layer_removal_in_budget():
    imp = [5.0, 0.01, 4.0, 6.0, 0.02, 5.5]
    rates = allocate_rates(imp, 0.45, "inverse", 1.0, 0.1, 0.5, [1] * 6, whole_layer_rate=0.6)
    assert rates[1] == 1.0 and rates[4] == 1.0
    assert sum(r == 1.0 for r in rates) == 2
    assert removed_fraction(rates, [1] * 6) == pytest.approx(0.45)
    assert all(0.1 <= r <= 0.5 for r in rates if r < 1.0)


def test_whole_layer_removal_never_misses_the_ratio_silently():
    # above --max_pruning_rate, only whole layers can make up the rest; when none can, say so
    with pytest.raises(ValueError, match=r"--pruning_ratio 0.35 is not reachable with --whole_layer_rate 0.9: .* 0.3000"):
        allocate_rates([1.0, 2.0], 0.35, "inverse", 1.0, 0.15, 0.30, None, whole_layer_rate=0.9)
    rates = allocate_rates([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.35, "inverse", 1.0, 0.15, 0.30, None, whole_layer_rate=0.5)
    assert rates[0] == 1.0 and removed_fraction(rates, [1] * 6) == pytest.approx(0.35)


@pytest.mark.parametrize("kwargs", [
    {"ratio": 0.1, "min_rate": 0.15, "max_rate": 0.5},  # below min everywhere
    {"ratio": 0.6, "min_rate": 0.15, "max_rate": 0.5},  # above max everywhere
    {"ratio": 0.2, "min_rate": 0.4, "max_rate": 0.3},
    {"ratio": 1.2, "min_rate": 0.0, "max_rate": 0.5},
    {"ratio": 0.2, "min_rate": 0.1, "max_rate": 0.5, "alpha": -1.0},
])
def test_infeasible_refused(kwargs):
    with pytest.raises(ValueError):
        allocate_rates([1.0, 2.0], **kwargs)


@pytest.mark.parametrize("changes, flag", [
    ({"pruning_ratio": 0.0}, "--pruning_ratio"), ({"pruning_ratio": 1.0}, "--pruning_ratio"),
    ({"min_pruning_rate": 0.4, "max_pruning_rate": 0.3}, "--min_pruning_rate"),
    ({"max_pruning_rate": 1.0}, "--max_pruning_rate"), ({"alpha": -0.5}, "--alpha"),
    ({"pruning_ratio": 0.1}, "--pruning_ratio"), ({"layer_start": 3, "layer_end": 3}, "--layer_start"),
    ({"layer_start": 0, "layer_end": 9}, "--layer_end"), ({"num_examples": 0}, "--num_examples"),
    ({"pruning_strategy": "random"}, "--pruning_strategy"), ({"unit_split": "x"}, "--unit_split"),
])
def test_settings_refused_with_one_line(changes, flag):
    with pytest.raises(GaqpruneError) as err:
        PruneSettings(**changes).check(num_layers=4)
    message = str(err.value)
    assert flag in message and "\n" not in message


def test_default_layer_range():
    assert PruneSettings().check(30) == (3, 28)
    assert PruneSettings().check(32) == (3, 30)
    assert PruneSettings().check(4) == (0, 4)
    assert PruneSettings(layer_start=10, layer_end=-2).check(30) == (10, 28)


@pytest.mark.parametrize("split", ["per_param", "same_rate", "mlp_only"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5])
def test_select_units_hits_rate_within_one_channel(split, rate):
    import torch

    gen = torch.Generator().manual_seed(1)
    attn, mlp = torch.rand(3, generator=gen) * 100, torch.rand(1536, generator=gen)
    g_params, c_params = 294912, 1728
    kept_g, kept_c = select_units(attn, mlp, g_params, c_params, rate, split)
    total = 3 * g_params + 1536 * c_params
    removed = total - len(kept_g) * g_params - len(kept_c) * c_params
    assert abs(removed - rate * total) <= c_params
    assert len(kept_g) >= 1 and len(kept_c) >= 1
    if split == "mlp_only":
        assert kept_g == [0, 1, 2]
    removed_c = set(range(1536)) - set(kept_c)
    if removed_c:  # the lowest-scored channels go first
        assert max(float(mlp[i]) for i in removed_c) <= min(float(mlp[i]) for i in kept_c)


def test_kept_channels_are_aligned_for_tensor_cores():
    import torch

    from gaqprune.core.plan import channel_alignment, select_units

    assert channel_alignment(14336, None) == 64 and channel_alignment(1536, None) == 8
    assert channel_alignment(128, None) == 1 and channel_alignment(14336, 1) == 1
    attn, mlp = torch.rand(8, generator=torch.Generator().manual_seed(0)), torch.rand(14336)
    for rate in (0.1, 0.25, 0.37):
        _, kept_c = select_units(attn, mlp, 3 * 4096 * 512, 3 * 4096, rate, "mlp_only", channel_multiple=64)
        assert len(kept_c) % 64 == 0
        assert abs((14336 - len(kept_c)) * 3 * 4096 - rate * (8 * 3 * 4096 * 512 + 14336 * 3 * 4096)) <= 32 * 3 * 4096
        assert set(kept_c) == set(torch.argsort(mlp, descending=True)[: len(kept_c)].tolist())  # the best ones
