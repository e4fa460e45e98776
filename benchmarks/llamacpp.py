"""llama.cpp speed and fidelity of a pruned model against its dense source, measured in one run.

Both models are exported with ``gaqprune.gguf_export`` (llama.cpp's 'deci' graph for both, so only the
shapes differ) in each ``--types`` weight type and run by llama.cpp through llama-cpp-python:

* prefill: one ``--prompt``-token batch, tokens/s;
* decode: ``--decode`` single-token steps after that prompt (KV cache, one graph per step), tokens/s;
* perplexity over the first ``--ppl_windows`` evaluation windows of 128 tokens, from llama.cpp's logits and
  from the HF model in PyTorch (fp32), side by side: the export must not cost quality beyond the weight type.

Dense and pruned measurements alternate within each repetition (medians of ``--reps``), so machine load hits
both alike; the script prints pruned / dense ratios and the ideal one (dense / pruned matmul parameters).

    pip install llama-cpp-python diskcache      # builds llama.cpp from source (CPU), once
    gaqprune prune --pruning_ratio 0.25 --save_model true --save_ckpt_log_name p25
    python benchmarks/llamacpp.py --pruned prune_log/p25/model --out llama_cpp.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_params, write_json  # noqa: E402


def llama_cpp_nll(llm, windows: torch.Tensor) -> float:
    """Mean next-token NLL of llama.cpp's logits over token windows (each evaluated from an empty cache)."""
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        count += len(window) - 1
    return total / count


def time_prefill_decode(llm, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for token in decode:
        llm.eval([token])
    return len(prompt) / prefill, len(decode) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="embedded", help="the dense model (any --base_model form)")
    parser.add_argument("--pruned", required=True, help="the pruned model folder (a gaqprune run's model/)")
    parser.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    parser.add_argument("--decode", type=int, default=64, help="decode steps timed")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--flash_attn", type=int, default=1, choices=[0, 1],
                        help="llama.cpp's flash attention (1, default): without it llama.cpp pads every layer's V cache "
                             "to the widest layer's")
    parser.add_argument("--ppl_windows", type=int, default=40, help="evaluation windows of 128 tokens (0: skip)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import llama_cpp

    from gaqprune.core.metrics import perplexity
    from gaqprune.data.datamodule import LMDataModule
    from gaqprune.models.gguf import save_gguf
    from gaqprune.models.load import load_model, load_tokenizer

    names = {"dense": args.dense, "pruned": args.pruned}
    models = {key: load_model(path) for key, path in names.items()}
    tokenizer = load_tokenizer(args.dense)
    data = LMDataModule(max_seq_len=128, max_eval_windows=max(args.ppl_windows, 1))
    all_windows = data.eval_windows()
    windows = all_windows[: args.ppl_windows]
    stream = all_windows.flatten().tolist()
    prompt, decode = stream[: args.prompt], stream[args.prompt : args.prompt + args.decode]
    params = {key: matmul_params(model) for key, model in models.items()}
    result: dict = {"machine": machine(), "args": vars(args), "matmul_params": params,
                    "ideal_speedup": params["dense"] / params["pruned"], "types": {}}
    print(f"matmul parameters: dense {params['dense'] / 1e6:.1f} M, pruned {params['pruned'] / 1e6:.1f} M "
          f"(ideal speed-up {result['ideal_speedup']:.3f}x)")
    if args.ppl_windows:
        result["hf_ppl"] = {key: perplexity(model, windows) for key, model in models.items()}
        print(f"HF fp32 perplexity over {len(windows)} windows: " +
              ", ".join(f"{k} {v:.2f}" for k, v in result["hf_ppl"].items()))

    with tempfile.TemporaryDirectory() as tmp:
        for out_type in args.types:
            files, sizes = {}, {}
            for key, model in models.items():
                start = time.perf_counter()
                files[key] = save_gguf(model, tokenizer, Path(tmp) / f"{key}-{out_type}.gguf", out_type=out_type)
                sizes[key] = files[key].stat().st_size
                print(f"[{out_type}] exported {key} in {time.perf_counter() - start:.1f} s ({sizes[key] / 2**20:.1f} MiB)")
            llms = {key: llama_cpp.Llama(str(path), n_ctx=args.prompt + args.decode + 8, n_batch=args.prompt,
                                         n_threads=args.threads, n_threads_batch=args.threads,
                                         flash_attn=bool(args.flash_attn), verbose=False)
                    for key, path in files.items()}
            runs = {key: [] for key in llms}
            time_prefill_decode(llms["dense"], prompt[:32], decode[:4])  # warm-up (page-in, thread pool)
            time_prefill_decode(llms["pruned"], prompt[:32], decode[:4])
            for _ in range(args.reps):
                for key, llm in llms.items():  # dense then pruned within each repetition
                    runs[key].append(time_prefill_decode(llm, prompt, decode))
            row: dict = {"file_bytes": sizes}
            for index, what in enumerate(("prefill", "decode")):
                speed = {key: statistics.median(r[index] for r in runs[key]) for key in runs}
                row[f"{what}_tokens_per_s"] = speed
                row[f"{what}_speedup"] = speed["pruned"] / speed["dense"]
                print(f"[{out_type}] {what:7s} tokens/s: dense {speed['dense']:8.1f}, pruned {speed['pruned']:8.1f}, "
                      f"pruned/dense {row[f'{what}_speedup']:.3f}x")
            del llms
            if args.ppl_windows:
                ppl = {}
                for key, path in files.items():
                    llm = llama_cpp.Llama(str(path), n_ctx=136, n_batch=128, logits_all=True, n_threads=args.threads,
                                          flash_attn=bool(args.flash_attn), verbose=False)
                    ppl[key] = float(np.exp(llama_cpp_nll(llm, windows)))
                    del llm
                row["llama_cpp_ppl"] = ppl
                print(f"[{out_type}] llama.cpp perplexity: dense {ppl['dense']:.2f} (HF {result['hf_ppl']['dense']:.2f}),"
                      f" pruned {ppl['pruned']:.2f} (HF {result['hf_ppl']['pruned']:.2f})")
            result["types"][out_type] = row
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
