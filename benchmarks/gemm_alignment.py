"""How the kept MLP width's alignment sets a pruned layer's decode speed: one MLP (gate, up, down projections) at
decode batch sizes, dense width vs pruned widths that are multiples of 256, 128, 64, 32 or of nothing.

A decode step reads every weight once, so at small batches a projection should take time in proportion to its
width. The first H200 run showed that it does not when the width is unaligned (cuBLAS leaves its tensor-core kernels:
the smaller model ran slower); ``--channel_multiple`` (default 64 for MLPs of 8192+ channels) fixed that, and this
script measures whether 64 is enough or 128 / 256 decode faster, which decides the default. Same process, same
weights' dtype, CUDA events over back-to-back calls (no launch gaps in the timing); ratios against the dense width
measured in the same run, and against the ideal (dense width / pruned width).

    python benchmarks/gemm_alignment.py                                      # CPU (plumbing; CPU GEMMs differ)
    python benchmarks/gemm_alignment.py --device cuda --dtype bfloat16       # Llama-3-8B MLP on a GPU
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import default_device, is_cuda, machine, sync, table, timed, write_json

from gaqprune.models.names import resolve_dtype


def widths(dense: int, fraction: float) -> dict[str, int]:
    """Pruned widths near ``fraction`` of ``dense``: the largest multiple of 256 below it, and widths just under it
    that are multiples of 128, 64 and 32 but of nothing larger, and one of no alignment."""
    base = int(dense * fraction) // 256 * 256
    return {"dense": dense, "x256": base, "x128": base - 128, "x64": base - 64, "x32": base - 32, "odd": base - 1}


def mlp_seconds(hidden: int, width: int, batches: list[int], device: str, dtype: torch.dtype,
                calls: int) -> dict[int, float]:
    """Seconds per MLP (gate, up: width x hidden; down: hidden x width) on each of ``batches`` tokens, averaged over
    ``calls`` back-to-back calls (weights made once per width, on the device)."""
    gen = torch.Generator(device=device).manual_seed(width)
    gate, up, down = (torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02
                      for shape in ((width, hidden), (width, hidden), (hidden, width)))

    def mlp(x: torch.Tensor) -> None:
        for _ in range(calls):
            h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
            h @ down.T

    seconds = {}
    for batch in batches:
        x = torch.randn(batch, hidden, generator=gen, device=device, dtype=dtype)
        with torch.no_grad():
            mlp(x)  # warm-up (cuBLAS heuristics, allocator)
            if is_cuda(device):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(device)
                start.record()
                mlp(x)
                end.record()
                sync(device)
                seconds[batch] = start.elapsed_time(end) / 1000 / calls
            else:
                seconds[batch] = timed(device, mlp, x)[1] / calls
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--hidden", type=int, default=4096, help="Llama-3-8B: 4096")
    parser.add_argument("--intermediate", type=int, default=14336, help="dense MLP width (Llama-3-8B: 14336)")
    parser.add_argument("--fraction", type=float, default=0.75, help="pruned width / dense width")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="tokens per call (default 1 16 64)")
    parser.add_argument("--calls", type=int, default=None, help="calls timed per shape (default 200 CUDA, 3 CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = is_cuda(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    batches = args.batches or [1, 16, 64]
    calls = args.calls or (200 if cuda else 3)
    shapes = widths(args.intermediate, args.fraction)
    by_width = {name: mlp_seconds(args.hidden, w, batches, args.device, dtype, calls) for name, w in shapes.items()}
    seconds = {b: {name: by_width[name][b] for name in shapes} for b in batches}
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for b in batches:
        dense = seconds[b]["dense"]
        for name, w in shapes.items():
            s = seconds[b][name]
            gbps = 3 * w * args.hidden * bytes_per / s / 1e9
            ideal = args.intermediate / w
            rows.append([f"batch {b}, {name} ({w})", f"{s * 1e6:,.1f}", f"{gbps:,.0f}", f"{dense / s:.3f}x",
                         f"{ideal:.3f}x", f"{dense / s / ideal:.2f}"])
    print(f"MLP {args.hidden} -> width -> {args.hidden}, {str(dtype).removeprefix('torch.')}, {args.device}, "
          f"{calls} calls per shape")
    print(table(rows, ["shape", "us / MLP", "weight GB/s", "speed-up vs dense", "ideal", "of ideal"]))
    write_json(args.out, {"machine": machine(), "device": args.device, "dtype": str(dtype), "hidden": args.hidden,
                          "widths": shapes, "calls": calls,
                          "seconds": {str(b): v for b, v in seconds.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
