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

The record saved to ``layer_importance_config.json`` says everything needed to judge reuse
(model fingerprint, layer count, method, data, range); ``load_importance`` refuses a record that
does not fit the run with one line naming ``--importance_config``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F

from gaqprune.core.layers import batch_layer_inputs, call_layer, layer_inputs, micro_batches
from gaqprune.core.metrics import lm_head
from gaqprune.errors import GaqpruneError

METHODS = ("removal", "activation", "block_influence")
RECORD_FORMAT = "gaqprune.layer_importance"
RECORD_VERSION = 1
# Keys ``importance_record`` needs in ``meta``; ``dense_perplexity``, ``dtype`` and ``created`` are optional.
REQUIRED_META = ("base_model", "model_fingerprint", "num_layers", "method", "samples", "seq_len", "data_source",
                 "layer_start", "layer_end", "seed")
FLAG = "--importance_config"


class ImportanceScores(dict):
    """``{layer index: score}`` plus how it was measured (``method``; ``dense_perplexity`` for removal)."""

    def __init__(self, scores: dict[int, float], method: str, dense_perplexity: float | None = None):
        super().__init__(scores)
        self.method = method
        self.dense_perplexity = dense_perplexity


# --------------------------------------------------------------------------- running the layers


def _decoder_layers(hf_model) -> torch.nn.ModuleList:
    return hf_model.model.layers


def _tail_nll(hf_model, hidden: torch.Tensor, ids: torch.Tensor, chunk_tokens: int = 4096) -> float:
    """Summed next-token NLL (float64) from last-layer hidden states: final norm + LM head in token chunks.

    At most ``chunk_tokens x vocab`` logits exist at once, so a 128k vocabulary stays bounded.
    """
    hidden = hf_model.model.norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    weight, bias = lm_head(hf_model)
    total = 0.0
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = F.linear(hidden[start : start + chunk_tokens], weight, bias).float()
        total += F.cross_entropy(logits, labels[start : start + chunk_tokens], reduction="sum").double().item()
    return total


def _ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def _resolve_range(hf_model, layer_start: int, layer_end: int | None) -> tuple[int, int]:
    num_layers = len(_decoder_layers(hf_model))
    end = num_layers if layer_end is None else layer_end
    if not 0 <= layer_start < end <= num_layers:
        raise GaqpruneError(
            f"layer range --layer_start {layer_start} --layer_end {layer_end} is empty or outside the model's "
            f"{num_layers} layers; use 0 <= layer_start < layer_end <= {num_layers}"
        )
    return layer_start, end


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
    layers = _decoder_layers(hf_model)
    num_layers = len(layers)
    device = next(hf_model.parameters()).device
    batches = micro_batches(windows, batch_size, device)
    count = sum(ids.numel() - ids.shape[0] for ids in batches)  # predicted tokens: T-1 per window
    # Dense hidden states of every batch at the input of the current layer (model dtype, model device).
    states, layer_kwargs = (list(column) for column in zip(*batch_layer_inputs(hf_model, batches)))

    def run(hidden: torch.Tensor, kwargs: dict[str, Any], first: int, last: int) -> torch.Tensor:
        for i in range(first, last):
            hidden = call_layer(layers[i], hidden, kwargs)
        return hidden

    # Progress in layer evaluations, so the ETA is right although later layers need shorter tails.
    work = len(batches) * (start + sum(num_layers - layer for layer in range(start, end)) + (num_layers - end))
    skipped_nll = {layer: 0.0 for layer in range(start, end)}
    with _progress(work, "layer importance (removal)", progress) as bar:
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
    dense = _ppl(dense_nll, count)
    _check_finite(dense, "the dense perplexity")
    scores = {}
    for layer, nll in skipped_nll.items():
        scores[layer] = _ppl(nll, count) - dense
        _check_finite(scores[layer], f"the perplexity with layer {layer} skipped")
    return ImportanceScores(scores, "removal", dense)


def _one_pass(hf_model, windows: torch.Tensor, method: str, start: int, end: int, batch_size: int,
              progress: bool) -> ImportanceScores:
    """``activation`` / ``block_influence``: one forward through layers 0 .. end-1, token-averaged in float64."""
    layers = _decoder_layers(hf_model)
    device = next(hf_model.parameters()).device
    sums = {layer: 0.0 for layer in range(start, end)}
    tokens = 0
    n_batches = math.ceil(len(windows) / batch_size)
    with _progress(n_batches * end, f"layer importance ({method})", progress) as bar:
        for ids in micro_batches(windows, batch_size, device):
            hidden, kwargs = layer_inputs(hf_model, ids)
            tokens += hidden.shape[0] * hidden.shape[1]
            for layer in range(end):
                out = call_layer(layers[layer], hidden, kwargs)
                if layer >= start:
                    x, y = hidden.float(), out.float()
                    if method == "activation":  # mean over tokens of the mean |update| over hidden units
                        per_token = (y - x).abs().mean(dim=-1)
                    else:
                        per_token = 1.0 - F.cosine_similarity(x, y, dim=-1)
                    sums[layer] += per_token.double().sum().item()
                hidden = out
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


# --------------------------------------------------------------------------- cached record


def model_fingerprint(hf_model, samples_per_tensor: int = 256) -> str:
    """A cheap, deterministic hash of the weights: every tensor's name, shape, dtype and evenly spaced values.

    Independent of the device; changes with the dtype, any shape change (pruning) and any update
    that touches the sampled values (fine-tuning, a merged LoRA).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(hf_model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        k = min(samples_per_tensor, flat.numel())
        # Integer spacing: a float32 linspace rounds past the end for tensors of tens of millions of values.
        idx = torch.arange(k, dtype=torch.int64) * max(flat.numel() - 1, 0) // max(k - 1, 1)
        values = flat[idx.to(flat.device)].to("cpu", torch.float32) if flat.numel() else flat.new_zeros(0).float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]


def importance_record(scores: dict[int, float], meta: dict) -> dict:
    """The JSON-serialisable ``layer_importance_config.json`` record of ``scores`` measured as ``meta`` says.

    ``meta`` needs ``REQUIRED_META`` (``layer_end`` may be None = all layers); ``dense_perplexity``
    (removal; taken from ``scores.dense_perplexity`` when absent), ``dtype`` and ``created`` are
    optional. Everything but ``created`` is a function of the inputs, so equal inputs give equal bytes.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"importance_record: meta lacks {', '.join(missing)}")
    layer_end = meta["num_layers"] if meta["layer_end"] is None else meta["layer_end"]
    wanted = set(range(meta["layer_start"], layer_end))
    if set(scores) != wanted:
        raise ValueError(f"importance_record: scores cover layers {sorted(scores)}, meta says {meta['layer_start']}..{layer_end}")
    from gaqprune import __version__

    dense = meta.get("dense_perplexity", getattr(scores, "dense_perplexity", None))
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "gaqprune_version": __version__,
        "base_model": str(meta["base_model"]),
        "model_fingerprint": str(meta["model_fingerprint"]),
        "num_layers": int(meta["num_layers"]),
        "method": str(meta["method"]),
        "samples": int(meta["samples"]),
        "seq_len": int(meta["seq_len"]),
        "data_source": str(meta["data_source"]),
        "seed": None if meta["seed"] is None else int(meta["seed"]),
        "dtype": None if meta.get("dtype") is None else str(meta["dtype"]).replace("torch.", ""),
        "layer_start": int(meta["layer_start"]),
        "layer_end": int(layer_end),
        "dense_perplexity": None if dense is None else float(dense),
        "scores": {str(layer): float(scores[layer]) for layer in sorted(scores)},
        "created": meta.get("created") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def save_importance(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` atomically as key-sorted JSON (equal records give byte-identical files)."""
    from gaqprune.atomic import write_json

    write_json(path, record)


def _refuse(path, problem: str) -> GaqpruneError:
    return GaqpruneError(
        f"{FLAG} {str(path)!r}: {problem}; rerun the layer importance analysis (drop --skip_importance_analysis)"
    )


def load_importance(path: str | os.PathLike, expected: dict) -> dict[int, float]:
    """Scores of a saved record for the requested layer range, after checking it fits this run.

    ``expected`` may hold ``num_layers``, ``model_fingerprint``, ``layer_start``, ``layer_end``
    (None = ``num_layers``) and any other record field (e.g. ``method``) that must match. Refuses,
    with a ``GaqpruneError`` naming ``--importance_config``, the path and found vs expected, a
    missing file, unreadable or corrupted JSON, another model or layer count, or scores that do
    not cover the range. Returns an ``ImportanceScores`` dict of the range's layers.
    """
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise _refuse(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(path, f"cannot be read ({type(err).__name__})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _refuse(path, f"is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("scores"), dict):
        raise _refuse(path, "is not a gaqprune layer importance record (no 'format'/'scores')")
    version = record.get("format_version", RECORD_VERSION)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise _refuse(path, f"has format_version {version!r}; this gaqprune reads records up to version {RECORD_VERSION} "
                            "(written by a newer gaqprune?)")
    try:
        scores = {int(k): float(v) for k, v in record["scores"].items()}
    except (TypeError, ValueError):
        raise _refuse(path, "has corrupted scores (keys must be layer indices, values numbers)") from None
    bad = [layer for layer, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise _refuse(path, f"has non-finite scores for layers {bad}")

    for key, want in expected.items():
        if key in ("layer_start", "layer_end") or want is None:
            continue
        if record.get(key) != want:
            raise _refuse(path, f"{key} differs: found {record.get(key)!r}, expected {want!r} (a different model or setup)")
    num_layers = expected.get("num_layers", record.get("num_layers"))
    start = expected.get("layer_start")
    start = 0 if start is None else start
    end = expected.get("layer_end")
    end = num_layers if end is None else end
    if end is None:  # no layer count anywhere: return what the record holds
        wanted = sorted(scores)
    else:
        wanted = list(range(start, end))
        missing = [layer for layer in wanted if layer not in scores]
        if missing:
            raise _refuse(
                path,
                f"holds scores for layers {min(scores, default=0)}..{max(scores, default=-1)}, "
                f"expected layers {start}..{end - 1} (missing {missing})",
            )
    return ImportanceScores({layer: scores[layer] for layer in wanted}, str(record.get("method")), record.get("dense_perplexity"))


# --------------------------------------------------------------------------- plot


def scale_importance_axis(ax, values: list[float], log_scale: bool | None = None) -> bool:
    """A log axis for importances whose magnitudes span more than 10x (None: decide; removal spans six orders, and
    on a linear axis one outlier flattens every other layer), symmetric-log when some are zero or negative (linear
    near zero so they stay visible); returns whether the axis is logarithmic."""
    magnitudes = [abs(v) for v in values if v != 0]
    if log_scale is None:
        log_scale = len(magnitudes) > 1 and max(magnitudes) / min(magnitudes) > 10
    if log_scale:
        if min(values) > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=min(magnitudes) if magnitudes else 1.0)
    return log_scale


def plot_layer_importance(scores: dict[int, float], path: str | os.PathLike, method: str,
                          log_scale: bool | None = None) -> None:
    """Bar chart of ``scores`` per layer, saved atomically as PNG.

    ``log_scale`` None = automatic (see ``scale_importance_axis``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gaqprune.atomic import save_figure

    layers = sorted(scores)
    values = [scores[layer] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.5))
    try:
        colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
        ax.bar(layers, values, color=colors)
        log_scale = scale_importance_axis(ax, values, log_scale)
        labels = {"removal": "PPL(skipped) - PPL(dense)", "activation": "mean |residual update|",
                  "block_influence": "1 - cos(input, output)"}
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(labels.get(method, method))
        ax.set_title(f"layer importance ({method})" + (", log scale" if log_scale else ""))
        ax.set_xticks(layers)
        ax.tick_params(axis="x", labelsize=7)
        save_figure(fig, path)
    finally:
        plt.close(fig)
