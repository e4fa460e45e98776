"""How important is each whole decoder layer? Scores, their cached JSON record, and a bar chart.

Methods (scores for layers ``[layer_start, layer_end)``):

* ``removal``: PPL(model with layer l skipped) - PPL(dense). Computed without ever recomputing the
  layers before l: the dense hidden states of all windows advance one layer at a time, and while
  they sit at layer l's input the model is resumed from there with l skipped (l+1 .. L-1, final
  norm, chunked LM head). That costs about L^2/2 layer evaluations instead of the naive L^2, and
  holds one layer's input for all windows at a time (not every layer's), so memory stays
  ``samples x seq_len x hidden`` in the model dtype. Skipping a layer can *lower* perplexity:
  scores may be negative.
* ``activation``: mean |residual update| of the layer, mean |output - input| over tokens and
  hidden units. The update, not the output, because the residual stream grows with depth and
  would make every late layer look important; a layer that changes nothing scores 0.
* ``block_influence`` (ShortGPT): 1 - cosine(input, output) of the layer, averaged over tokens,
  in [0, 2]; 0 means the layer leaves the direction of every token's state unchanged.

``model_fingerprint`` names a model by its weights, so a saved record (``gaqprune.run.records``) is reused only for
the model it was measured on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from gaqprune.core.layers import batch_layer_inputs, call_layer, micro_batches, offload_store, resident, state_items
from gaqprune.core.metrics import chunk_size, lm_head
from gaqprune.errors import GaqpruneError
from gaqprune.settings import IMPORTANCE_METHODS, layer_span

METHODS = IMPORTANCE_METHODS


class ImportanceScores(dict):
    """``{layer index: score}`` plus how it was measured (``method``; ``dense_perplexity`` for removal)."""

    def __init__(self, scores: dict[int, float], method: str, dense_perplexity: float | None = None):
        super().__init__(scores)
        self.method = method
        self.dense_perplexity = dense_perplexity


# --------------------------------------------------------------------------- running the layers


def _decoder_layers(hf_model) -> torch.nn.ModuleList:
    return hf_model.model.layers


def _tail_nll(hf_model, hidden: torch.Tensor, ids: torch.Tensor, chunk_tokens: int | None = None) -> float:
    """Summed next-token NLL (float64) from last-layer hidden states: final norm + LM head in token chunks.

    At most ``chunk_tokens x vocab`` logits exist at once (``metrics.chunk_size``), so a 128k vocabulary stays bounded.
    """
    hidden = hf_model.model.norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    weight, bias = lm_head(hf_model)
    chunk_tokens = chunk_size(weight, chunk_tokens)
    total = 0.0
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = F.linear(hidden[start : start + chunk_tokens], weight, bias).float()
        total += F.cross_entropy(logits, labels[start : start + chunk_tokens], reduction="sum").double().item()
    return total


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def _resolve_range(hf_model, layer_start: int | None, layer_end: int | None) -> tuple[int, int]:
    return layer_span(layer_start, layer_end, len(_decoder_layers(hf_model)))


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise GaqpruneError(
            f"layer importance needs token windows of shape [samples, seq_len >= 2], got {tuple(windows.shape)}; "
            "raise --importance_samples / --importance_seq_len"
        )


def _check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise GaqpruneError(f"layer importance: {what} is {value} (NaN/inf losses); try --dtype float32")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- methods


def _removal(hf_model, windows: torch.Tensor, start: int, end: int, batch_size: int, progress: bool) -> ImportanceScores:
    num_layers = len(_decoder_layers(hf_model))
    device = next(hf_model.parameters()).device
    batches = micro_batches(windows, batch_size, device)
    count = sum(ids.numel() - ids.shape[0] for ids in batches)  # predicted tokens: T-1 per window
    # Dense hidden states of every batch at the input of the current layer (model dtype, model device).
    states, layer_kwargs = (list(column) for column in zip(*batch_layer_inputs(hf_model, batches)))
    # Progress in layer evaluations, so the ETA is right although later layers need shorter tails.
    work = len(batches) * (start + sum(num_layers - layer for layer in range(start, end)) + (num_layers - end))
    with _progress(work, "layer importance (removal)", progress) as bar:
        sweep = _removal_sweep if offload_store(hf_model) is not None else _removal_tails
        skipped_nll, dense_nll = sweep(hf_model, batches, states, layer_kwargs, start, end, bar)
    dense = _ppl(dense_nll, count)
    _check_finite(dense, "the dense perplexity")
    scores = {}
    for layer, nll in skipped_nll.items():
        scores[layer] = _ppl(nll, count) - dense
        _check_finite(scores[layer], f"the perplexity with layer {layer} skipped")
    return ImportanceScores(scores, "removal", dense)


def _removal_tails(hf_model, batches, states, layer_kwargs, start, end, bar) -> tuple[dict[int, float], float]:
    """Layers in memory: the dense state stops at each layer's input, and the model resumes from there with the layer
    skipped (one stream alive at a time)."""
    layers = _decoder_layers(hf_model)
    num_layers = len(layers)

    def run(hidden: torch.Tensor, kwargs: dict[str, Any], first: int, last: int) -> torch.Tensor:
        for i in range(first, last):
            hidden = call_layer(layers[i], hidden, kwargs)
        return hidden

    skipped_nll = {layer: 0.0 for layer in range(start, end)}
    for b in range(len(batches)):  # layers before the range: plain dense advance
        states[b] = run(states[b], layer_kwargs[b], 0, start)
        bar.update(start)
    for layer in range(start, end):
        for b, ids in enumerate(batches):
            # Resume from this layer's input with the layer skipped, then advance the dense state past it.
            skipped_nll[layer] += _tail_nll(hf_model, run(states[b], layer_kwargs[b], layer + 1, num_layers), ids)
            states[b] = call_layer(layers[layer], states[b], layer_kwargs[b])
            bar.update(num_layers - layer)
    dense_nll = 0.0
    for b, ids in enumerate(batches):
        dense_nll += _tail_nll(hf_model, run(states[b], layer_kwargs[b], end, num_layers), ids)
        bar.update(num_layers - end)
    return skipped_nll, dense_nll


def _removal_sweep(hf_model, batches, states, layer_kwargs, start, end, bar) -> tuple[dict[int, float], float]:
    """Offloaded layers: one sweep up the model, each layer read once. Every skipped-layer stream is born at its
    layer's input (the dense state there) and advances with the dense one through every later layer; the tails are
    scored at the top. Each stream runs the same layers on the same inputs as in ``_removal_tails`` (the same
    numbers), but all ``end - start`` streams are alive at once (``samples x seq_len x hidden`` each)."""
    num_layers = len(_decoder_layers(hf_model))
    streams: dict[int, list[torch.Tensor]] = {}
    for index in range(num_layers):
        with resident(hf_model, index) as layer:
            for hidden in streams.values():
                for b in range(len(batches)):
                    hidden[b] = call_layer(layer, hidden[b], layer_kwargs[b])
                bar.update(len(batches))
            if start <= index < end:
                streams[index] = list(states)  # skips this layer: enters the next one with this one's input
            for b in range(len(batches)):
                states[b] = call_layer(layer, states[b], layer_kwargs[b])
            bar.update(len(batches))
    skipped_nll = {skipped: sum(_tail_nll(hf_model, hidden[b], ids) for b, ids in enumerate(batches))
                   for skipped, hidden in streams.items()}
    return skipped_nll, sum(_tail_nll(hf_model, states[b], ids) for b, ids in enumerate(batches))


def _one_pass(hf_model, windows: torch.Tensor, method: str, start: int, end: int, batch_size: int,
              progress: bool) -> ImportanceScores:
    """``activation`` / ``block_influence``: one forward through layers 0 .. end-1, token-averaged in float64, layer
    by layer over all windows (so an offloaded layer is read once)."""
    device = next(hf_model.parameters()).device
    batches = micro_batches(windows, batch_size, device)
    states, layer_kwargs = (list(column) for column in zip(*batch_layer_inputs(hf_model, batches)))
    sums = {layer: 0.0 for layer in range(start, end)}
    tokens = sum(ids.numel() for ids in batches)
    with _progress(len(batches) * end, f"layer importance ({method})", progress) as bar:
        for index in range(end):
            with resident(hf_model, index) as layer:
                for b in range(len(batches)):
                    out = call_layer(layer, states[b], layer_kwargs[b])
                    if index >= start:
                        x, y = states[b].float(), out.float()
                        if method == "activation":  # mean over tokens of the mean |update| over hidden units
                            per_token = (y - x).abs().mean(dim=-1)
                        else:
                            per_token = 1.0 - F.cosine_similarity(x, y, dim=-1)
                        sums[index] += per_token.double().sum().item()
                    states[b] = out
                    bar.update(1)
    scores = {layer: s / tokens for layer, s in sums.items()}
    for layer, s in scores.items():
        _check_finite(s, f"the {method} score of layer {layer}")
    return ImportanceScores(scores, method)


def compute_layer_importance(hf_model, windows: torch.Tensor, method: str = "removal", layer_start: int = 0,
                             layer_end: int | None = None, batch_size: int = 8, progress: bool = True) -> dict[int, float]:
    """Importance of each decoder layer in ``[layer_start, layer_end)`` on token ``windows`` ``[n, T]``.

    ``method``: ``removal`` (PPL with the layer skipped - dense PPL; the result's ``dense_perplexity``
    holds the dense PPL), ``activation`` (mean |residual update|) or ``block_influence``
    (1 - cos(input, output)). Windows run in batches of ``batch_size`` in the model's dtype on its
    device; sums are float64 and the order of operations is fixed, so equal inputs give
    bit-identical scores. Returns an ``ImportanceScores`` dict ``{layer: score}``.
    """
    if method not in METHODS:
        raise GaqpruneError(f"--importance_method {method!r} is not supported; use one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise GaqpruneError(f"layer importance batch size {batch_size} must be >= 1")
    _check_windows(windows)
    start, end = _resolve_range(hf_model, layer_start, layer_end)
    with torch.inference_mode():
        if method == "removal":
            return _removal(hf_model, windows, start, end, batch_size, progress)
        return _one_pass(hf_model, windows, method, start, end, batch_size, progress)


@contextmanager
def _layer_skipped(hf_model, layer: int) -> Iterator[None]:
    """Temporarily drop decoder layer ``layer`` from the model (the forward loop then never sees it), and its entry
    of ``config.layer_types``, which the forward reads by position (each remaining layer keeps its own mask)."""
    layers = _decoder_layers(hf_model)
    config = hf_model.config
    types = getattr(config, "layer_types", None)
    hf_model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != layer])
    if types is not None and len(types) == len(layers):
        config.layer_types = [t for i, t in enumerate(types) if i != layer]
    try:
        yield
    finally:
        hf_model.model.layers = layers
        if types is not None:
            config.layer_types = types


def removal_importance_naive(hf_model, windows: torch.Tensor, layer_start: int = 0, layer_end: int | None = None,
                             batch_size: int = 8, progress: bool = False) -> dict[int, float]:
    """Reference for ``removal``: a full forward of the model with each layer dropped (about L^2 layer runs).

    Uses ``gaqprune.metrics.causal_nll`` on the real model, independent of the cached path's code.
    """
    from gaqprune.core.metrics import causal_nll

    _check_windows(windows)
    start, end = _resolve_range(hf_model, layer_start, layer_end)
    device = next(hf_model.parameters()).device
    batches = micro_batches(windows, batch_size, device)

    def ppl() -> float:
        nll, count = 0.0, 0
        for ids in batches:
            total, n = causal_nll(hf_model, ids)
            nll += total.double().item()
            count += int(n)
        return _ppl(nll, count)

    with torch.inference_mode(), _progress(end - start + 1, "layer importance (naive removal)", progress) as bar:
        dense = ppl()
        bar.update(1)
        scores = {}
        for layer in range(start, end):
            with _layer_skipped(hf_model, layer):
                scores[layer] = ppl() - dense
            bar.update(1)
    return ImportanceScores(scores, "removal", dense)


# --------------------------------------------------------------------------- the model's identity


def model_fingerprint(hf_model, samples_per_tensor: int = 256) -> str:
    """A cheap, deterministic hash of the weights: every tensor's name, shape, dtype and evenly spaced values.

    Independent of the device; changes with the dtype, any shape change (pruning) and any update
    that touches the sampled values (fine-tuning, a merged LoRA).
    """
    digest = hashlib.sha256()
    for name, tensor in state_items(hf_model):
        flat = tensor.detach().reshape(-1)
        k = min(samples_per_tensor, flat.numel())
        # Integer spacing: a float32 linspace rounds past the end for tensors of tens of millions of values.
        idx = torch.arange(k, dtype=torch.int64) * max(flat.numel() - 1, 0) // max(k - 1, 1)
        values = flat[idx.to(flat.device)].to("cpu", torch.float32) if flat.numel() else flat.new_zeros(0).float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]

