"""Peak memory and time of `gaqprune prune --offload disk|cpu` against the same run without offload, and the memory
model that predicts both for any Llama shape.

    python benchmarks/offload.py                   # the Llama-3.2-1B shape, random weights, fp32 (~4.9 GB on disk)
    python benchmarks/offload.py --predict-only    # the memory model's table: Llama-3.2-1B, Llama-3-8B, Llama-3-70B

The benchmark saves a randomly initialised model of the given shape as safetensors (once, under --work), runs the
same `prune` command once per offload mode (each in its own process; peak RSS from ``os.wait4``, the child's own
``ru_maxrss``), and checks that the runs agree: the same plan, the same perplexities, the same saved tensors. Ratios
are against the run without offload measured in the same invocation (this machine is noisy; only ratios travel).

The memory model (``predict``) adds up, per stage, what is alive at the stage's peak, in bytes:

* ``rest``: embeddings, final norm and LM head (counted once when tied), in the weight dtype;
* ``layer``: one decoder layer's weights; the Taylor pass adds its gradients (same dtype) and the refit its float32
  Gram matrix of the widest input (down_proj: intermediate^2), the cross term (intermediate x hidden) and the float64
  solve's copy (intermediate^2);
* activations: removal importance keeps one hidden-state stream per scored layer plus the dense one (samples x
  seq_len x hidden each; offloaded, all of them at once, in memory one at a time), the Taylor pass every cached layer
  input from the first scored layer on, the refit two streams (pruned and dense) over the compensation windows, the
  perplexity sweep every evaluation window's hidden state (twice while a layer runs); plus the LM-head chunk
  (``LOGITS_BUDGET`` float32 logits, three copies with the cross-entropy's).

Without offload the device holds the whole model instead of ``layer`` (and the Taylor pass every scored layer's
gradients when that is smaller than its cache: ``gaqprune.core.taylor.memory_estimate``). Host memory with ``disk`` is
``rest`` + one layer as read (its file pages) + the changed layer being written; with ``cpu`` it is the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float = 500_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, i, d = self.hidden, self.intermediate, self.head_dim
        return h * (self.heads * d) * 2 + h * (self.kv_heads * d) * 2 + 3 * h * i + 2 * h

    def rest_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.rest_params() + self.layers * self.layer_params()


SHAPES = {
    "llama-3.2-1b": Shape("Llama-3.2-1B", 2048, 8192, 16, 32, 8, 128_256, tied=True),
    "llama-3-8b": Shape("Llama-3-8B", 4096, 14_336, 32, 32, 8, 128_256, tied=False),
    "llama-3-70b": Shape("Llama-3-70B", 8192, 28_672, 80, 64, 8, 128_256, tied=False),
}
LOGITS_BUDGET = 1 << 25  # gaqprune.core.metrics.LOGITS_BUDGET (read there when gaqprune is importable)


@dataclass(frozen=True)
class Budget:
    """The windows a run calibrates and evaluates on (the CLI's defaults unless given)."""

    importance_samples: int = 50
    importance_seq_len: int = 128
    num_examples: int = 10
    max_seq_len: int = 64
    compensation_samples: int = 64
    compensation_seq_len: int = 128
    eval_tokens: int = 298 * 128  # the embedded corpus's evaluation split at window 128
    scored_layers: int | None = None  # layers the importance and Taylor passes score (None: all)


def predict(shape: Shape, dtype_bytes: int, budget: Budget, offload: bool) -> dict[str, float]:
    """Peak device bytes per stage (see the module docstring), and the host bytes with ``disk`` offload."""
    b, h, i = dtype_bytes, shape.hidden, shape.intermediate
    rest, layer = shape.rest_params() * b, shape.layer_params() * b
    weights = rest + (layer if offload else shape.layers * layer)
    scored = budget.scored_layers or shape.layers
    logits = 3 * LOGITS_BUDGET * 4
    imp_stream = budget.importance_samples * budget.importance_seq_len * h * b
    taylor_tokens = budget.num_examples * budget.max_seq_len
    taylor_cache = taylor_tokens * h * b * (scored + 2)
    grads_all = scored * layer
    taylor_grads = layer if offload or grads_all > max(GIB, taylor_cache) else grads_all
    taylor = taylor_cache + taylor_grads if (offload or taylor_grads == layer) else grads_all
    refit_tokens = budget.compensation_samples * budget.compensation_seq_len
    refit = 2 * refit_tokens * h * b + i * i * 4 + i * h * 4 + i * i * 8 + i * h * 8
    stages = {
        "layer importance (removal)": weights + imp_stream * ((scored + 1) if offload else 2) + logits,
        "Taylor pass": weights + taylor + logits,
        "surgery + refit": weights + refit,
        "perplexity": weights + 2 * budget.eval_tokens * h * b + logits,
    }
    host_disk = rest + 2 * layer + max(imp_stream * 2, taylor_tokens * h * b * 2) if offload else None
    return {**stages, "peak": max(stages.values()), "host (disk)": host_disk}


def predict_table(budget: Budget) -> str:
    rows = ["| model | dtype | weights | no offload: peak device | offload: peak device | offload disk: host "
            "| fits one 80 GB GPU (standard / offload) |", "|---|---|---|---|---|---|---|"]
    for key, dtype, b in (("llama-3.2-1b", "fp32", 4), ("llama-3-8b", "bf16", 2), ("llama-3-70b", "bf16", 2)):
        shape = SHAPES[key]
        dense, off = predict(shape, b, budget, False), predict(shape, b, budget, True)
        fits = " / ".join("yes" if p["peak"] <= 80e9 else "no" for p in (dense, off))
        rows.append(f"| {shape.name} | {dtype} | {shape.params() * b / 1e9:.1f} GB | {dense['peak'] / 1e9:.1f} GB | "
                    f"{off['peak'] / 1e9:.1f} GB | {off['host (disk)'] / 1e9:.1f} GB | {fits} |")
    return "\n".join(rows)


def stage_table(shape: Shape, dtype_bytes: int, budget: Budget) -> str:
    dense, off = predict(shape, dtype_bytes, budget, False), predict(shape, dtype_bytes, budget, True)
    rows = [f"| {shape.name} stage | no offload | offload |", "|---|---|---|"]
    rows += [f"| {k} | {dense[k] / 1e9:.2f} GB | {off[k] / 1e9:.2f} GB |" for k in dense if k not in ("host (disk)",)]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------- measuring


def build(shape: Shape, folder: Path) -> None:
    """A randomly initialised model of ``shape`` in fp32 as sharded safetensors, with the embedded tokenizer."""
    if (folder / "config.json").is_file():
        return
    code = f"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from gaqprune.models.load import load_tokenizer
config = LlamaConfig(hidden_size={shape.hidden}, intermediate_size={shape.intermediate}, num_hidden_layers={shape.layers},
    num_attention_heads={shape.heads}, num_key_value_heads={shape.kv_heads}, head_dim={shape.head_dim},
    vocab_size={shape.vocab}, tie_word_embeddings={shape.tied}, rope_theta={shape.rope_theta},
    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = LlamaForCausalLM(config)
model.save_pretrained({str(folder)!r}, max_shard_size="2GB")
load_tokenizer("embedded").save_pretrained({str(folder)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)


STAGES = ("dense perplexity", "layer importance", "Taylor scores", "surgery", "Writing", "pruned perplexity")


def _watch(pid: int, log: Path, peaks: dict[str, float], done) -> None:
    """Sample the child's RSS every 0.2 s and charge it to the stage its log's last progress bar names."""
    stage = "load"
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(status.split("VmRSS:")[1].split()[0]) * 1024 / GIB
            with open(log, "rb") as f:
                f.seek(max(0, log.stat().st_size - 400))
                tail = f.read().decode(errors="replace")
        except (OSError, IndexError):
            break
        hits = [(tail.rfind(name), name) for name in STAGES if name in tail]
        if hits:
            stage = max(hits)[1]
        peaks[stage] = max(peaks.get(stage, 0.0), rss)
        done.wait(0.2)


def run_prune(folder: Path, mode: str, work: Path, args: list[str]) -> dict:
    name = f"offload_{mode}"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # (a run folder's importance record would be reused)
    shutil.rmtree(work / f"cache_{mode}", ignore_errors=True)
    command = [sys.executable, "-m", "gaqprune.cli", "prune", "--base_model", str(folder), "--offload", mode,
               "--output_dir", str(work / "runs"), "--save_ckpt_log_name", name, "--overwrite", "true",
               "--save_model", "true", "--test_after_prune", "true", "--trainer.logger", "false", *args]
    start = time.perf_counter()
    log = open(work / f"{name}.log", "w")
    # a cache of its own: the dense perplexity is measured in every run, not reused from the previous one
    env = {**os.environ, "GAQPRUNE_CACHE": str(work / f"cache_{mode}")}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    peaks: dict[str, float] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(proc.pid, work / f"{name}.log", peaks, done), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {work / f'{name}.log'}")
    run = work / "runs" / name
    metrics = json.loads((run / "metrics.json").read_text())
    return {"mode": mode, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB, "seconds": seconds, "run": str(run),
            "stages": metrics["seconds"], "stage_peak_rss_gib": peaks, "ppl_before": metrics["ppl_before"],
            "ppl_after": metrics["ppl_after"]}


def same_weights(a: Path, b: Path) -> bool:
    """Every saved tensor of ``a`` equals ``b``'s (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for name in ia:
        with safe_open(str(ia[name]), framework="pt") as fa, safe_open(str(ib[name]), framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gaqprune-offload-bench"))
    parser.add_argument("--modes", nargs="+", default=["none", "disk"], choices=["none", "cpu", "disk"])
    parser.add_argument("--predict-only", action="store_true")
    opts = parser.parse_args()
    budget = Budget(importance_samples=4, importance_seq_len=64, num_examples=4, max_seq_len=64,
                    compensation_samples=4, compensation_seq_len=64, eval_tokens=8 * 128)
    print("memory model, the CLI's default budgets:\n" + predict_table(Budget()) + "\n")
    print(stage_table(SHAPES["llama-3-70b"], 2, Budget()) + "\n")
    if opts.predict_only:
        return
    shape = SHAPES[opts.shape]
    opts.work.mkdir(parents=True, exist_ok=True)
    folder = opts.work / shape.name
    build(shape, folder)
    args = ["--importance_samples", str(budget.importance_samples), "--importance_seq_len",
            str(budget.importance_seq_len), "--num_examples", str(budget.num_examples), "--max_seq_len",
            str(budget.max_seq_len), "--compensation_samples", str(budget.compensation_samples),
            "--compensation_seq_len", str(budget.compensation_seq_len), "--data.max_eval_windows", "8",
            "--pruning_ratio", "0.3"]
    results = [run_prune(folder, mode, opts.work, args) for mode in opts.modes]
    base = results[0]
    plans = [json.loads((Path(r["run"]) / "pruning_plan.json").read_text())["layers"] for r in results]
    print(f"{shape.name}, fp32, random weights ({shape.params() / 1e9:.2f} B parameters, "
          f"{shape.params() * 4 / GIB:.2f} GiB); prune {' '.join(args)}")
    print("| offload | peak RSS | x none | wall time | x none | predicted peak (device + host) | same plan / ppl / weights |")
    print("|---|---|---|---|---|---|---|")
    for r, plan in zip(results, plans):
        predicted = predict(shape, 4, budget, r["mode"] != "none")
        pred = predicted["peak"]  # on a CPU the device is the host: one memory
        same = (plan == plans[0], r["ppl_before"] == base["ppl_before"] and r["ppl_after"] == base["ppl_after"],
                same_weights(Path(base["run"]) / "model", Path(r["run"]) / "model"))
        print(f"| {r['mode']} | {r['peak_rss_gib']:.2f} GiB | {r['peak_rss_gib'] / base['peak_rss_gib']:.2f} | "
              f"{r['seconds']:.0f} s | {r['seconds'] / base['seconds']:.2f} | {pred / GIB:.2f} GiB | "
              f"{' / '.join('yes' if s else 'NO' for s in same)} |")
    print("stage seconds:", json.dumps({r["mode"]: r["stages"] for r in results}))
    print("stage peak RSS (GiB, sampled every 0.2 s):",
          json.dumps({r["mode"]: {k: round(v, 2) for k, v in r["stage_peak_rss_gib"].items()} for r in results}))
    (opts.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
