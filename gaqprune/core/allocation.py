"""Per-layer pruning rates from layer importance (pure math, no torch; the bounds are checked by ``gaqprune.settings``).

rate_i = clip(c * w_i, min_rate, max_rate), where w_i is a power of the layer's importance and
``c`` is solved (bisection) so that the parameters removed equal ``ratio`` of the prunable
parameters of the selected layers:

* ``inverse``: w_i = (v_i / gmean(v)) ** -alpha (important layers pruned less);
* ``proportional``: w_i = (v_i / gmean(v)) ** alpha (important layers pruned more);
* ``uniform`` or alpha = 0: w_i = 1.

Importance can be zero or negative (skipping a layer can *lower* perplexity). Such values are
mapped just below a small positive floor keeping their order, so the rates stay monotone in importance
and the positive importances keep their ratios.
The scale-free power law tolerates importances spanning many orders of magnitude.

Depth + width in one budget: with ``whole_layer_rate`` set, a layer whose unclipped rate c * w_i
reaches it is removed whole (rate 1.0) and the rest of the budget is spread over the other layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gaqprune.settings import STRATEGIES, check_ratio_bounds

RELATIVE_FLOOR = 1e-6  # zero/negative importances go below this fraction of the largest |importance|


def positive_importance(importance: Sequence[float]) -> list[float]:
    """Importances made strictly positive, in the same order.

    Values of at least the floor (a tiny fraction of the largest |importance|) stay as they are, so their ratios,
    which set the rates, are untouched by a very negative outlier; the others (zero, negative: skipping the layer
    costs nothing or even helps) map monotonically into [floor / e, floor), below every positive value.
    """
    values = [float(v) for v in importance]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"layer importances must be finite numbers, got {values}")
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    floor = RELATIVE_FLOOR * scale
    depth = max((floor - v for v in values if v < floor), default=0.0)
    return [v if v >= floor else floor * math.exp(-(floor - v) / depth) for v in values]


def layer_weights(importance: Sequence[float], strategy: str, alpha: float) -> list[float]:
    """Relative pruning weight of each layer (larger weight = pruned more)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "uniform" or alpha == 0 or len(importance) == 0:
        return [1.0] * len(importance)
    values = positive_importance(importance)
    log_gmean = sum(math.log(v) for v in values) / len(values)
    sign = -1.0 if strategy == "inverse" else 1.0
    # In log space so extreme spreads neither overflow nor underflow; capped well inside float range.
    return [math.exp(max(-600.0, min(600.0, sign * alpha * (math.log(v) - log_gmean)))) for v in values]


def _clipped(c: float, weights: Sequence[float], lo: float, hi: float) -> list[float]:
    return [min(hi, max(lo, c * w)) for w in weights]


def _solve_scale(weights: Sequence[float], params: Sequence[float], target: float, lo: float, hi: float) -> float:
    """Bisection (in log space) for c with sum(clip(c*w) * params) == target."""
    def removed(c: float) -> float:
        return sum(r * p for r, p in zip(_clipped(c, weights, lo, hi), params))

    a, b = 1e-300, 1.0
    while removed(b) < target and b < 1e300:
        b *= 1e3
    for _ in range(200):
        mid = math.sqrt(a * b)
        if removed(mid) < target:
            a = mid
        else:
            b = mid
    return b


def allocate_rates(importance: Sequence[float], ratio: float, strategy: str = "inverse", alpha: float = 1.0,
                   min_rate: float = 0.15, max_rate: float = 0.5, layer_params: Sequence[float] | None = None,
                   whole_layer_rate: float | None = None) -> list[float]:
    """Pruning rate of each selected layer (1.0 = remove the whole layer), hitting ``ratio`` of the parameters.

    Args:
        importance: one score per selected layer (higher = more important); any finite values.
        ratio: fraction of the selected layers' prunable parameters to remove, in (0, 1).
        strategy: ``inverse`` | ``proportional`` | ``uniform``.
        alpha: spread of the rates (0 = uniform, larger = more spread); >= 0.
        min_rate, max_rate: bounds on each width-pruned layer's rate.
        layer_params: prunable parameters of each layer (default: equal).
        whole_layer_rate: remove a layer whole when its unclipped rate reaches this (None: never).
    Raises ValueError with a one-line reason when the combination is infeasible.
    """
    n = len(importance)
    if n == 0:
        raise ValueError("no layers selected to prune")
    if alpha < 0:
        raise ValueError(f"--alpha {alpha} must be >= 0")
    check_ratio_bounds(ratio, min_rate, max_rate, whole_layer_rate is not None)  # (a GaqpruneError is a ValueError)
    params = [float(p) for p in (layer_params if layer_params is not None else [1.0] * n)]
    if len(params) != n or any(p <= 0 for p in params):
        raise ValueError("layer_params must give one positive count per layer")
    weights = layer_weights(importance, strategy, alpha)
    target = ratio * sum(params)
    if whole_layer_rate is None:
        return _clipped(_solve_scale(weights, params, target, min_rate, max_rate), weights, min_rate, max_rate)

    # Depth + width: grow the set of whole-removed layers (largest weights first) while the
    # unclipped rate of the next candidate, solved for the remaining budget, still reaches the threshold.
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    removed: set[int] = set()
    while len(removed) < n - 1:
        rest = [i for i in range(n) if i not in removed]
        budget = target - sum(params[i] for i in removed)
        rest_params = sum(params[i] for i in rest)
        if budget <= min_rate * rest_params:
            break
        c = _solve_scale([weights[i] for i in rest], [params[i] for i in rest], budget, min_rate, max_rate) \
            if budget < max_rate * rest_params else math.inf
        candidate = next(i for i in order if i not in removed)
        if c * weights[candidate] < whole_layer_rate or params[candidate] > budget - min_rate * (rest_params - params[candidate]):
            break
        removed.add(candidate)
    rest = [i for i in range(n) if i not in removed]
    budget = target - sum(params[i] for i in removed)
    rest_params = sum(params[i] for i in rest)
    # Removing whole layers is all-or-nothing: what they leave may not fit the other layers' [min, max].
    slack = 1e-9 * sum(params)
    if not min_rate * rest_params - slack <= budget <= max_rate * rest_params + slack:
        reach = (sum(params[i] for i in removed) + max_rate * rest_params) / sum(params)
        raise ValueError(
            f"--pruning_ratio {ratio} is not reachable with --whole_layer_rate {whole_layer_rate}: "
            f"{len(removed)} whole layer(s) plus every other layer at --max_pruning_rate {max_rate} remove only "
            f"{reach:.4f}; lower --whole_layer_rate or --pruning_ratio, or raise --max_pruning_rate"
        )
    budget = min(max(budget, min_rate * rest_params), max_rate * rest_params)
    sub_w = [weights[i] for i in rest]
    rates_rest = _clipped(_solve_scale(sub_w, [params[i] for i in rest], budget, min_rate, max_rate),
                          sub_w, min_rate, max_rate)
    rates = [1.0] * n
    for i, r in zip(rest, rates_rest):
        rates[i] = r
    return rates
