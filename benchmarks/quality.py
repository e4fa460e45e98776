"""Quality benchmark: perplexity of gaqprune's defaults against peer methods at the same parameter count.

On the embedded SmolLM2-135M (30 layers, 9 q / 3 KV heads), for each ratio of DECODER-LAYER parameters
removed, every method prunes a fresh copy of the dense model and is evaluated at window 128 on the
evaluation split (LLM-Pruner protocol). Prints one Markdown table and writes JSON to ``--out``.

    python benchmarks/quality.py --ratios 0.2 0.3 --importance_cache imp.json --out quality.json  # acceptance table
    python benchmarks/quality.py --eval_windows 80 --methods dense gaqprune     # quick research loop
    python benchmarks/quality.py --variant 'nocomp={"compensation": "none"}'    # extra rows: default + overrides
    python benchmarks/quality.py --eval_seq_len 2048 --eval_batch_size 2 ...    # the 2048-token protocol (18 windows)

Peers from ``benchmarks/peers/*.py`` (each a ``prune(model, calib, fraction, **options) -> dict``; see ``PEER_FILES``)
join the methods as ``--methods replaceme replaceme_cosine evopress flap wanda_sp slimgpt osscar`` when their file
exists. With ``--texts`` every method prunes a fresh copy once per ratio and is evaluated on every (text, window)
pair of ``--texts`` x ``--eval_seq_lens`` (``benchmarks/texts.py``; batch 16 at 128 tokens, 2 at 2048), and one
Markdown table per pair is printed, with "x best peer" (perplexity / the best peer's at that ratio) for gaqprune rows:

    python benchmarks/quality.py --shared_calibration --num_examples 128 --max_seq_len 128 --texts wiki sotu \
        --eval_seq_lens 128 2048 --ratios 0.2 0.3 --importance_cache benchmarks/quality_importance_removal50.json \
        --out benchmarks/quality_round2.json --resume
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from collections.abc import Callable
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
# Peer methods in benchmarks/peers/<file>.py: method name -> (file, fixed options passed to its prune()).
PEER_FILES: dict[str, tuple[str, dict]] = {
    "replaceme": ("replaceme", {"loss": "lstsq"}),
    "replaceme_cosine": ("replaceme", {"loss": "cosine"}),
    # EvoPress's own budget (evo_drop_search.py / run_drop_search.sh: 64 initial points, 32 offspring, stages of
    # 2048 and 32768 tokens, k (L - k) / 1.5 generations) is hours on this CPU; the harness caps it (see evopress.py).
    "evopress": ("evopress", {"max_generations": 4, "offspring": 8, "initially_generated": 16, "initial_tokens": 256,
                              "survivors_per_selection": (2, 1), "tokens_per_selection": (256, 1024)}),
    "flap": ("flap", {}),
    "wanda_sp": ("wanda_sp", {}),
    "slimgpt": ("slimgpt", {}),
    "osscar": ("osscar", {}),
}
BENCH_DIR = Path(__file__).resolve().parent
FILE_PEERS = tuple(m for m, (f, _) in PEER_FILES.items() if (BENCH_DIR / "peers" / f"{f}.py").is_file())
METHODS = ("dense", *PEERS, *FILE_PEERS, "gaqprune")
TOLERANCE = 0.005  # |achieved - target| share of the decoder every method must meet
LABELS = {
    "dense": "dense",
    "magnitude": "uniform L2 magnitude (3..27)",
    "taylor_uniform": "uniform Taylor, groups + MLP (LLM-Pruner, 3..27)",
    "taylor_mlp": "uniform Taylor, MLP only (3..27)",
    "shortgpt": "ShortGPT depth pruning",
    "gaqprune": "gaqprune defaults",
    "replaceme": "ReplaceMe (LS)",
    "replaceme_cosine": "ReplaceMe (cosine, Adam)",
    "evopress": "EvoPress depth search",
    "flap": "FLAP",
    "wanda_sp": "Wanda-sp",
    "slimgpt": "SlimGPT",
    "osscar": "OSSCAR",
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


def peer_prune(method: str) -> Callable[..., dict]:
    """``prune(model, calib, fraction, **options)`` of a file peer, its fixed options bound."""
    file, fixed = PEER_FILES[method]
    if str(BENCH_DIR.parent) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent))
    module = importlib.import_module(f"benchmarks.peers.{file}")
    return lambda model, calib, fraction: module.prune(model, calib, fraction, **fixed)


TASK_KEY = "gaqprune_wiki_next acc_norm %"  # --task_items: kept with the perplexities, but higher is better


def best_peer_ppl(results: list[dict], ratio: float, key: str) -> tuple[str, float] | None:
    """(method, perplexity) of the best non-gaqprune method at ``ratio`` on evaluation set ``key``."""
    peers = [(r["ppl_by_set"][key], r["method"]) for r in results if r.get("ratio") == ratio and "error" not in r
             and r["method"] in PEERS + FILE_PEERS and key in r.get("ppl_by_set", {})]
    if not peers:
        return None
    value, method = max(peers) if key == TASK_KEY else min(peers)
    return method, value


def tables(results: list[dict], keys: list[str]) -> str:
    """One Markdown table per evaluation set: every method beside dense, "x best peer" for gaqprune rows."""
    out = []
    for key in keys:
        metric = "acc_norm %" if key == TASK_KEY else "PPL"
        out += [f"\n### {key}\n", f"| target | method | {metric} | x best peer | removed: decoder | removed: whole model | "
                "pruning s |", "|---|---|---|---|---|---|---|"]
        for r in results:
            if "error" in r:
                out.append(f"| {r['ratio']:.0%} | {r['label']} | not reachable or failed: {r['error'][:60]} | | | | |")
                continue
            if key not in r.get("ppl_by_set", {}):
                continue
            ppl = r["ppl_by_set"][key]
            rel = ""
            if r["method"] not in METHODS or r["method"] == "gaqprune":
                best = best_peer_ppl(results, r["ratio"], key)
                rel = f"{ppl / best[1]:.3f} ({best[0]})" if best else ""
            out.append(f"| {r['ratio']:.0%} | {r['label']} | {ppl:.2f} | {rel} | {r['removed_decoder']:.2%} | "
                       f"{r['removed_model']:.2%} | {r.get('prune_seconds', 0.0):.0f} |")
    return "\n".join(out)


def eval_batch(seq_len: int, batch_128: int) -> int:
    """Evaluation batch: ``batch_128`` windows at 128 tokens, otherwise about 4096 tokens (2 at 2048)."""
    return batch_128 if seq_len <= 128 else max(1, 4096 // seq_len)


def make_plan(method: str, model, fraction: float, calib: torch.Tensor, importance: dict[int, float],
              overrides: dict, refit: torch.Tensor | None = None) -> dict:
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
    return build_plan(model, importance, calib, s, progress=False, fit_windows=refit)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3], help="fractions of decoder params removed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON: an extra row with gaqprune defaults plus these PruneSettings overrides")
    parser.add_argument("--eval_windows", type=int, default=None, help="evaluate the first N windows of each set")
    parser.add_argument("--eval_seq_len", type=int, default=128, help="evaluation window (LLM-Pruner: 128 and 2048)")
    parser.add_argument("--eval_batch_size", type=int, default=16, help="evaluation batch at 128 tokens")
    parser.add_argument("--texts", nargs="+", default=None, choices=("wiki", "sotu"),
                        help="evaluate on these texts of benchmarks/texts.py (default: the wiki split at --eval_seq_len)")
    parser.add_argument("--eval_seq_lens", type=int, nargs="+", default=None,
                        help="with --texts: evaluation windows (default: --eval_seq_len)")
    parser.add_argument("--shared_calibration", action="store_true",
                        help="calibrate every method (gaqprune's Taylor pass included) on texts.calibration_windows() "
                             "instead of --num_examples x --max_seq_len windows drawn with the data module's seed")
    parser.add_argument("--num_examples", type=int, default=64,
                        help="calibration windows for Taylor and compensation, shared by all methods (guide: 32-64)")
    parser.add_argument("--max_seq_len", type=int, default=128, help="tokens per calibration window (guide: 64-128)")
    parser.add_argument("--compensation_samples", type=int, default=None,
                        help="refit windows of gaqprune's least-squares compensation, drawn apart from the calibration "
                             "ones (0: refit on the Taylor windows); default: gaqprune's rule, the Taylor windows when "
                             f"they hold more tokens than {PruneSettings.compensation_samples} x --compensation_seq_len, "
                             "else that many windows of their own")
    parser.add_argument("--compensation_seq_len", type=int, default=PruneSettings.compensation_seq_len)
    parser.add_argument("--importance_samples", type=int, default=ImportanceSettings.importance_samples)
    parser.add_argument("--importance_method", default=ImportanceSettings.importance_method)
    parser.add_argument("--importance_cache", default=None, help="JSON file to reuse/store the layer importance")
    parser.add_argument("--out", default=None, help="write results JSON here (after every row)")
    parser.add_argument("--task_items", type=int, default=None,
                        help="also score every model on the shipped lm-eval task gaqprune_wiki_next (its first N items; "
                             "0: all 300), the accuracy beside perplexity (needs the [eval] extra; 3-4 min per model "
                             "at 300 items on one core)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and run only the (ratio, method) rows it lacks")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sys.path.insert(0, str(BENCH_DIR))
    import texts as shared_texts

    started = time.time()
    dense, data, legacy_eval, calib = load_embedded(args.eval_windows, args.num_examples, args.max_seq_len,
                                                    args.eval_seq_len)
    shared_calib = shared_texts.calibration_windows(data)
    if args.shared_calibration:
        calib = shared_calib
    refit = calib
    samples = args.compensation_samples
    if samples is None:  # gaqprune's rule (PruneSettings.refits_on_taylor_windows)
        rule = PruneSettings(num_examples=len(calib), max_seq_len=calib.shape[1],
                             compensation_seq_len=args.compensation_seq_len)
        samples = 0 if rule.refits_on_taylor_windows() else rule.compensation_samples
    if samples:
        refit = data.calibration_windows(samples, args.compensation_seq_len, seed=2,
                                         what="--compensation_samples")
    eval_sets: dict[str, torch.Tensor] = {}
    if args.texts:
        for text in args.texts:
            for seq_len in args.eval_seq_lens or [args.eval_seq_len]:
                windows = shared_texts.eval_windows(text, seq_len, data)
                eval_sets[f"{text} w{seq_len}"] = windows[: args.eval_windows] if args.eval_windows else windows
    else:
        eval_sets[f"wiki w{args.eval_seq_len}"] = legacy_eval
    log(f"model loaded; eval sets { {k: len(v) for k, v in eval_sets.items()} }, calibration {tuple(calib.shape)}, "
        f"peers' calibration {tuple(shared_calib.shape)}, refit {tuple(refit.shape)}")

    task = None
    if args.task_items is not None:
        from gaqprune.models.load import load_tokenizer
        from gaqprune.run import zeroshot

        task = zeroshot.ZeroShotSettings(tasks=zeroshot.WIKI_NEXT, eval_limit=args.task_items or None)
        zeroshot.check_settings(task)  # lm-eval missing: one line now, not after the first model
        tokenizer = load_tokenizer("embedded")

    def evaluate(model) -> dict[str, float]:
        by_set = {key: perplexity(model, w, batch_size=eval_batch(w.shape[1], args.eval_batch_size))
                  for key, w in eval_sets.items()}
        if task is not None:  # lm-eval's own acc_norm (the metric reported for this task), in %
            result = zeroshot.evaluate(model, tokenizer, task, batch_size=8, progress=False)["tasks"][zeroshot.WIKI_NEXT]
            by_set[TASK_KEY] = 100 * result["acc_norm"]
        return by_set

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
    results: list[dict] = []
    if args.resume and args.out and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if sorted(old.get("eval_sets", {})) != sorted(eval_sets):
            raise SystemExit(f"--resume: {args.out} holds evaluation sets {sorted(old.get('eval_sets', {}))}, "
                             f"not {sorted(eval_sets)}")
        results = [r for r in old["results"] if "error" not in r]
        done = {(r["ratio"], r["method"]) for r in results}
        rows = [row for row in rows if (float(row[0]), row[1]) not in done]
        log(f"resuming: {len(results)} rows kept, {len(rows)} to run")
    summary = {
        "eval_sets": {k: list(v.shape) for k, v in eval_sets.items()},
        "eval_windows": len(next(iter(eval_sets.values()))), "eval_seq_len": args.eval_seq_len,
        "calibration": list(calib.shape), "peer_calibration": list(shared_calib.shape),
        "shared_calibration": args.shared_calibration, "refit": list(refit.shape),
        "importance_method": args.importance_method,
        "importance_samples": args.importance_samples, "importance": importance, "results": results,
        "defaults": {k: v for k, v in vars(PruneSettings()).items()},
    }

    def save(complete: bool) -> None:
        if args.out:  # the rows so far survive an interrupted run
            Path(args.out).write_text(json.dumps({**summary, "complete": complete}, indent=2))

    if "dense" in args.methods and not any(r["method"] == "dense" for r in results):
        by_set = evaluate(dense)
        results.insert(0, {"ratio": 0.0, "method": "dense", "label": "dense", "ppl": next(iter(by_set.values())),
                           "ppl_by_set": by_set, "removed_decoder": 0.0, "removed_model": 0.0, "seconds": 0.0,
                           "prune_seconds": 0.0})
        log(f"dense ppl {by_set}")
        save(False)
    decoder_before = shared_texts.decoder_params(dense)
    model_before = sum(p.numel() for p in dense.parameters())
    for fraction, method, overrides in rows:
        t0 = time.time()
        model = copy.deepcopy(dense)
        label = LABELS.get(method, f"variant {method}: {overrides}")
        row: dict = {"ratio": float(fraction), "method": method, "label": label, "overrides": overrides}
        if method in FILE_PEERS:
            try:
                details = peer_prune(method)(model, shared_calib, float(fraction))
            except Exception as err:  # noqa: BLE001 - a peer that fails (e.g. one still being written) is a row, not the end
                results.append({**row, "error": f"{type(err).__name__}: {err}"})
                log(f"{fraction} {method}: failed: {type(err).__name__}: {err}")
                save(False)
                continue
            t_prune = time.time() - t0
            row["details"] = details
        else:
            try:
                plan = make_plan(method if method in METHODS else "gaqprune", model, float(fraction), calib, importance,
                                 overrides, refit)
            except GaqpruneError as err:  # e.g. a ratio the default rate bounds cannot reach: a row, not the end
                results.append({**row, "error": str(err)})
                log(f"{fraction} {method}: not reachable: {err}")
                save(False)
                continue
            apply_plan(model, plan, refit)  # plans without compensation ignore the windows
            t_prune = time.time() - t0
            totals = plan["totals"]
            n_after = sum(p.numel() for p in model.parameters())
            assert n_after == totals["model_params_after"], (n_after, totals["model_params_after"])
            if "search" in plan:
                row["search"] = plan["search"]
            row.update({"removed_layers": plan["removed_layers"],
                        "rates": [round(e["achieved_rate"], 3) for e in plan["layers"]],
                        "groups_after": [e["groups_after"] for e in plan["layers"]]})
        removed_decoder = 1 - shared_texts.decoder_params(model) / decoder_before
        removed_model = 1 - sum(p.numel() for p in model.parameters()) / model_before
        by_set = evaluate(model)
        row.update({"ppl": next(iter(by_set.values())), "ppl_by_set": by_set, "removed_decoder": removed_decoder,
                    "removed_model": removed_model, "prune_seconds": round(t_prune, 1),
                    "within_tolerance": abs(removed_decoder - float(fraction)) <= TOLERANCE})
        results.append(row)
        log(f"{fraction} {method}: ppl {by_set}, removed {removed_decoder:.4f} of decoder ({t_prune:.0f}s pruning)")
        del model
        save(False)

    keys = list(eval_sets) + ([TASK_KEY] if task is not None else [])
    print(tables(results, keys))
    summary["tables"] = tables(results, keys)
    summary["complete"] = True
    summary = finish(summary, args.out, started)
    missed = [(r["ratio"], r["method"], r["removed_decoder"]) for r in results
              if "error" not in r and r["method"] != "dense" and not r.get("within_tolerance", True)]
    # Checked after every row is written: a miss fails the run without losing the other rows.
    assert not missed, f"methods off their target by more than {TOLERANCE} of the decoder: {missed}"
    return summary


if __name__ == "__main__":
    main()
