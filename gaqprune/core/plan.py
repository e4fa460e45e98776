"""The pruning plan: per-layer rates, unit selection from Taylor scores, and applying it.

``build_plan`` decides (JSON-serialisable, deterministic, written verbatim to pruning_plan.json);
``apply_plan`` performs the surgery (plus least-squares compensation when the plan asks for it), so
every DDP rank applying the same plan to the same model ends with the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict
from functools import partial

import torch

from gaqprune.core import allocation, compensation, search, surgery, units
from gaqprune.core.layers import batch_layer_inputs, micro_batches, resident
from gaqprune.core.metrics import tail_nll
from gaqprune.core.taylor import taylor_scores
from gaqprune.errors import GaqpruneError
from gaqprune.settings import SPLITS, PruneSettings

log = logging.getLogger(__name__)

PLAN_FORMAT = "gaqprune-plan/1"


def channel_alignment(num_channels: int, channel_multiple: int | None) -> int:
    """The multiple a layer's kept MLP channel count is rounded to (see ``PruneSettings.channel_multiple``)."""
    if channel_multiple is not None:
        return max(1, int(channel_multiple))
    return 64 if num_channels >= 8192 else 8 if num_channels >= 512 else 1


def select_units(attn_scores: torch.Tensor, mlp_scores: torch.Tensor, group_params: int, channel_params: int,
                 rate: float, split: str, channel_multiple: int = 1) -> tuple[list[int], list[int]]:
    """Kept (group indices, channel indices) of one layer removing about ``rate`` of its prunable parameters.

    Always keeps >= 1 group and >= 1 channel (removing everything is whole-layer removal).
    The removed parameter count lands within one MLP channel of the target whenever channels allow it (before the
    kept channel count is rounded to ``channel_multiple``, which moves it by up to half a multiple).
    """
    n_groups, n_channels = len(attn_scores), len(mlp_scores)
    total = n_groups * group_params + n_channels * channel_params
    budget = rate * total
    remove_g: list[int] = []
    remove_c: list[int] = []
    group_order = sorted(range(n_groups), key=lambda i: (float(attn_scores[i]), i))
    channel_order = sorted(range(n_channels), key=lambda i: (float(mlp_scores[i]), i))
    if split == "same_rate":
        # LLM-Pruner: the same rate for both; channels absorb the coarse group step so the layer hits its budget.
        n_g = min(n_groups - 1, round(rate * n_groups))
        n_c = min(n_channels - 1, max(0, round((budget - n_g * group_params) / channel_params)))
        remove_g, remove_c = group_order[:n_g], channel_order[:n_c]
    elif split == "mlp_only":
        remove_c = channel_order[: min(n_channels - 1, round(budget / channel_params))]
    elif split == "per_param":
        # Cheapest-per-parameter first; a unit that would overshoot by more than half a channel is skipped.
        candidates = [(float(attn_scores[i]) / group_params, 0, i) for i in range(n_groups)]
        candidates += [(float(mlp_scores[i]) / channel_params, 1, i) for i in range(n_channels)]
        removed = 0.0
        for _score, kind, i in sorted(candidates):
            size = group_params if kind == 0 else channel_params
            if removed + size > budget + channel_params / 2:
                continue
            if kind == 0 and len(remove_g) < n_groups - 1:
                remove_g.append(i)
            elif kind == 1 and len(remove_c) < n_channels - 1:
                remove_c.append(i)
            else:
                continue
            removed += size
    else:
        raise GaqpruneError(f"--unit_split {split!r} is invalid; use one of {', '.join(SPLITS)}")
    if channel_multiple > 1 and remove_c:
        # Removed channels are always the cheapest ones (a prefix of channel_order): round the kept count to the
        # nearest multiple (at least one multiple), moving the cut along that order.
        kept = n_channels - len(remove_c)
        aligned = min(n_channels, max(channel_multiple, round(kept / channel_multiple) * channel_multiple))
        remove_c = channel_order[: n_channels - aligned]
    kept_g = sorted(set(range(n_groups)) - set(remove_g))
    kept_c = sorted(set(range(n_channels)) - set(remove_c))
    return kept_g, kept_c


def _model_params(hf_model) -> int:
    return sum(p.numel() for p in hf_model.parameters())  # parameters() yields tied weights once


def _layer_params(layer) -> int:
    return sum(p.numel() for p in layer.parameters())


def build_plan(hf_model, layer_importance: dict[int, float] | None, calib_windows: torch.Tensor,
               settings: PruneSettings, progress: bool = True, fit_windows: torch.Tensor | None = None) -> dict:
    """Decide what to prune: a deterministic, JSON-serialisable plan (written verbatim to pruning_plan.json).

    Per layer: index, importance, target and achieved rate, kept GQA group and MLP channel indices,
    removed_whole, parameter counts before/after; totals over the selected layers, all decoder layers and
    the whole model; the settings used. ``layer_importance`` None means equal importance (uniform rates).

    ``--allocation fixed``: the rates of ``--pruning_strategy`` (``allocation.allocate_rates``); ``search``: the
    depth + width split with the lowest loss after surgery and refit on ``fit_windows`` (the refit windows
    ``apply_plan`` will get; None: ``calib_windows``), see ``gaqprune.core.search``.
    """
    layers = hf_model.model.layers
    num_layers = len(layers)
    start, end = settings.check(num_layers, max(units.num_channels(layer) for layer in layers))
    selected = list(range(start, end))
    if calib_windows is None or calib_windows.ndim != 2 or len(calib_windows) < 1:
        raise GaqpruneError("--num_examples: build_plan needs calibration windows [num_examples, max_seq_len]")
    importance = {}
    for i in selected:
        value = 1.0 if layer_importance is None else layer_importance.get(i, layer_importance.get(str(i)))
        if value is None:
            raise GaqpruneError(
                f"--importance_config has no importance for layer {i}; it covers layers "
                f"{sorted(layer_importance)} but --layer_start/--layer_end select [{start}, {end})"
            )
        importance[i] = float(value)

    prunable = {i: units.prunable_params(layers[i]) for i in selected}
    if settings.allocation == "search":
        scores = taylor_scores(hf_model, calib_windows, selected, batch_size=settings.taylor_batch_size,
                               progress=progress)
        return _searched_plan(hf_model, importance, prunable, scores, calib_windows, fit_windows, settings,
                              (start, end), progress)
    try:
        rates = allocation.allocate_rates(
            [importance[i] for i in selected], settings.pruning_ratio, settings.pruning_strategy, settings.alpha,
            settings.min_pruning_rate, settings.max_pruning_rate, [prunable[i] for i in selected],
            settings.whole_layer_rate,
        )
    except ValueError as err:
        raise GaqpruneError(str(err)) from None
    target = dict(zip(selected, rates))
    width = [i for i in selected if target[i] < 1.0]
    scores = taylor_scores(hf_model, calib_windows, width, batch_size=settings.taylor_batch_size, progress=progress)
    return plan_from_scores(hf_model, target, scores, settings, importance, (start, end), tuple(calib_windows.shape))


def depth_width_targets(importance: dict[int, float], prunable: dict[int, int], span: list[int],
                        settings: PruneSettings) -> dict[int, float] | None:
    """Per-layer targets with ``span`` removed whole and the rest of ``--pruning_ratio`` of the selected layers'
    prunable parameters spread over the other selected layers by ``--pruning_strategy`` / ``--alpha`` (None when
    the span alone uses the whole budget or the rest does not fit ``--max_pruning_rate``).

    A deep cut can leave the width layers less than ``--min_pruning_rate``: the lower bound is then half their
    rate, so the width budget is still spread by importance (as measured in ``benchmarks/lever_depth.py``)."""
    rest = [i for i in prunable if i not in span]
    budget = settings.pruning_ratio * sum(prunable.values()) - sum(prunable[i] for i in span)
    if not rest or budget <= 0:
        return None
    ratio = budget / sum(prunable[i] for i in rest)
    if ratio > settings.max_pruning_rate:
        return None
    lo = settings.min_pruning_rate if ratio > 1.1 * settings.min_pruning_rate else ratio / 2
    rates = allocation.allocate_rates([importance[i] for i in rest], ratio, settings.pruning_strategy, settings.alpha,
                                      lo, settings.max_pruning_rate, [prunable[i] for i in rest])
    return dict(zip(rest, rates)) | {i: 1.0 for i in span}


def _searched_plan(hf_model, importance: dict[int, float], prunable: dict[int, int], scores: dict,
                   calib_windows: torch.Tensor, fit_windows: torch.Tensor | None, settings: PruneSettings,
                   layer_span: tuple[int, int], progress: bool) -> dict:
    """``--allocation search`` (``gaqprune.core.search``): the number of blocks removed whole that gives the lowest
    calibration loss after the full surgery and refit; the plan records every candidate scored (``"search"``)."""
    from tqdm.auto import tqdm

    windows = fit_windows if fit_windows is not None and settings.compensation != "none" else calib_windows
    selected = sorted(prunable)
    # the deepest cut that still leaves width budget (equal-sized layers: any span of a length fits the same way;
    # a shallower one may not fit --max_pruning_rate, and scores as infinitely bad)
    max_k = max((k for k in range(len(selected)) if depth_width_targets(importance, prunable, selected[:k], settings)),
                default=0)
    distances = search.span_distances(hf_model, calib_windows[: search.DISTANCE_WINDOWS], max_k, *layer_span,
                                      settings.taylor_batch_size) if max_k else {}
    plans: dict[int, dict] = {}
    bar = tqdm(desc="allocation search", unit="candidate", disable=not progress, leave=False)

    def loss(k: int) -> float:
        target = depth_width_targets(importance, prunable, search.best_span(distances, k), settings)
        if target is None:  # (a span of unequal layers can overshoot where the first k layers did not)
            return float("inf")
        plans[k] = plan_from_scores(hf_model, target, scores, settings, importance, layer_span,
                                    tuple(calib_windows.shape))
        value = _run_plan(hf_model, plans[k], windows, progress=progress, score=True)
        bar.update()
        bar.set_postfix(k=k, nll=f"{value:.4f}")
        log.info("allocation search: %d block(s) removed whole %s -> calibration loss %.4f", k,
                 plans[k]["removed_layers"], value)
        return value

    try:
        best, losses = search.depth_order(max_k, loss)
    finally:
        bar.close()
    if best not in plans:
        raise GaqpruneError(f"--pruning_ratio {settings.pruning_ratio} is not reachable: no number of whole layers "
                            f"leaves the other layers a rate up to --max_pruning_rate {settings.max_pruning_rate}; "
                            "lower the ratio or raise --max_pruning_rate")
    plan = plans[best]
    plan["search"] = {
        "windows": list(windows.shape), "max_blocks": max_k,
        "candidates": [{"blocks": k, "removed_layers": plans[k]["removed_layers"] if k in plans else None,
                        "calibration_loss": losses[k]} for k in sorted(losses)],
        "chosen_blocks": best,
    }
    return plan


def plan_from_scores(hf_model, target: dict[int, float], scores: dict[int, dict[str, torch.Tensor]],
                     settings: PruneSettings, importance: dict[int, float | None], layer_span: tuple[int, int],
                     calib_shape: tuple[int, ...]) -> dict:
    """Assemble the plan from per-layer target rates (1.0 = remove whole) and unit scores of the width-pruned layers.

    ``build_plan`` uses Taylor scores; baselines pass other scores (magnitude) or whole-layer targets (ShortGPT).
    """
    layers = hf_model.model.layers
    entries = []
    for i, layer in enumerate(layers):
        groups, channels = units.num_groups(layer), units.num_channels(layer)
        g_params, c_params = units.params_per_unit(layer, units.ATTENTION), units.params_per_unit(layer, units.MLP)
        before = units.prunable_params(layer)
        layer_total = _layer_params(layer)
        removed_whole = target.get(i, 0.0) >= 1.0
        entry = {
            "index": i, "selected": i in target, "importance": importance.get(i),
            "target_rate": target.get(i, 0.0), "removed_whole": removed_whole,
            "groups_before": groups, "channels_before": channels,
        }
        if removed_whole:
            kept_g, kept_c, after, layer_after = [], [], 0, 0
        else:
            kept_g, kept_c = list(range(groups)), list(range(channels))
            if i in scores and target.get(i, 0.0) > 0:
                kept_g, kept_c = select_units(scores[i][units.ATTENTION], scores[i][units.MLP], g_params, c_params,
                                              target[i], settings.unit_split,
                                              channel_alignment(channels, settings.channel_multiple))
            # biases no unit owns (o_proj's, down_proj's) stay: count what is removed, not what is kept
            after = before - (groups - len(kept_g)) * g_params - (channels - len(kept_c)) * c_params
            layer_after = layer_total - before + after
        entry.update({
            "achieved_rate": 1.0 - after / before,
            "kept_groups": kept_g, "kept_channels": kept_c,
            "groups_after": len(kept_g), "channels_after": len(kept_c),
            "prunable_params_before": before, "prunable_params_after": after,
            "layer_params_before": layer_total, "layer_params_after": layer_after,
        })
        entries.append(entry)

    sel = [e for e in entries if e["selected"]]
    prunable_before = sum(e["prunable_params_before"] for e in sel)
    prunable_after = sum(e["prunable_params_after"] for e in sel)
    decoder_before = sum(e["layer_params_before"] for e in entries)
    decoder_after = sum(e["layer_params_after"] for e in entries)
    model_before = _model_params(hf_model)
    model_after = model_before - decoder_before + decoder_after
    return {
        "format": PLAN_FORMAT,
        "num_layers": len(layers),
        "layer_start": layer_span[0],
        "layer_end": layer_span[1],
        "settings": asdict(settings),
        "calibration": {"num_windows": int(calib_shape[0]), "seq_len": int(calib_shape[1])},
        "layers": entries,
        "removed_layers": [e["index"] for e in entries if e["removed_whole"]],
        "totals": {
            "target_ratio": settings.pruning_ratio,
            "prunable_params_before": prunable_before, "prunable_params_after": prunable_after,
            "achieved_ratio_selected": 1.0 - prunable_after / prunable_before,
            "decoder_params_before": decoder_before, "decoder_params_after": decoder_after,
            "achieved_ratio_decoder": 1.0 - decoder_after / decoder_before,
            "model_params_before": model_before, "model_params_after": model_after,
            "achieved_ratio_model": 1.0 - model_after / model_before,
        },
    }


def plan_digest(plan: dict) -> str:
    """A hash of what the pruned model's structure is (which units each layer kept): a fine-tune's checkpoint
    resumes only onto the same cut, not onto other channels of equal count."""
    kept = [(e["index"], e["removed_whole"], e["kept_groups"], e["kept_channels"]) for e in plan["layers"]]
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()


def _check_plan(hf_model, plan: dict) -> None:
    if plan.get("format") != PLAN_FORMAT:
        raise GaqpruneError(f"pruning plan format {plan.get('format')!r} is not supported; expected {PLAN_FORMAT!r}")
    layers = hf_model.model.layers
    if plan["num_layers"] != len(layers):
        raise GaqpruneError(f"the pruning plan is for {plan['num_layers']} layers but the model has {len(layers)}")
    for entry, layer in zip(plan["layers"], layers):
        if (entry["groups_before"], entry["channels_before"]) != (units.num_groups(layer), units.num_channels(layer)):
            raise GaqpruneError(
                f"the pruning plan does not match the model: layer {entry['index']} has "
                f"{units.num_groups(layer)} groups / {units.num_channels(layer)} channels, the plan expects "
                f"{entry['groups_before']} / {entry['channels_before']} (already pruned?)"
            )


def _width_changes(entry: dict) -> tuple[bool, bool]:
    """(GQA groups removed, MLP channels removed) in a plan entry's layer."""
    return entry["groups_after"] < entry["groups_before"], entry["channels_after"] < entry["channels_before"]


def _removed_spans(plan: dict) -> dict[int, list[int]]:
    """Kept layer -> the run of whole-removed layers right after it (the span its down_proj is folded over)."""
    removed = set(plan["removed_layers"])
    spans: dict[int, list[int]] = {}
    for i in range(plan["num_layers"] - 1):
        if i not in removed and i + 1 in removed:
            j = i + 1
            while j in removed:
                j += 1
            spans[i] = list(range(i + 1, j))
    return spans


def _prune_layer(layer, entry: dict, refit: bool, needed: bool, stream, dense, ridge: float, folded=None):
    """Cut one (resident) layer to its plan entry, refitting o_proj / down_proj when ``refit``; advance the pruned
    (and dense) calibration streams past it when later layers still need them. Returns ``(stream, dense)``.

    ``folded``: for a layer followed by whole-removed layers, the dense (mid-layer, after-the-span) hidden states;
    down_proj is refit toward the latter (the span folded into this block) and the returned dense stream is the one
    after the span."""
    g_changed, c_changed = _width_changes(entry)
    if refit and (g_changed or c_changed or folded is not None):
        mid = out = None
        if folded is not None:
            mid, out = folded
        elif dense is not None:
            mid, out = compensation.run_dense_layer(layer, dense)
        owner = units.owners(layer, units.ATTENTION)[-1]  # o_proj columns
        attention = mlp = None
        if g_changed:
            attention = (partial(surgery.keep_units, layer, units.ATTENTION, entry["kept_groups"]),
                         units.kept_positions(owner, torch.as_tensor(entry["kept_groups"])))
        if c_changed or folded is not None:
            mlp = (partial(surgery.keep_units, layer, units.MLP, entry["kept_channels"]),
                   torch.as_tensor(entry["kept_channels"]))
        compensation.prune_layer_with_refit(layer, attention, mlp, stream, ridge,
                                            None if dense is None else (mid, [h for h, _ in out]))
        if needed:
            stream = compensation.run_layer(layer, stream)
            if dense is not None:
                dense = out
        return stream, dense
    surgery.keep_units(layer, units.ATTENTION, entry["kept_groups"])
    surgery.keep_units(layer, units.MLP, entry["kept_channels"])
    if needed:
        advanced = compensation.run_layer(layer, stream)
        if dense is not None:
            dense = advanced if dense is stream else compensation.run_layer(layer, dense)
        stream = advanced
    return stream, dense


def _through(hf_model, indices: list[int], batches):
    """The calibration micro-batches after the (dense, still present) layers ``indices``, each made resident in turn."""
    for i in indices:
        with resident(hf_model, i) as layer:
            batches = compensation.run_layer(layer, batches)
    return batches


def apply_plan(hf_model, plan: dict, calib_windows: torch.Tensor | None = None, progress: bool = False) -> None:
    """Prune ``hf_model`` in place as ``plan`` says (any device/dtype).

    With ``plan["settings"]["compensation"]`` ``lstsq`` or ``residual`` and ``calib_windows`` given, o_proj /
    down_proj of every width-pruned layer are refit by least squares on those windows, layer by layer
    (deterministic for fixed windows; see ``gaqprune.compensation``); without windows the plan is applied as
    plain removal. With ``residual``, a run of whole-removed layers is folded into the block before it: that
    block's down_proj is refit toward the dense residual stream after the run (ReplaceMe's linear replacement of
    a removed span, github.com/mts-ai/ReplaceMe ``ReplaceMe/lstsq.py`` at 5bb71d9, which fits ``down_proj <- T^T W``
    with one ``T``; here ``W`` itself, with the refit's ridge). Measured in ``benchmarks/lever_depth.py``.
    ``progress`` shows a bar over the layers (with an ETA: the refit is the slow part).
    """
    _run_plan(hf_model, plan, calib_windows, progress=progress)


def _run_plan(hf_model, plan: dict, calib_windows: torch.Tensor | None, progress: bool = False,
              score: bool = False) -> float | None:
    """``apply_plan``; with ``score`` the model is left as it is (each changed layer is cut and refit on a scratch
    copy, one at a time) and the pruned model's mean next-token loss on ``calib_windows`` is returned: what the plan
    would give, at the cost of applying it (``--allocation search`` scores its candidates so)."""
    from tqdm.auto import tqdm

    _check_plan(hf_model, plan)
    settings = plan["settings"]
    layers = hf_model.model.layers
    mode = settings.get("compensation", "none")
    # residual refit: the block before a whole-removed span is refit toward the dense stream after the span (a plan
    # may say "fold_spans": false for the ablation in benchmarks/lever_depth.py)
    spans = _removed_spans(plan) if mode == "residual" and settings.get("fold_spans", True) else {}
    changed = sorted({e["index"] for e in plan["layers"] if not e["removed_whole"] and any(_width_changes(e))} | set(spans))
    refit = mode in ("lstsq", "residual") and calib_windows is not None and bool(changed)
    in_spans = {j for span in spans.values() for j in span} if refit else set()  # run on the dense stream by _through
    ridge = float(settings.get("compensation_ridge", 1.0))
    stream = dense = None  # calibration micro-batches entering the current layer: pruned model, dense model
    if refit or score:
        ids = micro_batches(calib_windows, settings.get("taylor_batch_size", 4), next(hf_model.parameters()).device)
        stream = batch_layer_inputs(hf_model, ids)
        dense = stream if refit and mode == "residual" else None  # the same list until the first layer differs
    bar = tqdm(total=len(layers), desc="surgery" + (f" + {mode} refit" if refit else ""), unit="layer",
               disable=not progress, leave=False)
    for entry in plan["layers"]:
        g_changed, c_changed = _width_changes(entry)
        needed = refit and entry["index"] < changed[-1]  # the streams are needed up to the last refit layer
        if score:
            needed = True  # the pruned stream goes to the end; the dense one only as far as the last refit
            if refit and entry["index"] > changed[-1]:
                dense = None
        span = spans.get(entry["index"]) if refit else None
        if entry["removed_whole"]:
            if dense is not None and needed and entry["index"] not in in_spans:
                with resident(hf_model, entry["index"]) as layer:
                    dense = compensation.run_layer(layer, dense)  # removed below; the pruned stream skips it
        elif g_changed or c_changed or needed or span:
            folded = None
            if span:  # the dense stream through this layer and the span, one resident layer at a time
                with resident(hf_model, entry["index"]) as layer:
                    mid, out = compensation.run_dense_layer(layer, dense)
                folded = (mid, _through(hf_model, span, out))
            # an offloaded layer is read in once (twice before a folded span), and written back only when it changed
            changes = g_changed or c_changed or bool(span)
            with resident(hf_model, entry["index"], keep=changes and not score) as layer:
                work = copy.deepcopy(layer) if changes and score else layer  # scoring cuts a scratch copy
                stream, dense = _prune_layer(work, entry, refit, needed, stream, dense, ridge, folded)
                del work
        bar.update()
    bar.refresh()  # the layers after the last refit take no time: draw 100 % (a log file keeps the last state drawn)
    bar.close()
    if score:
        with torch.no_grad():
            nll = sum(float(tail_nll(hf_model, h, batch)) for batch, (h, _) in zip(ids, stream))
        return nll / sum(b.numel() - b.shape[0] for b in ids)
    surgery.remove_layers(hf_model, plan["removed_layers"])  # also syncs a per-layer config with the new shapes
