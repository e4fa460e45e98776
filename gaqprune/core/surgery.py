"""Physical surgery on a HF Llama: smaller Linear weights for kept GQA groups / MLP channels, and layer removal.

Query heads per KV head stay constant, so stock HF attention (eager, sdpa, flash) and the KV cache
work unchanged. ``config.num_attention_heads`` etc. are left alone: per-layer shapes are read from
the modules (``gaqprune.export`` records them). A config that lists per-layer shapes (a loaded pruned
checkpoint's) is kept in step with the modules (``sync_layer_config``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gaqprune.core import units


def _sliced_linear(lin: nn.Linear, dim: int, index: torch.Tensor) -> nn.Linear:
    """A new Linear keeping rows (dim 0, with their bias entries) or columns (dim 1) ``index`` of ``lin``."""
    index = index.to(lin.weight.device)
    weight = lin.weight.detach().index_select(dim, index).clone()
    bias = None
    if lin.bias is not None:
        bias = lin.bias.detach().index_select(0, index).clone() if dim == 0 else lin.bias.detach().clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=lin.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=lin.bias.requires_grad)
    return new


def _set_linear(layer: nn.Module, path: str, new: nn.Linear) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = units.linear(layer, parent_path) if parent_path else layer
    setattr(parent, name, new)


def keep_units(layer: nn.Module, kind: str, keep: Sequence[int]) -> None:
    """Keep only units ``keep`` (indices into the layer's current groups or channels) of ``kind``, in place.

    A layer keeps at least one unit of each kind: removing a layer's attention (or MLP) completely
    is done by removing the whole layer (``remove_layers``), so HF modules never see zero heads.
    """
    count = units.unit_count(layer, kind)
    keep_t = torch.as_tensor(sorted({int(k) for k in keep}), dtype=torch.long)
    if len(keep_t) == 0:
        raise ValueError(f"a layer must keep at least one {kind} unit; remove the whole layer instead")
    if keep_t.min() < 0 or keep_t.max() >= count:
        raise ValueError(f"{kind} unit indices must lie in [0, {count}), got {keep_t.tolist()}")
    if len(keep_t) == count:
        return
    for owner in units.owners(layer, kind):
        lin = units.linear(layer, owner.path)
        _set_linear(layer, owner.path, _sliced_linear(lin, owner.dim, units.kept_positions(owner, keep_t)))


def remove_layers(hf_model, remove: Sequence[int]) -> None:
    """Delete decoder layers ``remove`` (depth pruning) and renumber the rest for the KV cache; a per-layer config is
    then synced with the modules (also when nothing is removed: width surgery before this may have changed them)."""
    remove_set = {int(i) for i in remove}
    layers = hf_model.model.layers
    if not remove_set:
        sync_layer_config(hf_model)
        return
    if len(remove_set) >= len(layers):
        raise ValueError("cannot remove every decoder layer")
    kept = [layer for i, layer in enumerate(layers) if i not in remove_set]
    hf_model.model.layers = nn.ModuleList(kept)
    config = hf_model.config
    # HF iterates self.layers[: config.num_hidden_layers] and the cache is indexed by layer_idx.
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in remove_set]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    sync_layer_config(hf_model)


def sync_layer_config(hf_model) -> None:
    """Make a per-layer config (a loaded pruned checkpoint's) describe the layers the modules now have, so code that
    sizes per-layer state from the config (a static KV cache, HF's ``save_pretrained``) sees the pruned shapes.
    A plain config is left alone (see the module docstring)."""
    config = hf_model.config
    if hasattr(config, "layer_shapes"):
        config.per_layer_config = dict(enumerate(units.layer_shapes(hf_model)))
