"""Memory-bounded causal-LM loss and a DDP-correct perplexity metric.

torchmetrics' own ``Perplexity`` wants unshifted logits and builds a B x T x V softmax copy; with a
128k vocabulary that is gigabytes. Here the LM head runs on chunks of final hidden states, so at
most ``chunk_tokens x V`` logits exist at once, and the metric only keeps a NLL sum and a count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def causal_nll(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               chunk_tokens: int = 4096, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL over a batch and the number of predicted tokens.

    Token t predicts token t+1 (the shift); positions that are padding, or whose label is -100
    (e.g. an instruction prompt), are ignored.
    """
    out = hf_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
    labels = (input_ids if labels is None else labels)[:, 1:].reshape(-1)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:].reshape(-1) == 0, -100)
    head = hf_model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping all of them alive.
            total = total + checkpoint(_chunk_nll, h, weight, bias, y, use_reentrant=False)
        else:
            total = total + _chunk_nll(h, weight, bias, y)
    return total, (labels != -100).sum()


class Perplexity(Metric):
    """exp(total NLL / total tokens), summed across batches and (under DDP) across ranks."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: torch.Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.count += count.detach().to(torch.int64)

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1))


@torch.no_grad()
def perplexity(hf_model, windows: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> float:
    """Perplexity of ``hf_model`` over token windows ``[n, T]`` (LLM-Pruner protocol)."""
    from tqdm.auto import tqdm

    device = next(hf_model.parameters()).device
    metric = Perplexity().to(device)
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        ids = windows[start : start + batch_size].to(device)
        metric.update(*causal_nll(hf_model, ids))
    value = metric.compute().item()
    if value != value or value == float("inf"):
        from gaqprune.errors import GaqpruneError

        raise GaqpruneError(f"perplexity is {value}: the model produced NaN/inf losses (try --dtype float32)")
    return value
