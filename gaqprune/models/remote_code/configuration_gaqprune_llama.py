"""Configs of Llama-layout models whose decoder layers differ in shape (written by gaqprune, load with transformers
alone): ``gaqprune_llama``, ``gaqprune_mistral``, ``gaqprune_qwen2`` and ``gaqprune_qwen3``.

Stock ``LlamaConfig`` describes every layer with the same ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size``. A pruned model keeps those global fields at
their original (valid) values and lists each layer's own counts in ``per_layer_config``, the
schema transformers uses for heterogeneous models: ``{"<layer index>": {"<field>": value}}``.

The overrides are kept by this class itself rather than by transformers' heterogeneity machinery
on purpose: that machinery makes ``config.num_attention_heads`` raise and validates every layer
with ``LlamaConfig``'s rule that heads divide ``hidden_size`` (24 heads at hidden 4096 fails even
with ``head_dim`` set), while code written for Llama reads the global fields. So the globals stay
readable, and ``per_layer_config[i]`` returns layer ``i``'s resolved config, which is what
transformers' cache code (``get_head_shapes``) reads to size per-layer KV caches.

This file must only import torch/transformers: it is copied next to the weights for
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

# The per-layer fields structured pruning changes; everything else is shared by all layers.
PER_LAYER_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
_OVERRIDES = "_gaqprune_layer_overrides"  # where the overrides live in __dict__ (never a public attribute)


class PerLayerShapes:
    """Per-layer head counts and MLP widths in ``per_layer_config``, mixed into a stock config class."""

    @property
    def per_layer_config(self) -> list[LlamaConfig]:
        """One resolved config per decoder layer (global fields with that layer's overrides applied)."""
        overrides = self.__dict__.get(_OVERRIDES, {})
        layers = []
        for index in range(self.num_hidden_layers):
            layer = copy.copy(self)
            layer.__dict__.pop(_OVERRIDES, None)
            for field, value in overrides.get(index, {}).items():
                setattr(layer, field, value)
            layers.append(layer)
        return layers

    @per_layer_config.setter
    def per_layer_config(self, value: dict[int | str, dict[str, Any]] | None) -> None:
        self.__dict__[_OVERRIDES] = _checked_overrides(self, value or {})

    def layer_shapes(self) -> list[dict[str, int]]:
        """Each layer's ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``."""
        overrides = self.__dict__.get(_OVERRIDES, {})
        return [
            {field: overrides.get(index, {}).get(field, getattr(self, field)) for field in PER_LAYER_FIELDS}
            for index in range(self.num_hidden_layers)
        ]

    def _update_heterogeneous_to_dict_output(self, d: dict[str, Any]) -> None:
        # Serialize every layer explicitly (transformers' explicit form of the schema), with
        # zero-padded keys so JSON key order is numeric, exactly as transformers writes them.
        d.pop(_OVERRIDES, None)
        shapes = self.layer_shapes()
        width = len(str(max(len(shapes) - 1, 0)))
        d["per_layer_config"] = {str(index).zfill(width): shape for index, shape in enumerate(shapes)}


class GaqpruneLlamaConfig(PerLayerShapes, LlamaConfig):
    """``LlamaConfig`` plus per-layer head counts and MLP widths in ``per_layer_config``."""

    model_type = "gaqprune_llama"


class GaqpruneMistralConfig(PerLayerShapes, MistralConfig):
    """``MistralConfig`` (its sliding window included) plus per-layer head counts and MLP widths."""

    model_type = "gaqprune_mistral"


class GaqpruneQwen2Config(PerLayerShapes, Qwen2Config):
    """``Qwen2Config`` plus per-layer head counts and MLP widths in ``per_layer_config``."""

    model_type = "gaqprune_qwen2"


class GaqpruneQwen3Config(PerLayerShapes, Qwen3Config):
    """``Qwen3Config`` plus per-layer head counts and MLP widths in ``per_layer_config``."""

    model_type = "gaqprune_qwen3"


def _checked_overrides(config: LlamaConfig, value: dict[int | str, dict[str, Any]]) -> dict[int, dict[str, int]]:
    """Validate ``per_layer_config`` overrides and return them keyed by int layer index."""
    overrides: dict[int, dict[str, int]] = {}
    for key, fields in value.items():
        index = int(key)
        if not 0 <= index < config.num_hidden_layers:
            raise ValueError(f"per_layer_config: layer {key!r} is outside 0..{config.num_hidden_layers - 1}")
        unknown = sorted(set(fields) - set(PER_LAYER_FIELDS))
        if unknown:
            raise ValueError(f"per_layer_config[{key!r}]: unsupported fields {unknown}; allowed: {list(PER_LAYER_FIELDS)}")
        layer = {field: int(fields[field]) for field in PER_LAYER_FIELDS if field in fields}
        heads = layer.get("num_attention_heads", config.num_attention_heads)
        kv_heads = layer.get("num_key_value_heads", config.num_key_value_heads)
        mlp = layer.get("intermediate_size", config.intermediate_size)
        # head_dim is global, so heads need not divide hidden_size; they must fill whole KV groups.
        if heads < 1 or kv_heads < 1 or mlp < 1 or heads % kv_heads:
            raise ValueError(
                f"per_layer_config[{key!r}]: {heads} query heads, {kv_heads} KV heads, MLP {mlp} is not a valid "
                "layer (counts must be >= 1 and query heads a multiple of KV heads)"
            )
        overrides[index] = layer
    return overrides


__all__ = ["GaqpruneLlamaConfig", "GaqpruneMistralConfig", "GaqpruneQwen2Config", "GaqpruneQwen3Config", "PER_LAYER_FIELDS",
           "PerLayerShapes"]
