"""How close pruned / recovered models stay to the dense one, beside their perplexity.

For each model folder: perplexity on the evaluation windows (window 128, LLM-Pruner protocol), the mean per-token
KL(dense || model) and the fraction of positions whose greedy next token equals the dense model's. Perplexity
says how well a model predicts the evaluation text; KL and agreement say how much of the dense model's behaviour
it kept, which is what distillation (``--distill_weight``) aims at.

    GAQPRUNE_CACHE=... python benchmarks/fidelity.py prune_log/p25/model prune_log/fit_lm/model_finetuned \\
        --eval_windows 298 --out fidelity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import table
from quality import load_embedded

from gaqprune.core.metrics import causal_losses
from gaqprune.models.load import load_model


@torch.no_grad()
def fidelity(model, dense, windows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Perplexity, mean per-token KL(dense || model) and greedy next-token agreement with ``dense``."""
    nll = kl = agree = count = 0.0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        n_sum, kl_sum, n = causal_losses(model, ids, teacher=dense)
        nll, kl, count = nll + n_sum.item(), kl + kl_sum.item(), count + n.item()
        agree += (model(ids).logits[:, :-1].argmax(-1) == dense(ids).logits[:, :-1].argmax(-1)).sum().item()
    return {"ppl": float(torch.tensor(nll / count).exp()), "kl_to_dense": kl / count, "top1_agreement": agree / count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (pruned or fine-tuned gaqprune checkpoints, HF folders)")
    parser.add_argument("--eval_windows", type=int, default=None, help="first N evaluation windows (default: all 298)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    dense, _, windows, _ = load_embedded(args.eval_windows, 1, 128)
    dense.eval()
    rows, results = [], {}
    results["dense"] = fidelity(dense, dense, windows)
    for path in args.models:
        model = load_model(path).eval()
        results[path] = fidelity(model, dense, windows)
        print(f"{path}: {results[path]}", flush=True)
        del model
    for name, r in results.items():
        rows.append([name, f"{r['ppl']:.2f}", f"{r['kl_to_dense']:.4f}", f"{r['top1_agreement']:.1%}"])
    print(f"\n{len(windows)} evaluation windows of {windows.shape[1]} tokens")
    print(table(rows, ["model", "perplexity", "KL(dense || model) / token", "top-1 agreement"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"eval_windows": len(windows), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
