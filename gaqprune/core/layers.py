"""Running a decoder one layer at a time: what HF hands its first decoder layer.

Layer importance (resuming from a cached layer input), the streamed Taylor backward and the least-squares
refit all run decoder layers directly on hidden states. Letting the model's own forward build the inputs
(embeddings, rotary position embeddings, causal mask, position ids) keeps this exact for every Llama-family
variant and attention backend.

A model may keep its decoder layers' weights off the device (``--offload``: an offload store, see
``gaqprune.models.offload``, attached as ``hf_model.gaqprune_offload``; the layers hold meta tensors of the right
shapes). Code that runs a layer enters ``resident(hf_model, i)`` first: the layer's weights are on the device inside
the block and gone after it. Without a store the block costs nothing, so every stage has one code path. The store is
duck-typed (``resident(layer, keep)`` a context manager): the method never imports the model readers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch


class _Captured(Exception):
    """Raised by the hook on layer 0 to stop the model's forward once the layer inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]):
        super().__init__()
        self.hidden, self.kwargs = hidden, kwargs


class MasksByType(dict):
    """The attention mask of each layer type (``full_attention``, ``sliding_attention``) of a model whose layers mix
    them (Qwen2 / Qwen3 with ``use_sliding_window`` below ``max_window_layers``): ``call_layer`` gives each layer its
    own, as the model's forward does."""


def layer_type(layer: torch.nn.Module) -> str:
    """A decoder layer's attention type (transformers sets it on the attention module, older versions on the layer)."""
    return getattr(getattr(layer, "self_attn", None), "layer_type", None) or getattr(layer, "attention_type", None) \
        or "full_attention"


def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]):
    """``layer(hidden, **kwargs)`` with the attention mask of the layer's type when ``kwargs`` holds several."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, MasksByType):
        kwargs = {**kwargs, "attention_mask": mask[layer_type(layer)]}
    return layer(hidden, **kwargs)


def _first_layer_inputs(hf_model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
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


def layer_inputs(hf_model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Layer 0's input hidden states for the token windows ``ids`` and the keyword arguments the decoder layers
    receive (no gradients; the forward stops at layer 0). Run the layers with ``call_layer``: when they mix full and
    sliding attention, the mask is a ``MasksByType`` (layer 0's alone would calibrate every layer with one mask)."""
    hidden, kwargs = _first_layer_inputs(hf_model, ids)
    config = hf_model.config
    types = list(dict.fromkeys(getattr(config, "layer_types", None) or []))
    if len(types) > 1:
        masks, original = MasksByType(), config.layer_types
        try:
            for kind in types:  # the model hands layer 0 the mask of layer_types[0]: of each type in turn
                config.layer_types = [kind, *original[1:]]
                masks[kind] = _first_layer_inputs(hf_model, ids)[1].get("attention_mask")
        finally:
            config.layer_types = original
        kwargs["attention_mask"] = masks
    return hidden, kwargs


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


OFFLOAD_ATTR = "gaqprune_offload"
LAYERS_PREFIX = "model.layers."  # where a causal LM's decoder layers sit in its state dict (every supported family)


def offload_store(hf_model):
    """The store holding ``hf_model``'s decoder-layer weights off the device, or None when they are in the model."""
    return getattr(hf_model, OFFLOAD_ATTR, None)


@contextmanager
def resident(hf_model, index: int, keep: bool = False) -> Iterator[torch.nn.Module]:
    """Decoder layer ``index`` with its weights on the model's device for the block. An offloaded layer is read in on
    entry and released on exit; ``keep`` writes its weights as they are at the exit (pruned, refit) back to the store
    first. Without an offload store this is the layer itself, unchanged."""
    layer = hf_model.model.layers[index]
    store = offload_store(hf_model)
    if store is None:
        yield layer
        return
    with store.resident(layer, keep=keep):
        yield layer


def state_items(hf_model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model's state dict in name order, real tensors only: an offloaded model's decoder
    layers are read in one at a time (their names are contiguous in name order), so at most one is resident."""
    items = sorted(hf_model.state_dict().items())
    if offload_store(hf_model) is None:
        yield from items
        return
    with ExitStack() as stack:
        current, tensors = None, {}
        for name, tensor in items:
            if not name.startswith(LAYERS_PREFIX):
                yield name, tensor
                continue
            index = int(name[len(LAYERS_PREFIX):].split(".", 1)[0])
            if index != current:
                stack.close()
                layer = stack.enter_context(resident(hf_model, index))
                current = index
                tensors = {f"{LAYERS_PREFIX}{index}.{k}": v for k, v in layer.state_dict().items()}
            yield name, tensors[name]
