"""Compensation statistics in float32 (gaqprune) vs float64: time of the Gram / cross accumulation and the refit
weights' difference, on one down_proj of a given shape, with random activations (speed does not depend on values).

    python benchmarks/refit_precision.py                                   # embedded shape (1536 -> 576), CPU
    python benchmarks/refit_precision.py --shape 14336 4096 --device cuda  # Llama-3-8B down_proj
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import default_device, timed

from gaqprune.core.compensation import LinearStats, refit_weight


def accumulate(wide: bool, linear: torch.nn.Linear, batches: list[torch.Tensor],
               targets: list[torch.Tensor]) -> LinearStats:
    """gaqprune's ``LinearStats`` (float32), or with ``wide`` the float64 baseline (the previous behaviour)."""
    stats = LinearStats(linear, with_cross=True)
    if not wide:
        for x, t in zip(batches, targets):
            stats.add(x, t)
        return stats
    stats.gram, stats.cross = stats.gram.double(), stats.cross.double()
    for x, t in zip(batches, targets):
        x = x.double()
        stats.gram.addmm_(x.T, x)
        stats.cross.addmm_(x.T, t.double())
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 576], metavar=("IN", "OUT"))
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 64 x 128)")
    parser.add_argument("--micro_batch", type=int, default=512, help="tokens per accumulation call")
    parser.add_argument("--keep", type=float, default=0.75, help="fraction of input columns kept")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default="float32", help="activation dtype (bfloat16 on a GPU for 8B shapes)")
    args = parser.parse_args(argv)

    n_in, n_out = args.shape
    act = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(n_in, n_out, bias=False).to(args.device, act)
    steps = args.tokens // args.micro_batch
    batches = [torch.randn(args.micro_batch, n_in, generator=gen).to(args.device, act) for _ in range(steps)]
    targets = [torch.randn(args.micro_batch, n_out, generator=gen).to(args.device, act) for _ in range(steps)]
    kept = torch.randperm(n_in, generator=gen)[: int(args.keep * n_in)].sort().values

    results = {}
    for wide in (True, False, True, False):  # the second round is the one kept (warm caches, kernels loaded)
        stats, seconds = timed(args.device, accumulate, wide, linear, batches, targets)
        weight, solve_s = timed(args.device, refit_weight, linear.weight, stats.gram, kept, 1.0, stats.cross)
        results[wide] = (seconds, solve_s, weight.double())
    (t64, s64, w64), (t32, s32, w32) = results[True], results[False]
    diff = ((w32 - w64).norm() / w64.norm()).item()
    print(f"down_proj {n_in} -> {n_out}, {args.tokens} tokens in micro-batches of {args.micro_batch}, keep "
          f"{len(kept)} of {n_in} inputs, {args.device} {args.dtype} activations")
    print(f"  accumulate Gram + cross: float64 {t64:.3f} s, float32 {t32:.3f} s -> {t64 / t32:.2f}x faster")
    print(f"  solve (float64 either way): {s64:.3f} s / {s32:.3f} s")
    print(f"  refit weights, relative difference float32 vs float64 statistics: {diff:.2e}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
