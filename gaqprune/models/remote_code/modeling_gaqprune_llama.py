"""``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` whose decoder layers
each have their own head count and MLP width.

The model is built exactly like the stock model from the global config, then every layer whose
``per_layer_config`` entry differs gets correctly shaped q/k/v/o and gate/up/down Linears before
any weight is loaded (keeping each projection's bias, e.g. Qwen2's q/k/v biases), so ``from_pretrained`` fills
them without size-mismatch warnings. The forward pass is the stock model's (Qwen3's per-head q/k norms act on
``head_dim`` and need no change): attention infers the head count from the projection width (``view(..., -1,
head_dim)``), and only ``num_key_value_groups`` has to follow the layer.

This file must only import torch/transformers: it is copied next to the weights for
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, and transformers' ``check_imports`` reads
every ``import`` in it and refuses to load the model when one of them names a missing package, even one guarded by
``importlib.util.find_spec``; it skips only the imports inside a ``try`` block. So peft, which most serving and
evaluation set-ups do not have, is imported in a ``try: ... except ImportError``.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_gaqprune_llama import (
    GaqpruneLlamaConfig,
    GaqpruneMistralConfig,
    GaqpruneQwen2Config,
    GaqpruneQwen3Config,
)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """A fresh Linear of the new size on the old one's device/dtype (meta while from_pretrained builds)."""
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)


def reshape_layers(model: nn.Module, config) -> None:
    """Give each decoder layer of ``model.model.layers`` the shapes ``config.per_layer_config`` records."""
    # Qwen2 configs have no head_dim field (their attention uses hidden_size // num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    for layer, shape in zip(model.model.layers, config.layer_shapes(), strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        q_width = shape["num_attention_heads"] * head_dim
        kv_width = shape["num_key_value_heads"] * head_dim
        if attn.q_proj.out_features != q_width or attn.k_proj.out_features != kv_width:
            attn.q_proj = _linear_like(attn.q_proj, hidden, q_width)
            attn.k_proj = _linear_like(attn.k_proj, hidden, kv_width)
            attn.v_proj = _linear_like(attn.v_proj, hidden, kv_width)
            attn.o_proj = _linear_like(attn.o_proj, q_width, hidden)
        # repeat_kv in eager/sdpa attention reads this per module; keep it true for this layer.
        attn.num_key_value_groups = shape["num_attention_heads"] // shape["num_key_value_heads"]
        width = shape["intermediate_size"]
        if mlp.gate_proj.out_features != width:
            mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, width)
            mlp.up_proj = _linear_like(mlp.up_proj, hidden, width)
            mlp.down_proj = _linear_like(mlp.down_proj, width, hidden)
            mlp.intermediate_size = width


# The stock model type each pruned one is built from (peft's default LoRA targets are keyed by model type).
STOCK_MODEL_TYPES = {"gaqprune_llama": "llama", "gaqprune_mistral": "mistral", "gaqprune_qwen2": "qwen2",
                     "gaqprune_qwen3": "qwen3"}


def register_lora_targets(model_type: str) -> None:
    """Give ``model_type`` peft's default LoRA targets of its stock model type, so ``LoraConfig()`` without
    ``target_modules`` works on a pruned model as on the model it came from (nothing happens without peft)."""
    try:  # (inside ``try``: transformers' check_imports does not make peft a requirement of the checkpoint)
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets
    except ImportError:
        return
    targets.setdefault(model_type, list(targets.get(STOCK_MODEL_TYPES.get(model_type, ""), ["q_proj", "v_proj"])))


class PerLayerModel:
    """Mixed into a stock ``*ForCausalLM``: after the stock build, give each layer the shapes its config records."""

    def __init__(self, config):
        super().__init__(config)
        register_lora_targets(config.model_type)
        reshape_layers(self, config)
        # Re-run post_init so the new Linears get the usual init (and tied-weight bookkeeping is redone).
        self.post_init()


def _per_layer_class(stock: type, config_class: type, what: str) -> type:
    """``Gaqprune<Family>ForCausalLM``: the stock ``stock`` class with per-layer shapes from ``config_class``."""
    name = config_class.__name__.removesuffix("Config") + "ForCausalLM"
    return type(name, (PerLayerModel, stock), {
        "__module__": __name__, "__qualname__": name, "config_class": config_class,
        "__annotations__": {"config": config_class},
        "__doc__": f"Stock ``{stock.__name__}`` ({what}) with per-layer shapes taken from ``{config_class.__name__}``."})


GaqpruneLlamaForCausalLM = _per_layer_class(LlamaForCausalLM, GaqpruneLlamaConfig, "Llama")
GaqpruneMistralForCausalLM = _per_layer_class(MistralForCausalLM, GaqpruneMistralConfig, "its sliding window included")
GaqpruneQwen2ForCausalLM = _per_layer_class(Qwen2ForCausalLM, GaqpruneQwen2Config, "its q/k/v biases included")
GaqpruneQwen3ForCausalLM = _per_layer_class(Qwen3ForCausalLM, GaqpruneQwen3Config, "its per-head q/k norms included")


__all__ = ["GaqpruneLlamaForCausalLM", "GaqpruneMistralForCausalLM", "GaqpruneQwen2ForCausalLM", "GaqpruneQwen3ForCausalLM",
           "register_lora_targets", "reshape_layers"]
