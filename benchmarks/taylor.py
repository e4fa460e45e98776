"""Taylor scores: gaqprune's one backward pass (streamed layer by layer, and accumulated over the whole model) vs
one backward pass per layer (the guide's way); time and peak memory of each.

All run on the same windows, micro-batches and loss (mean next-token NLL). ``streamed`` (gaqprune's default
for calibration sets of usual size) backpropagates one layer at a time from cached layer inputs and keeps one
layer's gradients; ``accumulated`` runs one backward through the whole model and keeps every selected layer's
gradients; the per-layer reference makes only layer l's prunable Linear weights require grad, runs forward +
backward over all windows, reduces that layer's scores with the same ``unit_scores_from_grads`` and frees its
gradients, for every layer. Prints the times, the speed-ups, each method's peak memory on top of the weights
(CUDA's allocator statistics on a GPU; on the CPU the bytes of live tensors, traced in a separate run) and the
largest relative score difference (exit 1 if they disagree).

    python benchmarks/taylor.py --model tiny                                   # CPU smoke test
    python benchmarks/taylor.py --model embedded --num_examples 10             # real SmolLM2 on the CPU
    python benchmarks/taylor.py --model llama3-8b --device cuda --dtype bfloat16 --num_examples 10
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import MODEL_CHOICES, default_device, extra_peak_bytes, gib, is_cuda, load, machine, timed, write_json

from gaqprune.core import units
from gaqprune.core.metrics import causal_nll
from gaqprune.core.taylor import taylor_scores, unit_scores_from_grads
from gaqprune.models.names import resolve_dtype
from gaqprune.settings import PruneSettings


def _prunable_params(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for kind in (units.ATTENTION, units.MLP) for o in units.owners(layer, kind)
            for p in units.linear(layer, o.path).parameters()]


def per_layer_scores(hf_model, windows: torch.Tensor, layers: list[int], batch_size: int) -> dict[int, dict[str, torch.Tensor]]:
    """The guide's scheme: for each layer a full forward + backward with only that layer's weights requiring grad."""
    decoder = hf_model.model.layers
    params = list(hf_model.parameters())
    saved = [p.requires_grad for p in params]
    device = next(hf_model.parameters()).device
    total_tokens = int(windows.shape[0] * (windows.shape[1] - 1))
    scores: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        hf_model.eval()
        for idx in layers:
            own = _prunable_params(decoder[idx])
            for p in own:
                p.requires_grad_(True)
            with torch.enable_grad():
                for start in range(0, len(windows), batch_size):
                    nll, _ = causal_nll(hf_model, windows[start : start + batch_size].to(device))
                    (nll / total_tokens).backward()
            scores[idx] = {kind: unit_scores_from_grads(decoder[idx], kind).cpu() for kind in (units.ATTENTION, units.MLP)}
            for p in own:
                p.grad = None
                p.requires_grad_(False)
    finally:
        for p, flag in zip(params, saved):
            p.grad = None
            p.requires_grad_(flag)
    return scores


def max_relative_difference(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> float:
    """Largest |a - b| / max|b| over every layer and unit kind (normalised per layer and kind)."""
    worst = 0.0
    for idx in a:
        for kind in a[idx]:
            x, y = a[idx][kind], b[idx][kind]
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-300)))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default="tiny")
    parser.add_argument("--layers", type=int, help="random shapes only: override the layer count")
    parser.add_argument("--num_examples", type=int, default=10, help="Taylor windows")
    parser.add_argument("--max_seq_len", type=int, default=64, help="tokens per window")
    parser.add_argument("--batch_size", type=int, default=PruneSettings.taylor_batch_size, help="windows per micro-batch")
    parser.add_argument("--all_layers", action="store_true", help="score every layer (default: the default pruned range)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative score difference accepted (default 1e-4 in float32, 5e-2 in 16-bit)")
    parser.add_argument("--skip_memory", action="store_true", help="CPU: skip the traced runs that measure memory")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    dtype = resolve_dtype(args.dtype or ("bfloat16" if is_cuda(args.device) else "float32"))
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    model, _, window_fn, what = load(args.model, args.device, dtype, args.layers)
    windows = window_fn(args.num_examples, args.max_seq_len, 1).to(args.device)
    num_layers = len(model.model.layers)
    start, end = (0, num_layers) if args.all_layers else PruneSettings().layer_range(num_layers)
    layers = list(range(start, end))
    print(f"taylor: {what}; {len(layers)} layers [{start}, {end}), {args.num_examples} x {args.max_seq_len} tokens, "
          f"micro-batch {args.batch_size}, {args.device} {str(dtype).removeprefix('torch.')}", flush=True)

    # Warm-up (kernels, allocator) on one micro-batch so no timing pays for it.
    taylor_scores(model, windows[: args.batch_size], layers[:1], batch_size=args.batch_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    runs = {"streamed": (taylor_scores, dict(method="streamed")),
            "accumulated": (taylor_scores, dict(method="accumulated")),
            "per_layer": (per_layer_scores, {})}
    scores, seconds, extra = {}, {}, {}
    for name, (fn, kwargs) in runs.items():
        if is_cuda(args.device):  # the allocator's statistics cost nothing: one run gives time and memory
            (scores[name], seconds[name]), extra[name] = extra_peak_bytes(
                args.device, timed, args.device, fn, model, windows, layers, batch_size=args.batch_size, **kwargs)
        else:
            scores[name], seconds[name] = timed(args.device, fn, model, windows, layers, batch_size=args.batch_size, **kwargs)
            if not args.skip_memory:  # a separate, traced run
                _, extra[name] = extra_peak_bytes(args.device, fn, model, windows, layers, batch_size=args.batch_size,
                                                  **kwargs)
        memory = f"   peak weights + {gib(extra[name])} ({1 + extra[name] / weights:.2f}x weights)" if name in extra else ""
        print(f"  {name:<12s} {seconds[name]:8.2f} s{memory}", flush=True)
    ref = scores["per_layer"]
    diff = {name: max_relative_difference(scores[name], ref) for name in ("streamed", "accumulated")}
    same_order = {name: all(torch.equal(scores[name][i][k].argsort(), ref[i][k].argsort()) for i in ref for k in ref[i])
                  for name in diff}
    ok = max(diff.values()) <= tolerance
    print(f"speed-up of one pass over one backward per layer ({len(layers)} layers): streamed "
          f"{seconds['per_layer'] / seconds['streamed']:.2f}x, accumulated {seconds['per_layer'] / seconds['accumulated']:.2f}x; "
          f"streamed / accumulated time {seconds['streamed'] / seconds['accumulated']:.2f}x")
    print("max relative score difference to per-layer: " + ", ".join(
        f"{name} {d:.2e} (identical unit rankings: {same_order[name]})" for name, d in diff.items())
        + f"; tolerance {tolerance:.0e} -> {'agree' if ok else 'DISAGREE'}")
    if extra:
        print(f"memory on top of the weights: streamed / accumulated {extra['streamed'] / extra['accumulated']:.2f}x "
              f"({gib(extra['streamed'])} vs {gib(extra['accumulated'])})")
    write_json(args.out, {
        "benchmark": "taylor", "model": args.model, "description": what, "device": args.device, "dtype": str(dtype),
        "layers": [start, end], "num_examples": args.num_examples, "max_seq_len": args.max_seq_len, "batch_size": args.batch_size,
        "seconds": seconds, "seconds_one_pass": seconds["streamed"], "seconds_per_layer": seconds["per_layer"],
        "speedup": seconds["per_layer"] / seconds["streamed"], "max_relative_difference": max(diff.values()),
        "relative_difference": diff, "tolerance": tolerance,
        "agree": ok, "identical_rankings": same_order, "weight_bytes": weights, "extra_peak_bytes": extra,
        "machine": machine(),
        "peak_kind": "cuda max_memory_allocated" if is_cuda(args.device) else "live tensor bytes (traced run)",
    })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
