"""Quality benchmark: perplexity of gaqprune's defaults against peer methods at the same parameter count.

On the embedded SmolLM2-135M (30 layers, 9 q / 3 KV heads), for each ratio of DECODER-LAYER parameters
removed, every method prunes a fresh copy of the dense model and is evaluated at window 128 on the
evaluation split (LLM-Pruner protocol). Prints one Markdown table and writes JSON to ``--out``.

    python benchmarks/quality.py --ratios 0.2 0.3 --importance_cache imp.json --out quality.json  # acceptance table
    python benchmarks/quality.py --eval_windows 80 --methods dense gaqprune     # quick research loop
    python benchmarks/quality.py --variant 'nocomp={"compensation": "none"}'    # extra rows: default + overrides
    python benchmarks/quality.py --eval_seq_len 2048 --eval_batch_size 2 ...    # the 2048-token protocol (18 windows)
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

from gaqprune.core import baselines, units
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.data.datamodule import LMDataModule
from gaqprune.errors import GaqpruneError
from gaqprune.models.load import load_model
from gaqprune.settings import ImportanceSettings, PruneSettings

PEERS = ("magnitude", "taylor_uniform", "taylor_mlp", "shortgpt")
METHODS = ("dense", *PEERS, "gaqprune")
LABELS = {
    "dense": "dense",
    "magnitude": "uniform L2 magnitude (3..27)",
    "taylor_uniform": "uniform Taylor, groups + MLP (LLM-Pruner, 3..27)",
    "taylor_mlp": "uniform Taylor, MLP only (3..27)",
    "shortgpt": "ShortGPT depth pruning",
    "gaqprune": "gaqprune defaults",
}
LLM_PRUNER_RANGE = {"layer_start": 3, "layer_end": 28}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_embedded(eval_windows: int | None, num_examples: int, max_seq_len: int, eval_seq_len: int = 128):
    """``(dense model fp32, LMDataModule, eval windows [N, eval_seq_len], calibration windows [num_examples,
    max_seq_len])``: the setup every quality script shares (evaluation at window 128 by default, the first
    ``eval_windows`` or all of them: 298 at 128 tokens, 18 at 2048)."""
    dense = load_model("embedded", dtype="float32")
    data = LMDataModule(max_seq_len=eval_seq_len, max_eval_windows=eval_windows)
    return dense, data, data.eval_windows(), data.calibration_windows(num_examples, max_seq_len)


def start_lever(eval_windows: int | None, num_examples: int, max_seq_len: int, importance_path: str | Path):
    """``(start time, dense model, LMDataModule, eval windows, calibration windows, layer importance)``: the opening
    every quality-lever script shares (seeded, timed from here, importance read from its cache file)."""
    torch.manual_seed(0)
    started = time.time()
    dense, data, eval_windows_, calib = load_embedded(eval_windows, num_examples, max_seq_len)
    return started, dense, data, eval_windows_, calib, read_importance(importance_path)


def read_importance(path: str | Path) -> dict[int, float]:
    """A layer -> score JSON as ``--importance_cache`` stores it."""
    return {int(k): float(v) for k, v in json.loads(Path(path).read_text()).items()}


def finish(summary: dict, out: str | None, started: float) -> dict:
    """Stamp the wall time, write ``summary`` as JSON to ``out`` (if given) and log the end."""
    summary["seconds"] = round(time.time() - started, 1)
    if out:
        Path(out).write_text(json.dumps(summary, indent=2))
    log(f"done in {summary['seconds']:.0f}s")
    return summary


def ratio_for_decoder_fraction(model, fraction: float, settings: PruneSettings) -> float:
    """The ``--pruning_ratio`` (of the selected layers' prunable parameters) that removes ``fraction`` of the decoder."""
    layers = model.model.layers
    start, end = settings.layer_range(len(layers))
    decoder = sum(p.numel() for p in layers.parameters())
    prunable = sum(units.prunable_params(layers[i]) for i in range(start, end))
    return fraction * decoder / prunable


def make_plan(method: str, model, fraction: float, calib: torch.Tensor, importance: dict[int, float],
              overrides: dict) -> dict:
    if method in ("magnitude", "taylor_uniform", "taylor_mlp"):
        s = PruneSettings(pruning_strategy="uniform", min_pruning_rate=0.0, max_pruning_rate=0.9, compensation="none",
                          unit_split="mlp_only" if method == "taylor_mlp" else "same_rate", **LLM_PRUNER_RANGE)
        s = replace(s, pruning_ratio=ratio_for_decoder_fraction(model, fraction, s))
        return baselines.uniform_plan(model, calib, s, "magnitude" if method == "magnitude" else "taylor")
    if method == "shortgpt":
        num_remove = round(fraction * len(model.model.layers))
        return baselines.shortgpt_plan(model, calib, num_remove, PruneSettings(compensation="none"))
    s = replace(PruneSettings(), num_examples=len(calib), max_seq_len=calib.shape[1], **overrides)
    s = replace(s, pruning_ratio=ratio_for_decoder_fraction(model, fraction, s))
    return build_plan(model, importance, calib, s, progress=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3], help="fractions of decoder params removed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON: an extra row with gaqprune defaults plus these PruneSettings overrides")
    parser.add_argument("--eval_windows", type=int, default=None, help="evaluate the first N of the 298 windows")
    parser.add_argument("--eval_seq_len", type=int, default=128, help="evaluation window (LLM-Pruner: 128 and 2048)")
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--num_examples", type=int, default=64,
                        help="calibration windows for Taylor and compensation, shared by all methods (guide: 32-64)")
    parser.add_argument("--max_seq_len", type=int, default=128, help="tokens per calibration window (guide: 64-128)")
    parser.add_argument("--compensation_samples", type=int, default=PruneSettings.compensation_samples,
                        help="refit windows of gaqprune's least-squares compensation (0: refit on the Taylor windows)")
    parser.add_argument("--compensation_seq_len", type=int, default=PruneSettings.compensation_seq_len)
    parser.add_argument("--importance_samples", type=int, default=ImportanceSettings.importance_samples)
    parser.add_argument("--importance_method", default=ImportanceSettings.importance_method)
    parser.add_argument("--importance_cache", default=None, help="JSON file to reuse/store the layer importance")
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    started = time.time()
    dense, data, eval_windows, calib = load_embedded(args.eval_windows, args.num_examples, args.max_seq_len,
                                                     args.eval_seq_len)
    refit = calib
    if args.compensation_samples:
        refit = data.calibration_windows(args.compensation_samples, args.compensation_seq_len, seed=2,
                                         what="--compensation_samples")
    log(f"model loaded; {len(eval_windows)} eval windows, calibration {tuple(calib.shape)}, refit {tuple(refit.shape)}")

    importance: dict[int, float] = {}
    needs_importance = "gaqprune" in args.methods or args.variant
    cache = Path(args.importance_cache) if args.importance_cache else None
    if needs_importance and cache is not None and cache.is_file():
        importance = read_importance(cache)
    elif needs_importance:
        from gaqprune.core.importance import compute_layer_importance

        imp_windows = data.calibration_windows(args.importance_samples, 128, what="--importance_samples")
        importance = dict(compute_layer_importance(dense, imp_windows, args.importance_method, progress=False))
        if cache is not None:
            cache.write_text(json.dumps(importance))
        log(f"layer importance ({args.importance_method}) computed")

    rows: list[tuple[str, str, dict]] = []
    for fraction in args.ratios:
        for method in args.methods:
            if method != "dense":
                rows.append((f"{fraction}", method, {}))
        for spec in args.variant:
            name, _, overrides = spec.partition("=")
            rows.append((f"{fraction}", name, json.loads(overrides or "{}")))
    results = []
    if "dense" in args.methods:
        ppl = perplexity(dense, eval_windows, batch_size=args.eval_batch_size)
        results.append({"ratio": 0.0, "method": "dense", "label": "dense", "ppl": ppl, "removed_decoder": 0.0,
                        "removed_model": 0.0, "seconds": 0.0})
        log(f"dense ppl {ppl:.2f}")
    summary = {
        "eval_windows": len(eval_windows), "eval_seq_len": args.eval_seq_len, "calibration": list(calib.shape),
        "refit": list(refit.shape),
        "importance_method": args.importance_method,
        "importance_samples": args.importance_samples, "importance": importance, "results": results,
        "defaults": {k: v for k, v in vars(PruneSettings()).items()},
    }
    for fraction, method, overrides in rows:
        t0 = time.time()
        model = copy.deepcopy(dense)
        label = LABELS.get(method, f"variant {method}: {overrides}")
        try:
            plan = make_plan(method if method in METHODS else "gaqprune", model, float(fraction), calib, importance,
                             overrides)
        except GaqpruneError as err:  # e.g. a ratio the default rate bounds cannot reach: a row, not the end of the run
            results.append({"ratio": float(fraction), "method": method, "label": label, "error": str(err),
                            "overrides": overrides})
            log(f"{fraction} {method}: not reachable: {err}")
            continue
        apply_plan(model, plan, refit)  # plans without compensation ignore the windows
        t_prune = time.time() - t0
        ppl = perplexity(model, eval_windows, batch_size=args.eval_batch_size)
        totals = plan["totals"]
        n_after = sum(p.numel() for p in model.parameters())
        assert n_after == totals["model_params_after"], (n_after, totals["model_params_after"])
        results.append({
            "ratio": float(fraction), "method": method, "label": label,
            "ppl": ppl, "removed_decoder": totals["achieved_ratio_decoder"], "removed_model": totals["achieved_ratio_model"],
            "removed_layers": plan["removed_layers"], "prune_seconds": round(t_prune, 1),
            "rates": [round(e["achieved_rate"], 3) for e in plan["layers"]],
            "groups_after": [e["groups_after"] for e in plan["layers"]], "overrides": overrides,
        })
        log(f"{fraction} {method}: ppl {ppl:.2f}, removed {totals['achieved_ratio_decoder']:.4f} of decoder "
            f"({t_prune:.0f}s pruning) layers removed {plan['removed_layers']}")
        del model
        if args.out:  # the rows so far survive an interrupted run
            Path(args.out).write_text(json.dumps({**summary, "complete": False}, indent=2))

    table = [f"| target | method | PPL (w{args.eval_seq_len}) | removed: decoder | removed: whole model |",
             "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            table.append(f"| {r['ratio']:.0%} | {r['label']} | not reachable | | |")
            continue
        table.append(f"| {r['ratio']:.0%} | {r['label']} | {r['ppl']:.2f} | {r['removed_decoder']:.2%} | "
                     f"{r['removed_model']:.2%} |")
    print("\n".join(table))
    summary["complete"] = True
    return finish(summary, args.out, started)


if __name__ == "__main__":
    main()
