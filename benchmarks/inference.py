"""Inference speed of a pruned model (ratio 0.25) against the dense one, measured in the same run.

Prefill: tokens/s of the HF model's own forward (``model.model`` + LM head on the last position, as a server
does; SDPA attention, no cache) at each ``--prefill`` shape ``BxT``.

Decode: tokens/s at each ``--decode_batch`` after a ``--prompt``-token prefill, on three paths:

* ``graph``: a per-layer static KV cache written by this script (every layer's buffer has that layer's own
  KV-head count, so unequal pruned layers and removed layers are fine) and one decode step captured as a
  ``torch.cuda.CUDAGraph`` (greedy next token and position advance inside the graph), replayed step after
  step. This is the path without Python dispatch overhead, where a smaller model shows its speed
  (DESIGN.md, "speed of the result"). CUDA only.
* ``static-eager``: the same static-cache step run from Python without the graph.
* ``hf-eager``: ``model.generate`` (greedy, HF's DynamicCache); per-token time = (time for N+1 new tokens -
  time for 1 new token) / N. Bound by Python dispatch on a GPU.

The static path's logits are checked against the HF forward before timing. The ideal speed-up is the
parameter ratio dense / pruned over what each token multiplies through (decoder layers + final norm + LM
head; embedding lookups are free). transformers' own ``StaticCache`` (5.24) also allocates each layer lazily
from its first key states, so it would handle per-layer KV heads too, but it needs ``torch.compile`` for
CUDA graphs (minutes of compile per shape); capturing the step by hand needs none.

    python benchmarks/inference.py --model embedded                       # CPU, small shapes, eager paths only
    python benchmarks/inference.py --model llama3-8b --device cuda --dtype bfloat16 --out inference.json

Pruning (``--prune``): ``plan`` = layer importance (removal) + ``build_plan`` + ``apply_plan`` with the default
settings (the product's path); ``uniform`` = ``build_plan`` without importance (equal rates) + ``apply_plan``;
``slice`` = direct uniform slicing with ``surgery.keep_units`` (no scores, cheapest). Speed depends only on the
resulting shapes.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from common import EMBEDDED, MODEL_CHOICES, default_device, is_cuda, load, machine, matmul_params, sync, table, write_json

from gaqprune import surgery, units
from gaqprune.layer_importance import compute_layer_importance
from gaqprune.models import resolve_dtype
from gaqprune.pruning import apply_plan, build_plan, layer_range, select_units
from gaqprune.settings import PruneSettings

# --------------------------------------------------------------------------- static per-layer KV cache decoding


class StaticKV:
    """Preallocated keys/values ``[batch, kv_heads_of_layer, max_len, head_dim]`` for every decoder layer."""

    def __init__(self, hf_model, batch: int, max_len: int):
        ref = next(hf_model.parameters())
        self.max_len = max_len
        self.keys, self.values = [], []
        for layer in hf_model.model.layers:
            hd = units.head_dim(layer)
            kv_heads = layer.self_attn.k_proj.out_features // hd
            self.keys.append(torch.zeros(batch, kv_heads, max_len, hd, dtype=ref.dtype, device=ref.device))
            self.values.append(torch.zeros(batch, kv_heads, max_len, hd, dtype=ref.dtype, device=ref.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def static_forward(hf_model, ids: torch.Tensor, positions: torch.Tensor, cache: StaticKV) -> torch.Tensor:
    """Logits ``[B, vocab]`` of the last position of ``ids`` ``[B, T]`` at ``positions`` ``[T]``, writing the cache.

    Uses the model's own modules (embeddings, RMSNorms, projections, rotary embedding, MLP, LM head); only the
    cache and the attention call are this script's: the query heads of each GQA group are folded into the
    query-length axis, so SDPA runs with the layer's KV heads and no repeated K/V copies.
    """
    inner = hf_model.model
    batch, steps = ids.shape
    hidden = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(hidden, positions[None].expand(batch, steps))
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, head_dim]
    visible = torch.arange(cache.max_len, device=ids.device)[None, :] <= positions[:, None]  # [T, max_len]
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        hd = units.head_dim(layer)
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch, steps, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(batch, steps, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(batch, steps, -1, hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.keys[i].index_copy_(2, positions, k)
        cache.values[i].index_copy_(2, positions, v)
        kv_heads, q_heads = k.shape[1], q.shape[1]
        group = q_heads // kv_heads  # query heads j*group .. (j+1)*group-1 read KV head j (HF's repeat_kv)
        q = q.reshape(batch, kv_heads, group * steps, hd)
        out = F.scaled_dot_product_attention(q, cache.keys[i], cache.values[i], attn_mask=visible.repeat(group, 1),
                                             scale=getattr(attn, "scaling", hd**-0.5))
        out = out.reshape(batch, q_heads, steps, hd).transpose(1, 2).reshape(batch, steps, q_heads * hd)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hf_model.lm_head(inner.norm(hidden[:, -1]))


class Decoder:
    """Greedy decoding over a ``StaticKV``: ``step()`` feeds the last token and advances the position in place."""

    def __init__(self, hf_model, prompt: torch.Tensor, max_new: int):
        batch, length = prompt.shape
        self.model = hf_model
        self.prompt_len = length
        # Cache length a multiple of 64: SDPA's memory-efficient kernel wants the mask's last dim aligned.
        self.cache = StaticKV(hf_model, batch, -(-(length + max_new) // 64) * 64)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=prompt.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=prompt.device)
        self.prompt = prompt
        self.graph: torch.cuda.CUDAGraph | None = None

    def prefill(self) -> torch.Tensor:
        logits = static_forward(self.model, self.prompt, torch.arange(self.prompt_len, device=self.prompt.device), self.cache)
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(self.prompt_len)
        return logits

    def step(self) -> torch.Tensor:
        logits = static_forward(self.model, self.token, self.pos, self.cache)
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def capture(self, warmup: int = 2) -> None:
        """Capture one ``step`` as a CUDA graph (after ``warmup`` eager steps on a side stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def replay(self) -> None:
        self.graph.replay()


def check_static_path(hf_model, vocab: int, device: str) -> float:
    """Max |static-path logits - HF forward logits| / max |HF logits| over prefill + 2 decode steps (2 x 12 tokens)."""
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, use_cache=False).logits.float()
        dec = Decoder(hf_model, ids[:, :10], 4)
        got = [dec.prefill()]
        for t in (10, 11):
            dec.token.copy_(ids[:, t : t + 1])  # teacher forcing: feed the real next token
            got.append(dec.step())
    worst = 0.0
    for logits, t in zip(got, (9, 10, 11)):
        worst = max(worst, float((logits.float() - ref[:, t]).abs().max() / ref[:, t].abs().max()))
    return worst


# --------------------------------------------------------------------------- measurements


def prefill_tokens_per_s(hf_model, batch: int, length: int, vocab: int, device: str, reps: int) -> float:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(4)).to(device)

    def run():
        hidden = hf_model.model(input_ids=ids, use_cache=False).last_hidden_state
        return hf_model.lm_head(hidden[:, -1])

    times = []
    with torch.no_grad():
        run()  # warm-up
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
    return batch * length / statistics.median(times)



def tokens_per_second(step, n: int, batch: int, device) -> float:
    """Decode throughput of ``n`` calls of ``step`` (one token per sequence each), timed between device syncs."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return batch * n / (time.perf_counter() - t0)

def decode_tokens_per_s(hf_model, batch: int, prompt_len: int, vocab: int, device: str, steps: int, eager_steps: int,
                        paths: list[str]) -> dict[str, float | str]:
    """Decode tokens/s (batch x steps / seconds) after a ``prompt_len`` prefill on each path of ``paths``."""
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(5)).to(device)
    result: dict[str, float | str] = {}
    if "graph" in paths or "static-eager" in paths:
        dec = Decoder(hf_model, prompt, 4 + max(steps, eager_steps))
        if "static-eager" in paths:
            dec.prefill()
            dec.step()  # warm-up
            dec.prefill()
            result["static-eager"] = tokens_per_second(dec.step, eager_steps, batch, device)
        if "graph" in paths:
            if not is_cuda(device):
                result["graph"] = "n/a (CPU)"
            else:
                try:
                    dec.prefill()
                    dec.capture()
                    dec.prefill()  # restart from the prompt: position prompt_len, cache beyond it unused
                    dec.replay()  # warm-up replay
                    dec.prefill()
                    result["graph"] = tokens_per_second(dec.replay, steps, batch, device)
                except Exception as err:  # report, keep the other paths
                    result["graph"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        del dec
    if "hf-eager" in paths:
        result["hf-eager"] = hf_generate_tokens_per_s(hf_model, prompt, eager_steps, device)
    return result


def hf_generate_tokens_per_s(hf_model, prompt: torch.Tensor, steps: int, device: str) -> float | str:
    """HF ``generate`` (greedy, default dynamic cache): batch x steps / (t(steps + 1 new tokens) - t(1 new token))."""
    mask = torch.ones_like(prompt)

    def run(new: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        hf_model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          use_cache=True, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    try:
        with torch.no_grad():
            run(2)  # warm-up
            base = min(run(1) for _ in range(2))
            full = run(steps + 1)
    except Exception as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return prompt.shape[0] * steps / max(full - base, 1e-9)


def measure(hf_model, label: str, args, vocab: int) -> dict:
    out: dict = {"prefill": {}, "decode": {}}
    for shape in args.prefill:
        b, t = (int(x) for x in shape.lower().split("x"))
        out["prefill"][shape] = prefill_tokens_per_s(hf_model, b, t, vocab, args.device, args.reps)
        print(f"  [{label}] prefill {shape}: {out['prefill'][shape]:,.0f} tokens/s", flush=True)
    for b in args.decode_batch:
        out["decode"][str(b)] = res = decode_tokens_per_s(hf_model, b, args.prompt, vocab, args.device, args.steps,
                                                          args.eager_steps, args.paths)
        shown = ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items())
        print(f"  [{label}] decode batch {b}: {shown} tokens/s", flush=True)
        gc.collect()
        if is_cuda(args.device):
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- pruning


def prune(hf_model, how: str, ratio: float, window_fn, device: str, importance_samples: int) -> str:
    """Prune ``hf_model`` in place at ``ratio`` (of the default layer range's prunable parameters); returns a description."""
    settings = replace(PruneSettings(), pruning_ratio=ratio)
    start, end = layer_range(settings, len(hf_model.model.layers))
    if how == "slice":
        for i in range(start, end):
            layer = hf_model.model.layers[i]
            g, c = units.num_groups(layer), units.num_channels(layer)
            kept_g, kept_c = select_units(torch.arange(g, dtype=torch.float64), torch.arange(c, dtype=torch.float64),
                                          units.params_per_unit(layer, units.ATTENTION), units.params_per_unit(layer, units.MLP),
                                          ratio, "same_rate")
            surgery.keep_units(layer, units.ATTENTION, kept_g)
            surgery.keep_units(layer, units.MLP, kept_c)
        return f"direct uniform slicing (same_rate split) of layers [{start}, {end})"
    scores = None
    if how == "plan":
        windows = window_fn(importance_samples, 128, 0).to(device)
        scores = compute_layer_importance(hf_model, windows, "removal", start, end, progress=False)
    calib = window_fn(settings.num_examples, settings.max_seq_len, 1).to(device)
    plan = build_plan(hf_model, scores, calib, settings, progress=False)
    apply_plan(hf_model, plan, calib)
    what = "removal importance + build_plan + apply_plan" if how == "plan" else "build_plan (equal importance) + apply_plan"
    return f"{what} (default settings, {plan['totals']['achieved_ratio_selected']:.1%} of layers [{start}, {end}))"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_CHOICES, default=EMBEDDED)
    parser.add_argument("--layers", type=int, help="random shapes only: override the layer count")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--pruning_ratio", type=float, default=0.25)
    parser.add_argument("--prune", choices=("plan", "uniform", "slice"), default="plan")
    parser.add_argument("--importance_samples", type=int, default=20, help="--prune plan: removal-importance windows")
    parser.add_argument("--prefill", nargs="+", default=None, help="BxT shapes (default: 1x2048 16x512 on CUDA, 1x256 4x128 CPU)")
    parser.add_argument("--decode_batch", type=int, nargs="+", default=None, help="default: 1 16 on CUDA, 1 4 on the CPU")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens before decoding (default 512 CUDA, 64 CPU)")
    parser.add_argument("--steps", type=int, default=128, help="decode steps timed on the CUDA-graph path")
    parser.add_argument("--eager_steps", type=int, default=None, help="decode steps timed on the eager paths (32 CUDA, 8 CPU)")
    parser.add_argument("--paths", nargs="+", default=["graph", "static-eager", "hf-eager"],
                        choices=["graph", "static-eager", "hf-eager"])
    parser.add_argument("--reps", type=int, default=None, help="prefill repetitions (median; default 5 CUDA, 2 CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    cuda = is_cuda(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    args.prefill = args.prefill or (["1x2048", "16x512"] if cuda else ["1x256", "4x128"])
    args.decode_batch = args.decode_batch or ([1, 16] if cuda else [1, 4])
    args.prompt = args.prompt or (512 if cuda else 64)
    args.eager_steps = args.eager_steps or (32 if cuda else 8)
    args.reps = args.reps or (5 if cuda else 2)
    if not cuda:
        args.steps = min(args.steps, args.eager_steps)

    model, _, window_fn, what = load(args.model, args.device, dtype, args.layers)
    vocab = model.config.vocab_size
    print(f"inference: {what}; {args.device} {str(dtype).removeprefix('torch.')}, torch threads {torch.get_num_threads()}")
    dense_check = check_static_path(model, vocab, args.device)
    print(f"  static-cache path vs HF forward (dense): max relative logit difference {dense_check:.2e}", flush=True)
    dense_params = matmul_params(model)
    dense = measure(model, "dense", args, vocab)
    kv_dense = StaticKV(model, 1, 1).nbytes()

    t0 = time.perf_counter()
    how = prune(model, args.prune, args.pruning_ratio, window_fn, args.device, args.importance_samples)
    sync(args.device)
    prune_s = time.perf_counter() - t0
    pruned_params = matmul_params(model)
    ideal = dense_params / pruned_params
    kv_pruned = StaticKV(model, 1, 1).nbytes()
    print(f"  pruned in {prune_s:.1f} s: {how}; matmul params {dense_params / 1e9:.3f} B -> {pruned_params / 1e9:.3f} B "
          f"(ideal speed-up {ideal:.3f}x); KV cache per token {kv_dense} -> {kv_pruned} bytes", flush=True)
    pruned_check = check_static_path(model, vocab, args.device)
    print(f"  static-cache path vs HF forward (pruned): max relative logit difference {pruned_check:.2e}", flush=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    pruned = measure(model, "pruned", args, vocab)

    rows = []
    for shape in args.prefill:
        d, p = dense["prefill"][shape], pruned["prefill"][shape]
        rows.append([f"prefill {shape} (HF forward)", f"{d:,.0f}", f"{p:,.0f}", f"{p / d:.2f}x"])
    for b in map(str, args.decode_batch):
        for path in args.paths:
            d, p = dense["decode"][b].get(path), pruned["decode"][b].get(path)
            if isinstance(d, float) and isinstance(p, float):
                rows.append([f"decode batch {b} ({path})", f"{d:,.1f}", f"{p:,.1f}", f"{p / d:.2f}x"])
            else:
                rows.append([f"decode batch {b} ({path})", str(d), str(p), "-"])
    rows.append(["ideal (matmul params dense / pruned)", "", "", f"{ideal:.2f}x"])
    print()
    print(table(rows, ["tokens/s", "dense", "pruned", "pruned / dense"]))
    write_json(args.out, {
        "benchmark": "inference", "model": args.model, "description": what, "device": args.device, "dtype": str(dtype),
        "pruning_ratio": args.pruning_ratio, "prune": how, "prune_seconds": prune_s, "prompt": args.prompt,
        "steps": args.steps, "eager_steps": args.eager_steps, "dense": dense, "pruned": pruned,
        "matmul_params_dense": dense_params, "matmul_params_pruned": pruned_params, "ideal_speedup": ideal,
        "kv_bytes_per_token_dense": kv_dense, "kv_bytes_per_token_pruned": kv_pruned,
        "static_path_check": {"dense": dense_check, "pruned": pruned_check}, "machine": machine(),
    })
    # float32 pins the math (about 1e-6 on the CPU); in 16-bit both paths carry their own rounding over every layer.
    tolerance = 1e-3 if dtype == torch.float32 else 1e-1
    if max(dense_check, pruned_check) > tolerance:
        print(f"static-cache path DISAGREES with the HF forward (tolerance {tolerance:.0e}): decode numbers are suspect")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
