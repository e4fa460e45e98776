"""Time layer importance: cached removal vs the naive one (same windows, one process), plus the one-pass methods.

    python benchmarks/layer_importance.py                       # embedded SmolLM2 (30 layers), 10 x 128 tokens, CPU
    python benchmarks/layer_importance.py --device cuda --dtype bfloat16 --samples 50
    python benchmarks/layer_importance.py --random_model llama3-8b --device cuda --dtype bfloat16

Cached removal runs L(L+1)/2 layer evaluations against the naive L^2 (both run the final norm and
LM head L+1 times), so the speed-up approaches 2x when layers dominate the cost; a large
vocabulary against small layers (SmolLM2: the head costs about 8 layers) lowers it. Exits 1 if the two removal results disagree by
more than 1e-4 (relative to the perplexities involved).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gaqprune.core.importance import compute_layer_importance, removal_importance_naive

# Real shapes with random weights and tokens: GPU speed does not depend on weight values.
RANDOM_SHAPES = {
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, vocab_size=128256),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn, *args, **kwargs):
    """Wall seconds, and this process's CPU seconds (steadier than wall time on a shared CPU)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _load(args):
    from gaqprune.models.names import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    if args.random_model:
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = dict(RANDOM_SHAPES[args.random_model])
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
        windows = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        return model, windows, f"random {args.random_model}"
    from gaqprune.data.datamodule import LMDataModule
    from gaqprune.models.load import load_model

    model = load_model("embedded", dtype=dtype, device=args.device)
    windows = LMDataModule().calibration_windows(args.samples, args.seq_len, what="--importance_samples")
    return model, windows, "embedded SmolLM2-135M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="calibration windows")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per window")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random_model", choices=sorted(RANDOM_SHAPES), help="time a randomly initialised real shape")
    parser.add_argument("--layers", type=int, help="with --random_model: override the layer count")
    parser.add_argument("--skip_naive", action="store_true", help="time only the cached methods")
    args = parser.parse_args(argv)

    model, windows, name = _load(args)
    num_layers = len(model.model.layers)
    print(f"{name}: {num_layers} layers, {args.samples} windows x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}")
    kw = dict(batch_size=args.batch_size, progress=False)
    with torch.inference_mode():  # warm-up (lazy init, kernel selection) outside the timed runs
        model(windows[: args.batch_size].to(args.device))
    cached, t_cached, c_cached = _timed(args.device, compute_layer_importance, model, windows, "removal", **kw)
    print(f"removal (cached):  {t_cached:8.2f} s wall {c_cached:8.2f} s CPU   dense PPL {cached.dense_perplexity:.4f}")
    ok = True
    if not args.skip_naive:
        naive, t_naive, c_naive = _timed(args.device, removal_importance_naive, model, windows, **kw)
        scale = naive.dense_perplexity
        worst = max(abs(cached[i] - naive[i]) / (abs(naive[i]) + scale) for i in naive)
        ok = worst <= 1e-4 and abs(cached.dense_perplexity - scale) <= 1e-4 * scale
        print(f"removal (naive):   {t_naive:8.2f} s wall {c_naive:8.2f} s CPU   dense PPL {scale:.4f}")
        print(f"speed-up naive/cached: {t_naive / t_cached:.2f}x wall, {c_naive / c_cached:.2f}x CPU")
        print(f"layer evaluations: naive {num_layers * num_layers}, cached {num_layers * (num_layers + 1) // 2} "
              f"(plus {num_layers + 1} LM-head passes each)")
        print(f"max relative difference {worst:.2e} -> {'agree' if ok else 'DISAGREE'}")
    for method in ("activation", "block_influence"):
        _, t, c = _timed(args.device, compute_layer_importance, model, windows, method, **kw)
        print(f"{method + ':':18s} {t:8.2f} s wall {c:8.2f} s CPU")
    top = sorted(cached, key=cached.get, reverse=True)[:5]
    print("most important layers (removal):", ", ".join(f"{i}: {cached[i]:.4g}" for i in top))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
