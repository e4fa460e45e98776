"""Quality lever: choose the units to remove by their reconstruction cost under the least-squares refit (OBS-style)
instead of their first-order Taylor score.

The refit (``--compensation``) re-solves o_proj / down_proj after each layer's surgery, but the units were chosen
by Taylor scores, which know nothing about it. With the refit's own statistics, the cost of removing input
columns S of a Linear W (Gram G = X^T X + lambda I over its input, the refit's ridge) and re-solving the rest is
tr(W_S (G^-1)_SS^-1 W_S^T): the squared error the removal leaves in the layer's output (optimal brain surgeon,
applied to whole units). A MLP channel is one down_proj column; a GQA group is the block of o_proj columns of its
query heads. Both costs are errors in the residual stream, so groups and channels compare directly per parameter.
Costs come from one dense forward over the refit windows (one unit at a time, not greedily re-scored).

Every variant uses the same per-layer rates (``build_plan`` with the CLI defaults and cached removal importance),
the same refit windows and the shipped ``apply_plan``; only the unit scores differ. Perplexity at window 128.

    OMP_NUM_THREADS=2 python benchmarks/lever_obs.py --ratios 0.2 0.3 \\
        --importance_cache benchmarks/quality_importance_removal50.json --out lever_obs.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace

import torch
from quality import finish, log, ratio_for_decoder_fraction, start_lever

from gaqprune.core import units
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan, plan_from_scores
from gaqprune.settings import PruneSettings


@torch.no_grad()
def input_grams(model, windows: torch.Tensor, layers: list[int], batch_size: int = 4) -> dict[int, dict[str, torch.Tensor]]:
    """Float32 Gram matrices of the inputs of o_proj and down_proj of ``layers`` over ``windows`` (dense forward)."""
    grams: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i in layers:
        layer = model.model.layers[i]
        grams[i] = {}
        for kind, lin in ((units.ATTENTION, layer.self_attn.o_proj), (units.MLP, layer.mlp.down_proj)):
            grams[i][kind] = torch.zeros(lin.in_features, lin.in_features)

            def hook(module, args, i=i, kind=kind):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                grams[i][kind].addmm_(x.T, x)

            handles.append(lin.register_forward_pre_hook(hook))
    try:
        for start in range(0, len(windows), batch_size):
            model.model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def removal_costs(weight: torch.Tensor, gram: torch.Tensor, unit_of: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per unit: tr(W_S (H^-1)_SS^-1 W_S^T), H = gram + ridge * mean(diag) * I, S = the unit's input columns."""
    h = gram.double()
    h = h + ridge * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    w = weight.detach().double()
    n_units = int(unit_of.max()) + 1
    if torch.equal(unit_of, torch.arange(len(unit_of))):  # column j is unit j (MLP channels): ||w_j||^2 / (H^-1)_jj
        return w.pow(2).sum(0) / h_inv.diagonal()
    costs = torch.zeros(n_units, dtype=torch.float64)
    for u in range(n_units):
        cols = (unit_of == u).nonzero().flatten()
        block = h_inv.index_select(0, cols).index_select(1, cols)
        w_s = w.index_select(1, cols)  # [out, |S|]
        costs[u] = torch.trace(w_s @ torch.linalg.solve(block, w_s.T))
    return costs


def obs_scores(model, grams: dict[int, dict[str, torch.Tensor]], ridge: float) -> dict[int, dict[str, torch.Tensor]]:
    scores = {}
    for i, g in grams.items():
        layer = model.model.layers[i]
        o_owner = next(o for o in units.owners(layer, units.ATTENTION) if o.path == "self_attn.o_proj")
        scores[i] = {
            units.ATTENTION: removal_costs(layer.self_attn.o_proj.weight, g[units.ATTENTION], o_owner.unit_of, ridge),
            units.MLP: removal_costs(layer.mlp.down_proj.weight, g[units.MLP],
                                     torch.arange(layer.mlp.down_proj.in_features), ridge),
        }
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3], help="fractions of decoder params removed")
    parser.add_argument("--splits", nargs="+", default=["per_param", "mlp_only"], help="--unit_split values to try")
    parser.add_argument("--eval_windows", type=int, default=None)
    parser.add_argument("--num_examples", type=int, default=10, help="Taylor windows (CLI default 10)")
    parser.add_argument("--max_seq_len", type=int, default=64, help="Taylor window length (CLI default 64)")
    parser.add_argument("--importance_cache", required=True, help="layer -> removal importance JSON")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    started, dense, data, eval_windows, calib, importance = start_lever(args.eval_windows, args.num_examples,
                                                                       args.max_seq_len, args.importance_cache)
    defaults = PruneSettings()
    refit = data.calibration_windows(defaults.compensation_samples, defaults.compensation_seq_len, seed=2,
                                     what="--compensation_samples")
    results = []
    grams = None
    for fraction in args.ratios:
        for split in args.splits:
            s = replace(defaults, num_examples=len(calib), max_seq_len=calib.shape[1], unit_split=split)
            s = replace(s, pruning_ratio=ratio_for_decoder_fraction(dense, fraction, s))
            taylor_plan = build_plan(copy.deepcopy(dense), importance, calib, s, progress=False)
            target = {e["index"]: e["target_rate"] for e in taylor_plan["layers"] if e["selected"]}
            width = [i for i, r in target.items() if r < 1.0]
            if grams is None:
                t0 = time.time()
                grams = input_grams(dense, refit, width)
                scores = obs_scores(dense, grams, defaults.compensation_ridge)
                log(f"OBS costs of {len(width)} layers in {time.time() - t0:.0f}s")
            obs_plan = plan_from_scores(dense, target, {i: scores[i] for i in width}, s,
                                        {i: importance[i] for i in target}, (taylor_plan["layer_start"],
                                                                             taylor_plan["layer_end"]),
                                        (len(calib), calib.shape[1]))
            for name, plan in (("taylor", taylor_plan), ("obs", obs_plan)):
                model = copy.deepcopy(dense)
                apply_plan(model, plan, refit)
                ppl = perplexity(model, eval_windows)
                row = {"fraction": fraction, "split": split, "scores": name, "ppl": ppl,
                       "removed_decoder": plan["totals"]["achieved_ratio_decoder"],
                       "groups_removed": sum(e["groups_before"] - e["groups_after"] for e in plan["layers"])}
                results.append(row)
                log(f"{fraction:.0%} {split} {name}: ppl {ppl:.2f}, removed {row['removed_decoder']:.4f} of decoder, "
                    f"{row['groups_removed']} groups")
    print("\n| decoder params removed | unit split | Taylor scores | refit-cost (OBS) scores |\n|---|---|---:|---:|")
    for fraction in args.ratios:
        for split in args.splits:
            t, o = (next(r for r in results if r["fraction"] == fraction and r["split"] == split and r["scores"] == n)
                    for n in ("taylor", "obs"))
            print(f"| {fraction:.0%} | {split} | {t['ppl']:.2f} ({t['groups_removed']} groups) | "
                  f"{o['ppl']:.2f} ({o['groups_removed']} groups) |")
    return finish({"eval_windows": len(eval_windows), "results": results, "command": " ".join(sys.argv)}, args.out,
                  started)


if __name__ == "__main__":
    main()
    sys.exit(0)
