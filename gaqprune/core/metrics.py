"""Memory-bounded causal-LM loss and a DDP-correct perplexity metric.

torchmetrics' own ``Perplexity`` wants unshifted logits and builds a B x T x V softmax copy; with a
128k vocabulary that is gigabytes. Here the LM head runs on chunks of final hidden states, so at
most ``chunk_tokens x V`` logits exist at once, and the metric only keeps a NLL sum and a count.
``chunk_tokens=None`` sizes the chunk to ``LOGITS_BUDGET`` logits (128 MB in float32, whatever the vocabulary: 4,096
tokens of a 128k vocabulary would be 2.1 GB, and the cross-entropy doubles it), the bound an offloaded run's peak
host memory is planned with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric

from gaqprune.core.layers import batch_layer_inputs, call_layer, micro_batches, offload_store, resident

LOGITS_BUDGET = 1 << 25  # logits alive at once when no chunk size is given (see the module docstring)


def chunk_size(weight: torch.Tensor, chunk_tokens: int | None) -> int:
    """Tokens per LM-head chunk: ``chunk_tokens``, or as many as ``LOGITS_BUDGET`` logits allow for this vocabulary."""
    return chunk_tokens if chunk_tokens is not None else max(1, LOGITS_BUDGET // weight.shape[0])


def _chunk_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                  teacher_bias: torch.Tensor | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of one chunk and, with a teacher, summed T^2 * KL(teacher || student) at temperature T over the
    chunk's predicted positions (label != -100)."""
    logits = F.linear(hidden, weight, bias).float()
    nll = F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
    if teacher_hidden is None:
        return nll, nll.new_zeros(())
    keep = labels != -100
    with torch.no_grad():
        teacher_log = F.log_softmax(F.linear(teacher_hidden[keep], teacher_weight, teacher_bias).float() / temperature, -1)
    student_log = F.log_softmax(logits[keep] / temperature, -1)
    kl = F.kl_div(student_log, teacher_log, reduction="sum", log_target=True) * temperature**2
    return nll, kl


def lm_head(hf_model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias or None) of the model's LM head."""
    head = hf_model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _predicting_hidden(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states ``[B * (T - 1), width]`` of the positions that predict a next token."""
    last = hf_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return last[:, :-1].reshape(-1, last.shape[-1])


def causal_losses(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  chunk_tokens: int | None = None, labels: torch.Tensor | None = None, teacher=None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over a batch of next-token NLL and, given a ``teacher`` LM, of the distillation term
    T^2 * KL(teacher || student) at ``temperature``; plus the number of predicted tokens.

    Token t predicts token t+1 (the shift); positions that are padding, or whose label is -100 (e.g. an
    instruction prompt), are ignored by both terms. The teacher runs without gradients; its logits, like the
    student's, exist for at most ``chunk_tokens`` positions at a time.
    """
    hidden = _predicting_hidden(hf_model, input_ids, attention_mask)
    labels = (input_ids if labels is None else labels)[:, 1:].reshape(-1)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:].reshape(-1) == 0, -100)
    teacher_hidden, teacher_weight, teacher_bias = None, None, None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = _predicting_hidden(teacher, input_ids, attention_mask)
        teacher_weight, teacher_bias = lm_head(teacher)
    nll, kl = _summed_losses(hf_model, hidden, labels, chunk_tokens, teacher_hidden, teacher_weight, teacher_bias,
                             temperature)
    return nll, kl, (labels != -100).sum()


def _summed_losses(hf_model, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int | None,
                   teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                   teacher_bias: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (and KL) of predicting hidden states ``[N, width]`` against ``labels [N]``, chunk by chunk."""
    weight, bias = lm_head(hf_model)
    chunk_tokens = chunk_size(weight, chunk_tokens)
    nll_total = hidden.new_zeros((), dtype=torch.float32)
    kl_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        args = (hidden[chunk], weight, bias, labels[chunk],
                None if teacher_hidden is None else teacher_hidden[chunk], teacher_weight, teacher_bias, temperature)
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping all of them alive.
            nll, kl = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            nll, kl = _chunk_losses(*args)
        nll_total, kl_total = nll_total + nll, kl_total + kl
    return nll_total, kl_total


def tail_nll(hf_model, last_layer_output: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token NLL from the last decoder layer's output ``[B, T, width]`` (final norm, then the LM head);
    differentiable, with at most ``chunk_tokens x V`` logits alive, like ``causal_losses``."""
    hidden = hf_model.model.norm(last_layer_output)[:, :-1].reshape(-1, last_layer_output.shape[-1])
    return _summed_losses(hf_model, hidden, input_ids[:, 1:].reshape(-1), chunk_tokens)[0]


def causal_nll(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               chunk_tokens: int | None = None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL over a batch and the number of predicted tokens (see ``causal_losses``)."""
    nll, _, count = causal_losses(hf_model, input_ids, attention_mask, chunk_tokens, labels)
    return nll, count


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


def _offloaded_nll(hf_model, windows: torch.Tensor, batch_size: int, device, metric: Perplexity,
                  progress: str | None) -> None:
    """``perplexity``'s sums for a model whose layers are offloaded: the windows' hidden states go up the decoder one
    layer at a time (each layer read once), then the final norm and the chunked LM head, batch by batch: the same
    operations on the same inputs as the model's own forward, so the same numbers."""
    from tqdm.auto import tqdm

    batches = micro_batches(windows, batch_size, device)
    hidden, kwargs = (list(column) for column in zip(*batch_layer_inputs(hf_model, batches)))
    for index in tqdm(range(len(hf_model.model.layers)), desc=progress, disable=progress is None, leave=False,
                      unit="layer"):
        with resident(hf_model, index) as layer:
            hidden = [call_layer(layer, h, k) for h, k in zip(hidden, kwargs)]
    for ids, last in zip(batches, hidden):
        metric.update(tail_nll(hf_model, last, ids), torch.tensor(ids.numel() - ids.shape[0], device=device))


@torch.no_grad()
def perplexity(hf_model, windows: torch.Tensor, batch_size: int = 8, progress: str | None = None) -> float:
    """Perplexity of ``hf_model`` over token windows ``[n, T]`` (LLM-Pruner protocol), in eval mode (no dropout,
    LoRA's included); the model's train/eval mode is restored afterwards."""
    from tqdm.auto import tqdm

    device = next(hf_model.parameters()).device
    metric = Perplexity(sync_on_compute=False).to(device)  # this process's windows are all the windows
    batches = range(0, len(windows), batch_size)
    was_training = hf_model.training
    hf_model.eval()
    try:
        if offload_store(hf_model) is not None:
            _offloaded_nll(hf_model, windows, batch_size, device, metric, progress)
        else:
            for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
                ids = windows[start : start + batch_size].to(device)
                metric.update(*causal_nll(hf_model, ids))
    finally:
        hf_model.train(was_training)
    value = metric.compute().item()
    if value != value or value == float("inf"):
        from gaqprune.errors import GaqpruneError

        raise GaqpruneError(f"perplexity is {value}: the model produced NaN/inf losses (try --dtype float32)")
    return value
