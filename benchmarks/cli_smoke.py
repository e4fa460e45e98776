"""The `gaqprune` CLI end to end on one device: prune, reload, validate, fit, prune inside a DDP fit.

    python benchmarks/cli_smoke.py --device cuda --out /tmp/cli_smoke     # on a GPU machine (gpu_check.sh step `cli`)
    python benchmarks/cli_smoke.py --device cpu --out /tmp/cli_smoke      # the same plumbing on a CPU

The unit tests run the CLI on the CPU only; this runs the same commands a user runs on a GPU, where device
placement, bf16 weights, bf16-mixed training and NCCL (a one-device DDP fit) can break what the CPU never sees.
Nothing is fetched: a random Llama of the benchmark's ``tiny`` shape with 16 query / 8 KV heads (8 layers) in bf16, a
byte-level BPE tokenizer trained here on the repository's own Markdown and Python files, and those files as the
text corpus. It checks exit codes and numbers (a perplexity reproduced by ``validate``, the reloaded model's logits
against gaqprune's loader, finite losses), prints one line per step with its seconds, and writes ``cli_smoke.json``.

Needs the CLI's packages (jsonargparse, and gguf for --save_gguf), which the GPU machine's image lacks: carry them as
wheels (benchmarks/README.md, "GPU check").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import RANDOM_SHAPES, machine, write_json  # noqa: E402

from gaqprune.models.names import resolve_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPE = "tiny"
SHAPE_CHANGES = dict(num_attention_heads=16, num_key_value_heads=8, head_dim=32, intermediate_size=768)


def corpus(path: Path) -> Path:
    """The repository's Markdown and Python text as one file (about 1 MB: plenty of 128-token windows)."""
    files = sorted([*ROOT.glob("*.md"), *ROOT.glob("benchmarks/*.md"), *ROOT.glob("gaqprune/**/*.py"),
                    *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")])
    path.write_text("\n\n".join(f.read_text(encoding="utf-8") for f in files), encoding="utf-8")
    return path


def tokenizer(text_file: Path, vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``text_file`` (a second; no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def base_model(folder: Path, text_file: Path, dtype: torch.dtype) -> Path:
    """A random Llama with 8 KV heads (so per-parameter ranking can afford to drop GQA groups) and our tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**RANDOM_SHAPES[SHAPE], **SHAPE_CHANGES})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    vocab = config.vocab_size
    model.config.use_cache = model.generation_config.use_cache = True  # as released checkpoints have it
    model.save_pretrained(folder)
    tokenizer(text_file, vocab).save_pretrained(folder)
    return folder


def run(name: str, args: list[str], log_dir: Path, env: dict[str, str], timeout: int) -> dict:
    """One CLI command, run in ``log_dir``'s parent (where ``validate`` writes lightning_logs/); its output goes to
    ``log_dir/<name>.log``. Returns rc and seconds."""
    cmd = [sys.executable, "-c", "from gaqprune.cli import main; main()", *args]
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:
        log.write("gaqprune " + " ".join(args) + "\n\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                cwd=log_dir.parent).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def tail(log: Path, lines: int = 15) -> str:
    """The last non-empty ``lines`` of a log (progress bars' carriage returns as line breaks)."""
    text = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def reload_check(model_dir: Path, device: str) -> dict:
    """gaqprune's loader vs stock transformers (remote code) on ``device``: identical logits, and HF generate with
    its dynamic and its static cache gives the same greedy tokens."""
    from transformers import AutoModelForCausalLM

    from gaqprune.models.pruned import load_pruned

    ours = load_pruned(model_dir, device=device)
    stock = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=ours.dtype).to(device).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        same = torch.equal(ours(ids).logits, stock(ids).logits)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                      do_sample=False, pad_token_id=0)
        dynamic = stock.generate(**kwargs)
        static = stock.generate(**kwargs, cache_implementation="static", disable_compile=True)
    shapes = ours.config.layer_shapes()
    return {"logits_equal": same, "generate_static_equals_dynamic": torch.equal(dynamic, static),
            "dtype": str(ours.dtype), "device": str(next(ours.parameters()).device),
            "kv_heads": [s["num_key_value_heads"] for s in shapes], "mlp": [s["intermediate_size"] for s in shapes]}


def report(results: dict, failures: list[str], out: Path, logs: Path, report_dir: str | None) -> None:
    """Write cli_smoke.json (and copy it with the logs to ``report_dir``); say whether every check passed."""
    complete = len(results["steps"]) == results["planned"] and not any("interrupted" in step
                                                                       for step in results["steps"].values())
    results["failures"] = failures if complete else [*failures, "not every step ran"]
    write_json(str(out / "cli_smoke.json"), results)
    if report_dir:
        shutil.copytree(logs, Path(report_dir) / "logs", dirs_exist_ok=True)
        shutil.copy(out / "cli_smoke.json", Path(report_dir) / "cli_smoke.json")
    print("cli smoke: " + ("all checks passed" if not results["failures"] else f"FAILED: {results['failures']}"),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", help="weights of the base model and the pruned one")
    parser.add_argument("--out", default="/tmp/gaqprune-cli-smoke", help="work folder (emptied first)")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per CLI command")
    parser.add_argument("--report", default=None, help="also copy cli_smoke.json and the commands' logs here "
                                                         "(the work folder holds models: too big to bring back)")
    args = parser.parse_args(argv)
    # gpu_check.sh's timeout sends SIGTERM: end as an exception, so subprocess.run kills the running command (no
    # orphan holding the GPU) and the results so far are written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    dtype = resolve_dtype(args.dtype)
    gpu = args.device == "cuda"
    text = corpus(out / "corpus.txt")
    model = base_model(out / "base", text, dtype)
    env = {**os.environ, "GAQPRUNE_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    logs = out / "logs"
    runs = out / "prune_log"
    accel = ["--trainer.accelerator", "gpu" if gpu else "cpu", "--trainer.devices", "1"]
    data = ["--data.source", str(text), "--data.max_seq_len", "128", "--data.max_eval_windows", "24",
            "--data.eval_batch_size", "8", "--output_dir", str(runs)]
    small = ["--importance_samples", "16", "--num_examples", "8", "--max_seq_len", "64", "--compensation_samples", "16",
             "--pruning_ratio", "0.25", "--dtype", args.dtype]
    fit_small = ["--trainer.max_steps", "6", "--finetune_samples", "48", "--trainer.val_check_interval", "3",
                 "--trainer.precision", "bf16-mixed" if gpu else "32-true", "--data.batch_size", "8"]
    steps = {
        "prune": ["prune", *accel, "--base_model", str(model), *data, *small, "--save_model", "--test_after_prune",
                  "--save_gguf", "f16", "--save_ckpt_log_name", "prune",
                  "--unit_split", "same_rate"],  # removes GQA groups too (per_param keeps them in a random model)
        "validate": ["validate", *accel, "--base_model", str(runs / "prune" / "model"), *data[:-2], "--dtype",
                     args.dtype],
        "fit": ["fit", *accel, "--base_model", str(runs / "prune" / "model"), *data, *fit_small,
                "--save_ckpt_log_name", "fit"],
        "fit_prune_ddp": ["fit", *accel, "--trainer.strategy", "ddp", "--prune", "--base_model", str(model), *data, *small,
                          *fit_small, "--save_model", "--save_ckpt_log_name", "fit_prune_ddp"],
    }
    results: dict = {"device": args.device, "dtype": args.dtype, "machine": machine(), "planned": len(steps), "steps": {}}
    failures = []

    def check(name: str, ok: bool, what: str) -> None:
        results["steps"][name].setdefault("checks", {})[what] = bool(ok)
        if not ok:
            failures.append(f"{name}: {what}")

    try:
        pruned_ppl = math.nan
        for name, cli_args in steps.items():
            results["steps"][name] = {"rc": None, "interrupted": True}  # until it returns (SIGTERM mid-command)
            res = results["steps"][name] = run(name, cli_args, logs, env, args.timeout)
            print(f"{name:14s} rc {res['rc']:3d}  {res['seconds']:6.1f} s", flush=True)
            check(name, res["rc"] == 0, "exit code 0")
            if res["rc"] != 0:
                print(tail(logs / f"{name}.log"), flush=True)
                continue
            if name == "prune":
                metrics = json.loads((runs / "prune" / "metrics.json").read_text())
                res["metrics"] = metrics
                pruned_ppl = metrics.get("ppl_after", math.nan)
                check(name, math.isfinite(metrics.get("ppl_before", math.nan)) and math.isfinite(pruned_ppl),
                      "finite dense and pruned PPL")
                check(name, abs(metrics["params"]["achieved_ratio_selected"] - 0.25) < 0.02, "achieved ratio 0.25")
                check(name, (runs / "prune" / "model.gguf").stat().st_size > 0, "model.gguf written")
                res["reload"] = reload = reload_check(runs / "prune" / "model", args.device)
                print(f"{'':14s} reload on {reload['device']}: {reload}", flush=True)
                check(name, reload["logits_equal"], "load_pruned and trust_remote_code logits equal")
                check(name, reload["generate_static_equals_dynamic"], "HF generate: static cache = dynamic cache")
                check(name, min(reload["kv_heads"]) < max(reload["kv_heads"]), "layers of different KV head counts")
            elif name == "validate":
                found = re.findall(r"val_ppl\W+([0-9.]+(?:e[-+]?[0-9]+)?)", (logs / "validate.log").read_text())
                res["val_ppl"] = got = float(found[-1]) if found else math.nan
                print(f"{'':14s} validate: PPL {got:.4f}, prune's evaluation of the pruned model: {pruned_ppl:.4f}")
                check(name, abs(got - pruned_ppl) <= 1e-3 * pruned_ppl, "reloaded model's PPL = prune's pruned PPL")
            elif name.startswith("fit"):
                res["fit_metrics"] = fit = json.loads((runs / name / "fit_metrics.json").read_text())
                print(f"{'':14s} {fit['steps']} steps: validation PPL {fit['val_ppl_start']:.2f} -> {fit['val_ppl']:.2f}",
                      flush=True)
                check(name, fit["steps"] == 6 and fit["val_ppl"] < fit["val_ppl_start"], "6 steps, validation PPL falls")
    finally:
        report(results, failures, out, logs, args.report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
