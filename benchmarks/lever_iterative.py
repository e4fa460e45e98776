"""Lever prototype: iterative pruning (re-score after each step) against today's one-shot pruning.

Per-layer final rates are allocated ONCE from layer importance exactly as ``build_plan`` does; each layer's final
size is the one-shot plan's (prunable parameters after). Iterative pruning reaches it in N rounds: before round k
the Taylor scores are recomputed on the current (already pruned + compensated) model, each layer removes what is
left of k/N of its final removal (rate relative to its CURRENT size, ``select_units`` with the plan's split and
channel alignment), and the round is applied with ``apply_plan`` (surgery + least-squares compensation) on a
per-round plan from ``plan_from_scores``. Every round uses the same calibration windows for Taylor and
compensation. N = 1 is today's one-shot plan; the dense Taylor scores are computed once and shared by N = 1 and
round 1 of every N (their time is added to each row's seconds).

    OMP_NUM_THREADS=1 GAQPRUNE_CACHE=.cache/test python benchmarks/lever_iterative.py \
        --eval_windows 80 --rounds 1 2 4 --num_examples 64 --max_seq_len 128 --out iterative.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from gaqprune.core import allocation, units
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan, channel_alignment, plan_from_scores
from gaqprune.core.taylor import taylor_scores
from gaqprune.settings import PruneSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import finish, log, ratio_for_decoder_fraction, start_lever  # noqa: E402

HERE = Path(__file__).resolve().parent


def decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def one_shot_targets(model, importance: dict[int, float], settings: PruneSettings) -> tuple[dict[int, float], tuple]:
    """Per-layer target rates exactly as ``build_plan`` allocates them (same call, same settings)."""
    layers = model.model.layers
    start, end = settings.layer_range(len(layers))
    selected = list(range(start, end))
    rates = allocation.allocate_rates(
        [importance[i] for i in selected], settings.pruning_ratio, settings.pruning_strategy, settings.alpha,
        settings.min_pruning_rate, settings.max_pruning_rate, [units.prunable_params(layers[i]) for i in selected],
        settings.whole_layer_rate,
    )
    return dict(zip(selected, rates)), (start, end)


def _lowest(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices kept after removing the ``remove`` lowest-scoring units (ties: lower index removed first)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[remove:])


def prune_iterative(model, one_shot: dict, rounds: int, calib: torch.Tensor, settings: PruneSettings,
                    importance: dict[int, float], span: tuple[int, int], dense_scores: dict,
                    mode: str = "params") -> list[dict]:
    """Prune ``model`` (dense) in ``rounds`` rounds to the one-shot plan's per-layer sizes; returns per-round info.

    ``params``: round k removes what is left of k/N of the layer's final parameter removal, units chosen by
    ``select_units`` (the plan's split and alignment) at the rate relative to the layer's current size; the
    group/channel mix may differ from one-shot. ``counts``: round k removes k/N of the one-shot plan's removed
    GQA groups and of its removed MLP channels (rounded, channels to the alignment multiple), each kind's
    lowest fresh Taylor scores, landing exactly on the one-shot counts.
    """
    layers = model.model.layers
    sel = [e for e in one_shot["layers"] if e["selected"]]
    before = {e["index"]: e["prunable_params_before"] for e in sel}
    final = {e["index"]: e["prunable_params_after"] for e in sel}
    counts = {e["index"]: (e["groups_before"], e["groups_after"], e["channels_before"], e["channels_after"]) for e in sel}
    info = []
    for k in range(1, rounds + 1):
        t0 = time.time()
        target, want = {}, {}
        for i in before:
            current = units.prunable_params(layers[i])
            if mode == "counts":
                g0, g_final, c0, c_final = counts[i]
                align = channel_alignment(c0, settings.channel_multiple)
                g_want = g0 - math.floor(k / rounds * (g0 - g_final) + 0.5)
                c_want = c0 - round(k / rounds * (c0 - c_final) / align) * align
                if k == rounds:
                    g_want, c_want = g_final, c_final
                if (g_want, c_want) != (units.num_groups(layers[i]), units.num_channels(layers[i])):
                    want[i] = (g_want, c_want)
                    target[i] = 1e-9  # marks the layer selected; its kept units are set below
                continue
            want_after = before[i] - (before[i] - final[i]) * k / rounds
            rate = 1.0 - want_after / current
            if rate > 0:
                target[i] = rate
        if k == 1:
            scores = {i: dense_scores[i] for i in target}
            t_taylor = 0.0  # shared dense scores; their time is added by the caller
        else:
            scores = taylor_scores(model, calib, sorted(target), batch_size=settings.taylor_batch_size)
            t_taylor = time.time() - t0
        plan = plan_from_scores(model, target, scores, settings, importance, span, tuple(calib.shape))
        for i, (g_want, c_want) in want.items():
            entry = plan["layers"][i]
            entry["kept_groups"] = _lowest(scores[i][units.ATTENTION], entry["groups_before"] - g_want)
            entry["kept_channels"] = _lowest(scores[i][units.MLP], entry["channels_before"] - c_want)
            entry["groups_after"], entry["channels_after"] = g_want, c_want
        apply_plan(model, plan, calib)
        info.append({
            "round": k, "groups_before": [e["groups_before"] for e in plan["layers"]],
            "layers_pruned": len(target), "taylor_seconds": round(t_taylor, 1),
            "seconds": round(time.time() - t0, 1),
            "groups_after": [units.num_groups(layer) for layer in layers],
            "channels_after": [units.num_channels(layer) for layer in layers],
        })
        log(f"  round {k}/{rounds}: {len(target)} layers pruned, {info[-1]['seconds']}s "
            f"(taylor {t_taylor:.0f}s), groups removed so far "
            f"{sum(b - g for b, g in zip(info[0]['groups_before'], info[-1]['groups_after']))}")
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3], help="fractions of decoder params removed")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 4], help="numbers of rounds (1 = one-shot)")
    parser.add_argument("--modes", nargs="+", default=["params"], choices=["params", "counts"],
                        help="how rounds split the removal (see prune_iterative); one row per mode for each N > 1")
    parser.add_argument("--eval_windows", type=int, default=None, help="evaluate the first N of the 298 windows")
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--num_examples", type=int, default=64, help="calibration windows (Taylor + compensation)")
    parser.add_argument("--max_seq_len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--importance_cache", default=str(HERE / "quality_importance_removal50.json"))
    parser.add_argument("--check_build_plan", action="store_true",
                        help="also run build_plan and assert the one-shot plan equals it (costs one Taylor pass)")
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args(argv)
    started, dense, _, eval_windows, calib, importance = start_lever(args.eval_windows, args.num_examples,
                                                                    args.max_seq_len, args.importance_cache)
    base = replace(PruneSettings(), num_examples=len(calib), max_seq_len=calib.shape[1])
    start, end = base.layer_range(len(dense.model.layers))
    log(f"model loaded; {len(eval_windows)} eval windows, calibration {tuple(calib.shape)}, layers [{start}, {end})")

    t0 = time.time()
    dense_scores = taylor_scores(dense, calib, list(range(start, end)), batch_size=base.taylor_batch_size)
    t_dense_taylor = time.time() - t0
    log(f"dense Taylor scores: {t_dense_taylor:.0f}s")
    dense_decoder = decoder_params(dense)

    results = []
    for fraction in args.fractions:
        s = replace(base, pruning_ratio=ratio_for_decoder_fraction(dense, fraction, base))
        target, span = one_shot_targets(dense, importance, s)
        imp_sel = {i: importance[i] for i in target}
        one_shot = plan_from_scores(dense, target, dense_scores, s, imp_sel, span, tuple(calib.shape))
        if args.check_build_plan:
            reference = build_plan(dense, importance, calib, s, progress=False)
            assert reference == one_shot, "one-shot plan differs from build_plan"
            log("one-shot plan == build_plan")
        final_after = [e["prunable_params_after"] for e in one_shot["layers"]]
        for rounds, mode in [(n, m) for n in args.rounds for m in (["one-shot"] if n == 1 else args.modes)]:
            t0 = time.time()
            model = copy.deepcopy(dense)
            if rounds == 1:
                apply_plan(model, one_shot, calib)
                info = [{"round": 1, "groups_after": [e["groups_after"] for e in one_shot["layers"]],
                         "channels_after": [e["channels_after"] for e in one_shot["layers"]]}]
            else:
                info = prune_iterative(model, one_shot, rounds, calib, s, imp_sel, span, dense_scores, mode)
            t_prune = time.time() - t0 + t_dense_taylor
            t1 = time.time()
            ppl = perplexity(model, eval_windows, batch_size=args.eval_batch_size)
            t_eval = time.time() - t1
            removed = 1.0 - decoder_params(model) / dense_decoder
            after = [units.prunable_params(layer) for layer in model.model.layers]
            diff = [a - f for a, f in zip(after, final_after)]
            c_params = units.params_per_unit(dense.model.layers[0], units.MLP)
            row = {
                "fraction": fraction, "rounds": rounds, "mode": mode, "ppl": ppl, "removed_decoder": removed,
                "removed_decoder_one_shot": one_shot["totals"]["achieved_ratio_decoder"],
                "param_diff_vs_one_shot": sum(diff), "max_layer_diff_channels": max(abs(d) for d in diff) / c_params,
                "groups_removed": sum(units.num_groups(d) - units.num_groups(m)
                                      for d, m in zip(dense.model.layers, model.model.layers)),
                "groups_removed_one_shot": sum(e["groups_before"] - e["groups_after"] for e in one_shot["layers"]),
                "prune_seconds": round(t_prune, 1), "eval_seconds": round(t_eval, 1),
                "rounds_info": info,
            }
            results.append(row)
            log(f"{fraction} N={rounds} {mode}: ppl {ppl:.3f}, removed {removed:.4%} of decoder "
                f"(one-shot {row['removed_decoder_one_shot']:.4%}, diff {sum(diff)} params, max layer "
                f"{row['max_layer_diff_channels']:.1f} channels), groups removed {row['groups_removed']}, "
                f"prune {t_prune:.0f}s eval {t_eval:.0f}s")
            del model

    base_ppl = {r["fraction"]: r["ppl"] for r in results if r["rounds"] == 1}
    table = ["| target | N rounds | mode | PPL (w128) | vs N=1 | removed: decoder | params vs one-shot | groups removed | "
             "prune s | eval s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rel = f"{r['ppl'] / base_ppl[r['fraction']] - 1:+.2%}" if r["fraction"] in base_ppl else "n/a"
        table.append(f"| {r['fraction']:.0%} | {r['rounds']} | {r['mode']} | {r['ppl']:.2f} | {rel} | "
                     f"{r['removed_decoder']:.3%} | {r['param_diff_vs_one_shot']:+d} | {r['groups_removed']} | "
                     f"{r['prune_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    print(f"\ncalibration {args.num_examples} x {args.max_seq_len}, {len(eval_windows)} eval windows\n")
    print("\n".join(table))
    summary = {"eval_windows": len(eval_windows), "calibration": list(calib.shape),
               "dense_taylor_seconds": round(t_dense_taylor, 1), "results": results}
    return finish(summary, args.out, started)


if __name__ == "__main__":
    main()
