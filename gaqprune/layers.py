"""Running a decoder one layer at a time: what HF hands its first decoder layer.

Layer importance (resuming from a cached layer input), the streamed Taylor backward and the least-squares
refit all run decoder layers directly on hidden states. Letting the model's own forward build the inputs
(embeddings, rotary position embeddings, causal mask, position ids) keeps this exact for every Llama-family
variant and attention backend.
"""

from __future__ import annotations

from typing import Any

import torch


class _Captured(Exception):
    """Raised by the hook on layer 0 to stop the model's forward once the layer inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]):
        super().__init__()
        self.hidden, self.kwargs = hidden, kwargs


def layer_inputs(hf_model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer 0's input hidden states for the token windows ``ids`` and the keyword arguments every decoder
    layer receives (no gradients; the forward stops at layer 0)."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        raise _Captured(hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})

    handle = hf_model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            hf_model.model(input_ids=ids, use_cache=False)
    except _Captured as captured:
        return captured.hidden, captured.kwargs
    finally:
        handle.remove()
    raise RuntimeError("decoder layer 0 was never called")  # unreachable for a decoder-only model


def micro_batches(windows: torch.Tensor, batch_size: int, device: torch.device | str) -> list[torch.Tensor]:
    """``windows`` cut into consecutive micro-batches of at most ``batch_size`` rows, on ``device``."""
    return [windows[i : i + batch_size].to(device) for i in range(0, len(windows), batch_size)]


def batch_layer_inputs(hf_model, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``layer_inputs`` of every micro-batch. The keyword arguments (causal mask, rotary embeddings) depend only on
    the batch shape for unpadded windows, so micro-batches of one shape share one copy (not a B x T x T eager mask
    each)."""
    by_shape: dict[tuple[int, ...], dict[str, Any]] = {}
    inputs = []
    for ids in batches:
        hidden, kwargs = layer_inputs(hf_model, ids)
        inputs.append((hidden, by_shape.setdefault(tuple(ids.shape), kwargs)))
    return inputs
