"""Lever prototype: compensation variants after pruning, against today's ``lstsq``, on the SAME plan and windows.

Every variant deep-copies the dense embedded SmolLM2-135M, applies the same pruning plan (``build_plan`` with the
gaqprune defaults at a fraction of decoder params, as ``benchmarks/quality.py`` does), so the kept units are
identical and only the compensation of ``o_proj`` / ``down_proj`` differs. Perplexity at window 128.

For a Linear ``y = x W^T`` keeping input positions ``K``, with ``X_p`` its input on the calibration stream of the
already-pruned model (this layer still dense up to that Linear) the fit is

    min_{W', b}  || X_p,K W'^T + 1 b^T - T ||^2 + lam ||W' - W_K||^2,     lam = ridge * mean(diag G_KK)

with the target ``T = (1 - beta) X_p W^T + beta Y_d + gamma (h_d - h_p)``:
* ``beta = 0, gamma = 0``: today's ``lstsq`` (reproduce the dense weights on the pruned stream);
* ``beta = 1``: dense target, ``Y_d`` = the DENSE model's output of that Linear on the DENSE stream (error
  correction: the layer also undoes drift that earlier pruned layers caused in this Linear's output);
* ``gamma``: also absorb the residual-stream drift ``h_d - h_p`` entering the residual add (full error correction);
* intercept ``b`` (needs a bias in o_proj / down_proj, Llama has none): ``flap`` keeps ``W' = W_K`` and sets the
  optimal bias only, ``b = mean(T - X_p,K W_K^T)`` (= FLAP's ``W_removed @ mean(x_removed)`` for ``beta = 0``);
  ``lstsq`` + ``intercept`` fits ``W'`` and ``b`` jointly (ridge on ``W'`` only).

Only ``X_p^T X_p``, ``X_p^T T`` and the sums are accumulated (float64). ``X_p^T Y_d`` equals the cross term
``X_p^T X_d W^T``: keeping the dense Linear OUTPUT (hidden-sized, like a hidden-state stream) per calibration token
instead of an ``in x in`` cross Gram avoids both a dense copy of the layer and ``X_d`` itself. Per width-pruned layer:
one pass of the (still dense) layer on the dense stream gives ``Y_d`` of o_proj and down_proj, the mid-layer residual,
and the next dense stream; then the pruned stream is run up to o_proj (fit, prune attention), up to down_proj
(fit, prune MLP) and through the pruned layer. Memory: two hidden-state streams plus two hidden-sized target buffers
of calibration size, plus the Grams (``in x in`` and ``in x hidden``, float64) of one Linear.

    OMP_NUM_THREADS=1 GAQPRUNE_CACHE=.cache/test python benchmarks/lever_compensation.py --eval_windows 80
    OMP_NUM_THREADS=1 GAQPRUNE_CACHE=.cache/test python benchmarks/lever_compensation.py \
        --variants none lstsq dense flap lstsq+b --num_examples 10 --max_seq_len 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gaqprune.core import compensation, surgery, units
from gaqprune.core.layers import call_layer
from gaqprune.core.metrics import perplexity
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.settings import PruneSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import finish, log, ratio_for_decoder_fraction, start_lever  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Fit:
    """How one reading Linear (o_proj or down_proj) is compensated; see the module docstring."""

    mode: str = "lstsq"  # none (plain removal) | flap (bias only) | lstsq (refit weights)
    beta: float = 0.0  # weight of the dense target
    gamma: float = 0.0  # weight of the residual-stream drift in the target
    intercept: bool = False  # lstsq only: fit a bias jointly
    ridge: float = 1.0

    @property
    def needs_dense(self) -> bool:
        return self.mode != "none" and (self.beta != 0 or self.gamma != 0)


L0, D1 = Fit(), Fit(beta=1.0)
# name -> "package:<compensation>" (gaqprune.pruning.apply_plan as shipped) or (fit of o_proj, fit of down_proj)
VARIANTS: dict[str, str | tuple[Fit, Fit]] = {
    "none": "package:none",
    "lstsq": "package:lstsq",
    "lstsq-proto": (L0, L0),  # this script's re-implementation of today's lstsq (must match "lstsq")
    "lstsq-r0.1": (Fit(ridge=0.1), Fit(ridge=0.1)),
    "dense": (D1, D1),
    "dense-r0.1": (Fit(beta=1.0, ridge=0.1), Fit(beta=1.0, ridge=0.1)),
    "dense-r0.3": (Fit(beta=1.0, ridge=0.3), Fit(beta=1.0, ridge=0.3)),
    "dense-r3": (Fit(beta=1.0, ridge=3.0), Fit(beta=1.0, ridge=3.0)),
    "dense-o": (D1, L0),
    "dense-down": (L0, D1),
    "mix0.5": (Fit(beta=0.5), Fit(beta=0.5)),
    "resid": (Fit(beta=1.0, gamma=1.0), Fit(beta=1.0, gamma=1.0)),
    "resid0.5": (Fit(beta=1.0, gamma=0.5), Fit(beta=1.0, gamma=0.5)),
    "resid-r0.1": (Fit(beta=1.0, gamma=1.0, ridge=0.1), Fit(beta=1.0, gamma=1.0, ridge=0.1)),
    "resid-r3": (Fit(beta=1.0, gamma=1.0, ridge=3.0), Fit(beta=1.0, gamma=1.0, ridge=3.0)),
    "resid-o": (Fit(beta=1.0, gamma=1.0), L0),
    "resid-down": (L0, Fit(beta=1.0, gamma=1.0)),
    "resid+b": (Fit(beta=1.0, gamma=1.0, intercept=True), Fit(beta=1.0, gamma=1.0, intercept=True)),
    "flap": (Fit(mode="flap"), Fit(mode="flap")),
    "flap-dense": (Fit(mode="flap", beta=1.0), Fit(mode="flap", beta=1.0)),
    "lstsq+b": (Fit(intercept=True), Fit(intercept=True)),
    "dense+b": (Fit(beta=1.0, intercept=True), Fit(beta=1.0, intercept=True)),
    "mix0.5+b": (Fit(beta=0.5, intercept=True), Fit(beta=0.5, intercept=True)),
}
DEFAULT_VARIANTS = ["none", "lstsq", "dense", "dense-r0.1", "mix0.5", "flap", "lstsq+b", "dense+b"]


class _Stop(Exception):
    pass


class Stats:
    """X^T X, X^T T, sum X, sum T and the token count of one Linear's input X and fit target T (float64)."""

    def __init__(self, n_in: int, n_out: int, device):
        kw = {"dtype": torch.float64, "device": device}
        self.gram = torch.zeros(n_in, n_in, **kw)
        self.cross = torch.zeros(n_in, n_out, **kw)
        self.sum_x = torch.zeros(n_in, **kw)
        self.sum_t = torch.zeros(n_out, **kw)
        self.n = 0

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        t = t.reshape(-1, t.shape[-1]).double()
        self.gram.addmm_(x.T, x)
        self.cross.addmm_(x.T, t)
        self.sum_x += x.sum(0)
        self.sum_t += t.sum(0)
        self.n += x.shape[0]


def target(fit: Fit, y_pruned: torch.Tensor, y_dense: torch.Tensor | None, drift: torch.Tensor | None) -> torch.Tensor:
    t = y_pruned if fit.beta == 0 else y_dense if fit.beta == 1 else (1 - fit.beta) * y_pruned + fit.beta * y_dense
    if fit.gamma:
        t = t + fit.gamma * drift
    return t


def solve(weight: torch.Tensor, stats: Stats | None, kept: torch.Tensor, fit: Fit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W' [out, |K|], bias [out] or None) for one Linear; see the module docstring."""
    w = weight.detach().double()
    w_k = w.index_select(1, kept.to(w.device))
    if fit.mode == "none":
        return w_k.to(weight.dtype), None
    kept = kept.to(stats.gram.device)
    if fit.mode == "flap":
        bias = (stats.sum_t - stats.sum_x.index_select(0, kept) @ w_k.T) / stats.n
        return w_k.to(weight.dtype), bias.to(weight.dtype)
    g_kk = stats.gram.index_select(0, kept).index_select(1, kept)
    lam = fit.ridge * g_kk.diagonal().mean().clamp(min=1e-12)
    k = len(kept)
    rhs = stats.cross.index_select(0, kept) + lam * w_k.T  # [k, out]
    if not fit.intercept:
        sol = torch.linalg.solve(g_kk + lam * torch.eye(k, dtype=g_kk.dtype, device=g_kk.device), rhs)
        return sol.T.to(weight.dtype).contiguous(), None
    s_k = stats.sum_x.index_select(0, kept)
    system = torch.zeros(k + 1, k + 1, dtype=g_kk.dtype, device=g_kk.device)
    system[:k, :k] = g_kk + lam * torch.eye(k, dtype=g_kk.dtype, device=g_kk.device)
    system[:k, k] = s_k
    system[k, :k] = s_k
    system[k, k] = stats.n
    sol = torch.linalg.solve(system, torch.cat([rhs, stats.sum_t[None]], 0))  # [k + 1, out]
    return sol[:k].T.to(weight.dtype).contiguous(), sol[k].to(weight.dtype)


def set_linear(parent: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Put the fitted weight (and bias: a new Linear WITH bias, as Llama's o_proj/down_proj have none) in place."""
    lin = getattr(parent, name)
    assert lin.weight.shape == weight.shape, (lin.weight.shape, weight.shape)
    if bias is None and lin.bias is None:
        with torch.no_grad():
            lin.weight.copy_(weight)
        return
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias if bias is not None else torch.zeros_like(new.bias))
    setattr(parent, name, new)


def _run(layer, batches, stop_at: str | None = None) -> list[tuple[torch.Tensor, dict]]:
    out = []
    with torch.no_grad():
        for hidden, kwargs in batches:
            try:
                out.append((call_layer(layer, hidden, kwargs), kwargs))
            except _Stop:
                pass
    return out


def prune_layer(layer, entry: dict, stream_p: list, stream_d: list, fits: tuple[Fit, Fit], need_dense: bool):
    """Prune one width-pruned layer with compensation; returns the next (pruned, dense) streams."""
    fit_o, fit_d = fits
    g_changed = entry["groups_after"] < entry["groups_before"]
    c_changed = entry["channels_after"] < entry["channels_before"]

    # 1. the dense layer on the dense stream: o_proj / down_proj outputs, mid-layer residual, next dense stream
    y_o, y_down, mid_d = [], [], []
    next_d = stream_d
    if need_dense:
        handles = [
            layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out: y_o.append(out.detach())),
            layer.mlp.down_proj.register_forward_hook(lambda _m, _a, out: y_down.append(out.detach())),
            layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, args: mid_d.append(args[0].detach())),
        ]
        try:
            next_d = _run(layer, stream_d)
        finally:
            for h in handles:
                h.remove()
    cur = {"b": 0}

    # 2. attention: fit o_proj on the pruned stream (layer still dense), then remove the groups
    if g_changed:
        owner = units.owners(layer, units.ATTENTION)[-1]
        kept_cols = units.kept_positions(owner, torch.as_tensor(entry["kept_groups"]))
        o_proj = layer.self_attn.o_proj
        weight = o_proj.weight.detach().clone()
        stats = None
        if fit_o.mode != "none":
            stats = Stats(o_proj.in_features, o_proj.out_features, weight.device)

            def hook_o(_m, args, out):
                b = cur["b"]
                drift = stream_d[b][0] - stream_p[b][0] if fit_o.gamma else None
                stats.add(args[0], target(fit_o, out, y_o[b] if y_o else None, drift))
                raise _Stop

            handle = o_proj.register_forward_hook(hook_o)
            try:
                for b, batch in enumerate(stream_p):
                    cur["b"] = b
                    _run(layer, [batch])
            finally:
                handle.remove()
        surgery.keep_units(layer, units.ATTENTION, entry["kept_groups"])
        set_linear(layer.self_attn, "o_proj", *solve(weight, stats, kept_cols, fit_o))

    # 3. MLP: fit down_proj on the pruned stream (attention of this layer already pruned), then remove channels
    if c_changed:
        kept = torch.as_tensor(entry["kept_channels"])
        down = layer.mlp.down_proj
        weight = down.weight.detach().clone()
        stats = None
        if fit_d.mode != "none":
            stats = Stats(down.in_features, down.out_features, weight.device)
            mid_p = {}

            def hook_mid(_m, args):
                mid_p["h"] = args[0]

            def hook_d(_m, args):
                b = cur["b"]
                x = args[0]
                drift = mid_d[b] - mid_p["h"] if fit_d.gamma else None
                y_pruned = F.linear(x, weight, down.bias)
                stats.add(x, target(fit_d, y_pruned, y_down[b] if y_down else None, drift))
                raise _Stop

            handles = [layer.post_attention_layernorm.register_forward_pre_hook(hook_mid),
                       down.register_forward_pre_hook(hook_d)]
            try:
                for b, batch in enumerate(stream_p):
                    cur["b"] = b
                    _run(layer, [batch])
            finally:
                for h in handles:
                    h.remove()
        surgery.keep_units(layer, units.MLP, entry["kept_channels"])
        set_linear(layer.mlp, "down_proj", *solve(weight, stats, kept, fit_d))

    # 4. advance the pruned stream through the pruned layer
    return _run(layer, stream_p), next_d


def apply_variant(hf_model, plan: dict, calib: torch.Tensor, fits: tuple[Fit, Fit], batch_size: int) -> None:
    """``apply_plan`` with the compensation given by ``fits`` (o_proj, down_proj); same surgery, same order."""
    need_dense = fits[0].needs_dense or fits[1].needs_dense
    stream_p = compensation.capture_layer_inputs(hf_model, calib, batch_size)
    stream_d = stream_p  # the same object while no layer differs from the dense one
    for entry, layer in zip(plan["layers"], hf_model.model.layers):
        changed = entry["groups_after"] < entry["groups_before"] or entry["channels_after"] < entry["channels_before"]
        if entry["removed_whole"] or not changed:
            next_p = stream_p if entry["removed_whole"] else _run(layer, stream_p)
            if need_dense:
                stream_d = next_p if stream_d is stream_p and not entry["removed_whole"] else _run(layer, stream_d)
            stream_p = next_p
        else:
            stream_p, stream_d = prune_layer(layer, entry, stream_p, stream_d, fits, need_dense)
    surgery.remove_layers(hf_model, plan["removed_layers"])


def get_plan(dense, fraction: float, calib: torch.Tensor, importance: dict[int, float], cache_dir: Path | None) -> dict:
    """The gaqprune-defaults plan (as benchmarks/quality.py builds it), cached per fraction and calibration shape."""
    path = None
    if cache_dir is not None:
        path = cache_dir / f"plan_{fraction}_{calib.shape[0]}x{calib.shape[1]}.json"
        if path.is_file():
            return json.loads(path.read_text())
    s = replace(PruneSettings(), num_examples=len(calib), max_seq_len=calib.shape[1])
    s = replace(s, pruning_ratio=ratio_for_decoder_fraction(dense, fraction, s))
    plan = build_plan(copy.deepcopy(dense), importance, calib, s, progress=False)
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan))
    return plan


def evaluate(model, windows: torch.Tensor, subset: int | None) -> tuple[float, float | None]:
    """PPL of all windows and of the first ``subset`` ones; every window predicts the same number of tokens."""
    if not subset or subset >= len(windows):
        return perplexity(model, windows, batch_size=16), None
    head = perplexity(model, windows[:subset], batch_size=16)
    tail = perplexity(model, windows[subset:], batch_size=16)
    total = math.exp((subset * math.log(head) + (len(windows) - subset) * math.log(tail)) / len(windows))
    return total, head


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3], help="fractions of decoder params removed")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--eval_windows", type=int, default=None, help="evaluate the first N of the 298 windows")
    parser.add_argument("--num_examples", type=int, default=64, help="calibration windows (Taylor + compensation)")
    parser.add_argument("--max_seq_len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--batch_size", type=int, default=4, help="calibration micro-batch (apply_plan: taylor_batch_size)")
    parser.add_argument("--importance", default=str(HERE / "quality_importance_removal50.json"))
    parser.add_argument("--plan_cache", default=None, help="folder to reuse/store the plans (Taylor is the slow part)")
    parser.add_argument("--subset", type=int, default=None,
                        help="also report the PPL of the first N eval windows (from the same evaluation, no extra cost)")
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args(argv)
    started, dense, _, eval_windows, calib, importance = start_lever(args.eval_windows, args.num_examples,
                                                                    args.max_seq_len, args.importance)
    log(f"{len(eval_windows)} eval windows, calibration {tuple(calib.shape)}, variants {args.variants}")
    dense_ppl = evaluate(dense, eval_windows, args.subset)[0] if args.dense else None
    if dense_ppl is not None:
        log(f"dense ppl {dense_ppl:.2f}")

    results = []
    for fraction in args.ratios:
        t0 = time.time()
        plan = get_plan(dense, fraction, calib, importance, Path(args.plan_cache) if args.plan_cache else None)
        log(f"{fraction}: plan ready ({time.time() - t0:.0f}s), removed {plan['totals']['achieved_ratio_decoder']:.4f}"
            f" of decoder, groups removed in {sum(e['groups_after'] < e['groups_before'] for e in plan['layers'])} layers")
        for name in args.variants:
            variant = VARIANTS[name]
            model = copy.deepcopy(dense)
            t0 = time.time()
            if isinstance(variant, str):
                how = variant.split(":")[1]
                p = copy.deepcopy(plan)
                p["settings"]["compensation"] = how
                apply_plan(model, p, calib if how != "none" else None)
            else:
                apply_variant(model, plan, calib, variant, args.batch_size)
            seconds = time.time() - t0
            ppl, ppl_subset = evaluate(model, eval_windows, args.subset)
            biases = sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
            results.append({"ratio": fraction, "variant": name, "ppl": ppl, "ppl_subset": ppl_subset,
                            "seconds": round(seconds, 1), "bias_params": biases, "spec": str(variant)})
            sub = f" (first {args.subset}: {ppl_subset:.2f})" if ppl_subset else ""
            log(f"{fraction} {name}: ppl {ppl:.2f}{sub} (compensation {seconds:.0f}s, {biases} bias params)")
            del model

    by = {(r["ratio"], r["variant"]): r for r in results}
    head = "| variant |" + "".join(f" PPL {f:.0%} | vs lstsq {f:.0%} |" for f in args.ratios) + " seconds (apply) |"
    table = [head, "|---|" + "---|---|" * len(args.ratios) + "---|"]
    if dense_ppl is not None:
        table.append("| dense |" + f" {dense_ppl:.2f} | |" * len(args.ratios) + " |")
    for name in args.variants:
        row = f"| {name} |"
        for f in args.ratios:
            r, ref = by[(f, name)], by.get((f, "lstsq"))
            rel = f"{(r['ppl'] / ref['ppl'] - 1):+.1%}" if ref else ""
            sub = f" ({r['ppl_subset']:.2f})" if r["ppl_subset"] else ""
            row += f" {r['ppl']:.2f}{sub} | {rel} |"
        row += " " + " / ".join(f"{by[(f, name)]['seconds']:.0f}" for f in args.ratios) + " |"
        table.append(row)
    note = f" (in parentheses: first {args.subset})" if args.subset else ""
    print(f"\n{len(eval_windows)} eval windows{note} (w128), calibration {calib.shape[0]} x {calib.shape[1]}")
    print("\n".join(table))
    summary = {"eval_windows": len(eval_windows), "calibration": list(calib.shape), "dense_ppl": dense_ppl,
               "results": results}
    return finish(summary, args.out, started)


if __name__ == "__main__":
    main()
