"""What a prunable unit owns: the one place that maps GQA groups and MLP channels to weight rows/columns.

* A **GQA group** ``g`` = one key/value head plus the query heads that share it. It owns its rows of
  ``k_proj`` and ``v_proj``, the rows of ``q_proj`` of its query heads, and the matching columns of
  ``o_proj`` (plus the bias entries of the rows it owns).
* An **MLP channel** ``c`` owns row ``c`` of ``gate_proj`` and ``up_proj`` and column ``c`` of ``down_proj``.

Taylor scoring (``gaqprune.taylor``) sums scores over exactly these positions, and surgery
(``gaqprune.surgery``) keeps exactly these positions, so the two can never disagree.
Shapes are read from the modules (not the config), so already-pruned layers work too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ATTENTION = "attention"
MLP = "mlp"


@dataclass(frozen=True)
class Owner:
    """One Linear weight of a layer and which unit owns each of its rows (dim 0) or columns (dim 1)."""

    path: str  # attribute path inside the decoder layer, e.g. "self_attn.q_proj"
    dim: int  # 0: the unit owns rows (and the bias entries); 1: the unit owns columns
    unit_of: torch.Tensor  # [size along dim] -> unit index


def head_dim(layer: nn.Module) -> int:
    attn = layer.self_attn
    return int(getattr(attn, "head_dim", None) or attn.config.hidden_size // attn.config.num_attention_heads)


def num_groups(layer: nn.Module) -> int:
    """Number of KV heads (= GQA groups) this layer has now."""
    return layer.self_attn.k_proj.out_features // head_dim(layer)


def num_channels(layer: nn.Module) -> int:
    """Number of MLP channels this layer has now."""
    return layer.mlp.gate_proj.out_features


def layer_shapes(hf_model) -> list[dict[str, int]]:
    """Per-layer unit counts (query heads, KV heads, MLP channels) of a (possibly pruned) model, read from its modules."""
    return [{
        "num_attention_heads": layer.self_attn.q_proj.out_features // head_dim(layer),
        "num_key_value_heads": num_groups(layer),
        "intermediate_size": num_channels(layer),
    } for layer in hf_model.model.layers]


def owners(layer: nn.Module, kind: str) -> list[Owner]:
    """The weights a unit of ``kind`` (``attention`` or ``mlp``) owns in ``layer``."""
    if kind == ATTENTION:
        hd = head_dim(layer)
        attn = layer.self_attn
        groups = attn.k_proj.out_features // hd
        q_per_group = attn.q_proj.out_features // (hd * groups)  # query heads per KV head, kept constant
        kv_unit = torch.arange(groups).repeat_interleave(hd)
        q_unit = torch.arange(groups).repeat_interleave(hd * q_per_group)
        return [
            Owner("self_attn.q_proj", 0, q_unit),
            Owner("self_attn.k_proj", 0, kv_unit),
            Owner("self_attn.v_proj", 0, kv_unit),
            Owner("self_attn.o_proj", 1, q_unit),
        ]
    if kind == MLP:
        channel = torch.arange(layer.mlp.gate_proj.out_features)
        return [Owner("mlp.gate_proj", 0, channel), Owner("mlp.up_proj", 0, channel), Owner("mlp.down_proj", 1, channel)]
    raise ValueError(f"unknown unit kind {kind!r}")


def linear(layer: nn.Module, path: str) -> nn.Linear:
    module = layer
    for name in path.split("."):
        module = getattr(module, name)
    return module


def unit_count(layer: nn.Module, kind: str) -> int:
    return num_groups(layer) if kind == ATTENTION else num_channels(layer)


def params_per_unit(layer: nn.Module, kind: str) -> int:
    """Parameters one unit of ``kind`` owns (weights plus owned bias entries); equal for all units of a kind."""
    total = 0
    for owner in owners(layer, kind):
        lin = linear(layer, owner.path)
        total += lin.weight.numel()
        if owner.dim == 0 and lin.bias is not None:
            total += lin.bias.numel()
    return total // unit_count(layer, kind)


def prunable_params(layer: nn.Module) -> int:
    """Attention + MLP Linear parameters of a layer (what the pruning ratio is measured against)."""
    total = 0
    for kind in (ATTENTION, MLP):
        for owner in owners(layer, kind):
            total += sum(p.numel() for p in linear(layer, owner.path).parameters())
    return total


def kept_positions(owner: Owner, keep_units: torch.Tensor) -> torch.Tensor:
    """Sorted row/column indices of ``owner`` that belong to the units in ``keep_units``."""
    return torch.isin(owner.unit_of, keep_units).nonzero().flatten()
