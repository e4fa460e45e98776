"""End-to-end pruning stage times and peak memory, with the library's real functions.

Stages (each timed with the device synchronised): load (model + calibration windows), layer importance
(``compute_layer_importance``, method ``removal``, cached), Taylor + plan (``build_plan``), surgery
(``apply_plan`` with the default settings, i.e. least-squares compensation on ``--compensation_samples`` windows of
``--compensation_seq_len`` tokens, 64 x 128 by default) and save
(``save_pretrained_model`` into a temporary folder, deleted afterwards). The total excludes load.

    python benchmarks/stages.py                                          # embedded SmolLM2 on the CPU, quick scheme
    python benchmarks/stages.py --model tiny --scheme quick               # seconds-long smoke test
    python benchmarks/stages.py --model llama3-8b --scheme standard --device cuda --dtype bfloat16 --out stages.json

Schemes (the parameter guide's): quick = 20 importance windows x 128 tokens, 5 Taylor windows x 64;
standard = 50 x 128, 10 x 64; precise = 128 x 128, 32 x 64; all at ``--pruning_ratio`` 0.25.
Random shapes (``--model llama3-8b`` etc.) are randomly initialised on the device with random tokens:
speed does not depend on the weights. Peak memory: ``torch.cuda.max_memory_allocated`` per stage on CUDA,
relative to the model's weight bytes; on the CPU the process's peak RSS (``getrusage``, never reset, so it
only grows from stage to stage and includes the Python/torch runtime), or with ``--trace_memory`` the weights at
the stage's start plus the peak of the tensors the stage allocates (``LiveTensorBytes``; ops then pass through
Python, so the times are not comparable to an untraced run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace

import torch
from common import (
    EMBEDDED,
    MODEL_CHOICES,
    LiveTensorBytes,
    default_device,
    gib,
    is_cuda,
    load,
    machine,
    param_count,
    peak_bytes,
    reset_peak,
    table,
    timed,
    weight_bytes,
    write_json,
)

from gaqprune.core.importance import compute_layer_importance
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.models.names import resolve_dtype
from gaqprune.settings import ImportanceSettings, PruneSettings

SCHEMES = {  # (importance_samples, num_examples); seq lens 128 / 64 as in the settings defaults
    "quick": (20, 5),
    "standard": (50, 10),
    "precise": (128, 32),
}
# The targets on one H200 (bf16, Llama-3-8B shape, load excluded); printed next to the measurement.
TARGET_SECONDS = {"standard": 30.0, "precise": 90.0}
TARGET_PEAK_X = 2.2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default=EMBEDDED)
    parser.add_argument("--layers", type=int, help="random shapes only: override the layer count")
    parser.add_argument("--scheme", choices=sorted(SCHEMES), default="quick")
    parser.add_argument("--importance_samples", type=int, help="override the scheme's importance windows")
    parser.add_argument("--importance_seq_len", type=int, default=ImportanceSettings.importance_seq_len)
    parser.add_argument("--num_examples", type=int, help="override the scheme's Taylor windows")
    parser.add_argument("--max_seq_len", type=int, default=PruneSettings.max_seq_len, help="tokens per Taylor window")
    parser.add_argument("--pruning_ratio", type=float, default=0.25)
    parser.add_argument("--importance_batch_size", type=int, default=8, help="compute_layer_importance batch_size")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--allocation", choices=("search", "fixed", "both"), default=PruneSettings.allocation,
                        help="--allocation of the plan; both: fixed first, then search on a copy of the same dense "
                             "model with the same importance, and the ratio of their Taylor + plan + surgery seconds")
    parser.add_argument("--skip_save", action="store_true", help="do not time save_pretrained_model")
    parser.add_argument("--save_dir", default=None, help="where the temporary checkpoint goes (default: system temp)")
    parser.add_argument("--trace_memory", action="store_true",
                        help="CPU: per-stage peak of live tensors instead of the process's RSS (slower)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    trace = args.trace_memory and not is_cuda(args.device)

    dtype = resolve_dtype(args.dtype or ("bfloat16" if is_cuda(args.device) else "float32"))
    samples, examples = SCHEMES[args.scheme]
    imp = ImportanceSettings(importance_samples=args.importance_samples or samples, importance_seq_len=args.importance_seq_len)
    settings = replace(PruneSettings(), pruning_ratio=args.pruning_ratio, num_examples=args.num_examples or examples,
                       max_seq_len=args.max_seq_len)
    device = args.device
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}

    def stage(name: str, fn, *a, **kw):
        if trace:
            weights_now = 0 if name == "load" else weight_bytes(model)
            with LiveTensorBytes() as tracker:
                out, seconds[name] = timed(device, fn, *a, **kw)
            peaks[name] = weights_now + tracker.peak
        else:
            reset_peak(device)
            out, seconds[name] = timed(device, fn, *a, **kw)
            peaks[name] = peak_bytes(device)
        print(f"  {name:<22s} {seconds[name]:8.2f} s   peak {gib(peaks[name])}", flush=True)
        return out

    print(f"stages: --model {args.model} --scheme {args.scheme} ({imp.importance_samples} x {imp.importance_seq_len} importance, "
          f"{settings.num_examples} x {settings.max_seq_len} Taylor, ratio {settings.pruning_ratio}) on {device} "
          f"{str(dtype).removeprefix('torch.')}, torch threads {torch.get_num_threads()}", flush=True)

    def do_load():
        model, tokenizer, window_fn, what = load(args.model, device, dtype, args.layers)
        importance_windows = window_fn(imp.importance_samples, imp.importance_seq_len, 0)
        taylor_windows = window_fn(settings.num_examples, settings.max_seq_len, 1).to(device)
        refit_windows = window_fn(settings.compensation_samples, settings.compensation_seq_len, 2).to(device)
        return model, tokenizer, importance_windows, taylor_windows, refit_windows, what

    model, tokenizer, importance_windows, taylor_windows, refit_windows, what = stage("load", do_load)
    num_layers = len(model.model.layers)
    params_before = param_count(model)
    weights = weight_bytes(model)
    bf16_weights = weight_bytes(model, torch.bfloat16)
    if trace:  # weights read straight into their storage (safetensors) pass no op the tracer sees
        peaks["load"] = max(peaks["load"], weights)
    start, end = settings.layer_range(num_layers)
    print(f"  model: {what}; {params_before / 1e9:.3f} B params, weights {gib(weights)}; layers [{start}, {end}) pruned")

    scores = stage("layer importance", compute_layer_importance, model, importance_windows.to(device), method="removal",
                   layer_start=start, layer_end=end, batch_size=args.importance_batch_size, progress=False)
    if args.allocation == "both":  # the baseline first, on a copy: the dense model stays for the search below
        import copy

        fixed = copy.deepcopy(model)
        fixed_settings = replace(settings, allocation="fixed")
        fixed_plan = stage("Taylor + plan (fixed)", build_plan, fixed, scores, taylor_windows, fixed_settings,
                           progress=False, fit_windows=refit_windows)
        stage("surgery (fixed)", apply_plan, fixed, fixed_plan, refit_windows)
        del fixed
    settings = replace(settings, allocation="fixed" if args.allocation == "fixed" else "search")
    plan = stage("Taylor + plan", build_plan, model, scores, taylor_windows, settings, progress=False,
                 fit_windows=refit_windows)
    stage("surgery", apply_plan, model, plan, refit_windows)
    if args.allocation == "both":
        new, old = (sum(seconds[f"{k}{tag}"] for k in ("Taylor + plan", "surgery")) for tag in ("", " (fixed)"))
        print(f"  --allocation search / fixed: Taylor + plan + surgery {new:.1f} s / {old:.1f} s = {new / old:.2f}x; "
              f"with layer importance {(new + seconds['layer importance']) / (old + seconds['layer importance']):.2f}x; "
              f"search scored {len(plan['search']['candidates'])} candidates, removed {plan['removed_layers']} whole")
    params_after = param_count(model)
    t = plan["totals"]

    def report(final: bool) -> None:
        core = sum(seconds[k] for k in ("layer importance", "Taylor + plan", "surgery"))
        total = sum(v for k, v in seconds.items() if k != "load" and "(fixed)" not in k)
        peak_all = max(peaks[k] for k in seconds if k != "load")
        if final:
            rows = [[k, f"{v:.2f}", gib(peaks[k]), f"{peaks[k] / weights:.2f}x"] for k, v in seconds.items()]
            rows.append(["importance + Taylor + surgery", f"{core:.2f}", "", ""])
            rows.append(["total excluding load", f"{total:.2f}", gib(peak_all), f"{peak_all / weights:.2f}x"])
            print()
            kind = "GPU alloc" if is_cuda(device) else "live tensors" if trace else "RSS"
            print(table(rows, ["stage", "seconds", "peak " + kind, "peak / weights"]))
            print(f"pruned {t['achieved_ratio_selected']:.2%} of the selected layers' prunable params, "
                  f"{t['achieved_ratio_decoder']:.2%} of the decoder, {t['achieved_ratio_model']:.2%} of the model "
                  f"({params_before / 1e9:.3f} B -> {params_after / 1e9:.3f} B); dense perplexity on the importance "
                  f"windows {scores.dense_perplexity:.4g}")
            target = TARGET_SECONDS.get(args.scheme)
            if is_cuda(device) and target is not None:
                ok_t, ok_m = core < target, peak_all / bf16_weights <= TARGET_PEAK_X
                print(f"issue targets (H200, Llama-3-8B, bf16): importance + Taylor + surgery {core:.1f} s vs < {target:.0f} s "
                      f"({'met' if ok_t else 'NOT met'}); peak {peak_all / bf16_weights:.2f}x bf16 weights "
                      f"vs <= {TARGET_PEAK_X}x ({'met' if ok_m else 'NOT met'})")
        write_json(args.out, {
            "benchmark": "stages", "complete": final, "model": args.model, "description": what, "scheme": args.scheme,
            "device": device, "dtype": str(dtype), "importance_samples": imp.importance_samples,
            "importance_seq_len": imp.importance_seq_len, "num_examples": settings.num_examples,
            "max_seq_len": settings.max_seq_len, "pruning_ratio": settings.pruning_ratio, "layer_range": [start, end],
            "num_layers": num_layers, "params_before": params_before, "params_after": params_after,
            "weight_bytes": weights, "bf16_weight_bytes": bf16_weights, "seconds": dict(seconds),
            "seconds_importance_taylor_surgery": core, "seconds_total_excluding_load": total,
            "peak_bytes": dict(peaks), "peak_bytes_excluding_load": peak_all, "peak_over_weights": peak_all / weights,
            "peak_over_bf16_weights": peak_all / bf16_weights,
            "peak_kind": "cuda max_memory_allocated per stage" if is_cuda(device)
            else "weights + live tensors allocated per stage (traced)" if trace else "process peak RSS (monotone)",
            "plan_totals": t, "allocation": args.allocation, "search": plan.get("search"), "machine": machine(),
        })

    if not args.skip_save:
        from gaqprune.models.pruned import save_pretrained_model

        report(final=False)  # the results so far survive a slow disk or a timeout during the save
        tmp = tempfile.mkdtemp(prefix="gaqprune-bench-", dir=args.save_dir)
        try:
            stage("save", save_pretrained_model, model, tokenizer, f"{tmp}/model", max_shard_size="5GB")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
