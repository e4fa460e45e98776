"""Pruned checkpoints: save a (possibly pruned) model so it loads anywhere, and load it back.

A pruned model's layers differ in shape, which a stock ``LlamaConfig`` cannot express. The saved
folder therefore holds, next to safetensors weights, tokenizer and generation config:

- ``config.json`` with ``model_type: gaqprune_llama`` (``gaqprune_mistral`` / ``gaqprune_qwen2`` / ``gaqprune_qwen3``):
  the original global head counts and MLP width (still valid values) plus each layer's own ``num_attention_heads``,
  ``num_key_value_heads`` and ``intermediate_size`` in transformers' ``per_layer_config`` schema,
  ``gaqprune_version`` and ``gaqprune_base_model``;
- ``configuration_gaqprune_llama.py`` / ``modeling_gaqprune_llama.py`` (from
  ``gaqprune/remote_code``) and an ``auto_map``, so stock transformers loads it with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` without gaqprune.

``load_pruned`` is gaqprune's own loader for these folders (no remote code executed). A dense
model (every layer at the global shape) is saved as a plain Llama / Mistral / Qwen2 / Qwen3 checkpoint instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gaqprune.atomic import atomic_dir
from gaqprune.errors import GaqpruneError

if TYPE_CHECKING:  # the remote code imports transformers; keep `is_pruned_checkpoint` cheap
    from gaqprune.models.remote_code.configuration_gaqprune_llama import GaqpruneLlamaConfig

PRUNED_MODEL_TYPE = "gaqprune_llama"  # == GaqpruneLlamaConfig.model_type (asserted in tests)
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
CONFIG_FILE = "configuration_gaqprune_llama.py"
MODELING_FILE = "modeling_gaqprune_llama.py"
# Pruned model type -> (its config class, its model class, the stock ones a dense copy saves as, the model types
# saved as it). Mistral keeps its sliding window; Qwen2 adds q/k/v biases; Qwen3 per-head q/k norms (over head_dim,
# untouched by removing heads). (Pruned Mistrals saved as gaqprune_llama by earlier gaqprune versions still load.)
PRUNED_FAMILIES: dict[str, tuple[str, str, str, str, tuple[str, ...]]] = {
    PRUNED_MODEL_TYPE: ("GaqpruneLlamaConfig", "GaqpruneLlamaForCausalLM", "LlamaConfig", "LlamaForCausalLM", ("llama",)),
    "gaqprune_mistral": ("GaqpruneMistralConfig", "GaqpruneMistralForCausalLM", "MistralConfig", "MistralForCausalLM",
                         ("mistral",)),
    "gaqprune_qwen2": ("GaqpruneQwen2Config", "GaqpruneQwen2ForCausalLM", "Qwen2Config", "Qwen2ForCausalLM", ("qwen2",)),
    "gaqprune_qwen3": ("GaqpruneQwen3Config", "GaqpruneQwen3ForCausalLM", "Qwen3Config", "Qwen3ForCausalLM", ("qwen3",)),
}
# Every model type gaqprune saves -> the pruned model type its pruned form gets.
PRUNED_TYPE_OF = {source: pruned for pruned, family in PRUNED_FAMILIES.items() for source in (*family[4], pruned)}
PRUNABLE_MODEL_TYPES = tuple(PRUNED_TYPE_OF)


def auto_map(pruned_type: str = PRUNED_MODEL_TYPE) -> dict[str, str]:
    """The ``auto_map`` of a pruned checkpoint: stock transformers' Auto classes -> the shipped remote code."""
    config_class, model_class = PRUNED_FAMILIES[pruned_type][:2]
    return {"AutoConfig": f"{Path(CONFIG_FILE).stem}.{config_class}",
            "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{model_class}"}


def pruned_classes(pruned_type: str = PRUNED_MODEL_TYPE):
    """gaqprune's own (config class, model class) of a pruned model type (the files shipped as remote code)."""
    from gaqprune.models.remote_code import configuration_gaqprune_llama, modeling_gaqprune_llama

    config_class, model_class = PRUNED_FAMILIES[pruned_type][:2]
    return getattr(configuration_gaqprune_llama, config_class), getattr(modeling_gaqprune_llama, model_class)


def _head_dim(config) -> int:
    """Qwen2 configs have no ``head_dim``: their attention uses ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# Keys of the source config that must not leak into the written one.
_DROPPED_KEYS = ("per_layer_config", "auto_map", "architectures", "model_type", "transformers_version", "_name_or_path")


def _global_shape(config) -> dict[str, int]:
    from gaqprune.models.remote_code.configuration_gaqprune_llama import PER_LAYER_FIELDS

    return {field: int(getattr(config, field)) for field in PER_LAYER_FIELDS}


def _checked_layer_shapes(hf_model) -> list[dict[str, int]]:
    """Per-layer shapes read from the modules, refusing layers a half-finished surgery left inconsistent."""
    from gaqprune.core.units import layer_shapes

    config = hf_model.config
    head_dim = _head_dim(config)
    for index, layer in enumerate(hf_model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        consistent = (
            q.out_features == o.in_features and k.out_features == v.out_features
            and q.out_features % head_dim == 0 and k.out_features % head_dim == 0 and q.out_features > 0 < k.out_features
            and (q.out_features // head_dim) % (k.out_features // head_dim) == 0
            and mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features > 0
        )
        if not consistent:
            raise GaqpruneError(
                f"layer {index} has inconsistent shapes (q {q.out_features}, k {k.out_features}, v {v.out_features}, "
                f"o in {o.in_features}, gate {mlp.gate_proj.out_features}, up {mlp.up_proj.out_features}, "
                f"down in {mlp.down_proj.in_features}, head_dim {head_dim}); it cannot be saved"
            )
        expected = _expected_biases(config)
        wrong = [n for n, module in (*((n, attn) for n in _ATTENTION), *((n, mlp) for n in _MLP))
                 if (getattr(module, n).bias is not None) != expected[n][0]]
        if wrong:
            why = expected[wrong[0]][1]
            raise GaqpruneError(
                f"layer {index}: {', '.join(n for n in wrong if expected[n][1] == why)} bias presence disagrees with "
                f"{why}; a {config.model_type} checkpoint cannot express that"
            )
    return layer_shapes(hf_model)


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _expected_biases(config) -> dict[str, tuple[bool, str]]:
    """Whether each projection of a layer carries a bias in ``config``'s family (what its checkpoint can express),
    and what says so."""
    if PRUNED_TYPE_OF.get(config.model_type) == "gaqprune_qwen2":
        return {name: (name in _ATTENTION[:3], "Qwen2's layout (q/k/v biases only)") for name in (*_ATTENTION, *_MLP)}
    # Llama / Mistral / Qwen3: one switch for all of q/k/v/o and one for gate/up/down (Qwen3 has none for the MLP)
    out = {}
    for names, flag in ((_ATTENTION, "attention_bias"), (_MLP, "mlp_bias")):
        value = bool(getattr(config, flag, False))
        out.update(dict.fromkeys(names, (value, f"config.{flag}={value}")))
    return out


def _base_model_name(hf_model, base_model: str | None) -> str | None:
    """The model this one was pruned from: explicit, else inherited from a pruned checkpoint, else its load path."""
    if base_model:
        return str(base_model)
    from gaqprune.models.names import model_origin

    inherited = getattr(hf_model.config, "gaqprune_base_model", None)
    loaded_from = getattr(hf_model.config, "_name_or_path", None)
    return inherited or (model_origin(loaded_from) if loaded_from else None)


def _param_dtype(hf_model) -> torch.dtype:
    return next(p.dtype for p in hf_model.parameters() if p.is_floating_point())


def build_config(hf_model, base_model: str | None = None):
    """The config to write for ``hf_model``: a plain one if every layer is full size, else a gaqprune_* one."""
    import transformers

    from gaqprune.version import __version__

    config = hf_model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PRUNABLE_MODEL_TYPES:
        raise GaqpruneError(f"cannot save a {model_type!r} model; gaqprune saves {', '.join(PRUNABLE_MODEL_TYPES)} models")
    shapes = _checked_layer_shapes(hf_model)
    if len(shapes) != config.num_hidden_layers:
        raise GaqpruneError(
            f"the model has {len(shapes)} decoder layers but config.num_hidden_layers is {config.num_hidden_layers}; "
            "update the config when deleting layers"
        )
    values: dict[str, Any] = {k: v for k, v in config.to_dict().items() if k not in _DROPPED_KEYS}
    values["dtype"] = str(_param_dtype(hf_model)).removeprefix("torch.")
    values["use_cache"] = True  # load_model turns the KV cache off for training; the saved model should decode fast
    values["gaqprune_version"] = __version__
    values["gaqprune_base_model"] = _base_model_name(hf_model, base_model)
    # Explicit (Qwen2 configs have none): per-layer configs must not derive it from a pruned layer's head count.
    values["head_dim"] = _head_dim(config)
    dense = all(shape == _global_shape(config) for shape in shapes)

    pruned_type = PRUNED_TYPE_OF[model_type]
    if dense:  # stock transformers loads it as it is (a pruned checkpoint's too, once its layers are all full size)
        stock_config, stock_model = PRUNED_FAMILIES[pruned_type][2:4]
        out = getattr(transformers, stock_config)(**values)
        out.architectures = [stock_model]
        return out

    # Layers equal to the global shape need no override; the config still writes every layer explicitly.
    overrides = {index: shape for index, shape in enumerate(shapes) if shape != _global_shape(config)}
    config_class, model_class = pruned_classes(pruned_type)
    out = config_class(**values, per_layer_config=overrides)
    out.architectures = [model_class.__name__]
    out.auto_map = auto_map(pruned_type)
    return out


def save_pretrained_model(hf_model, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False,
                          max_shard_size: str = "2GB", base_model: str | None = None,
                          write_weights: Callable[[Path], None] | None = None) -> Path:
    """Save ``hf_model`` (+ ``tokenizer``) to ``out_dir`` atomically so it reloads bit-exactly in a fresh process.

    Pruned models get a ``gaqprune_*`` config with per-layer shapes and the remote code stock
    transformers needs (``trust_remote_code=True``); dense ones stay plain checkpoints. Weights are
    safetensors in the model's dtype, sharded above ``max_shard_size``. An existing ``out_dir`` is
    refused unless ``overwrite``; an interrupted save leaves no ``out_dir`` behind. ``write_weights(folder)``
    replaces HF's ``save_pretrained`` for the weights (and generation config): an offloaded model's layer-by-layer
    writer (``gaqprune.models.offload.layer_shard_writer``).
    """
    if any("lora_" in name for name, _ in hf_model.named_parameters()):
        raise GaqpruneError("the model still has LoRA adapter weights; merge them (merge_and_unload) before saving")
    config = build_config(hf_model, base_model)
    pruned = config.model_type in PRUNED_FAMILIES
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if write_weights is None:
            hf_model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            write_weights(tmp)
        config.save_pretrained(tmp)  # replaces the config.json written from the in-memory config
        _enable_generation_cache(tmp)
        for name in (CONFIG_FILE, MODELING_FILE):
            if pruned:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
            else:  # a model loaded with remote code may have copied it; a dense folder must not carry it
                (tmp / name).unlink(missing_ok=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _enable_generation_cache(folder: Path) -> None:
    """Make the written ``generation_config.json`` decode with a KV cache, as ``config.json`` does: one written from
    a model whose config had ``use_cache`` off (gaqprune's loader turns it off for training) would make ``generate``
    recompute every position at every step and ignore ``cache_implementation``."""
    from transformers import GenerationConfig

    if not (folder / "generation_config.json").is_file():
        return
    generation = GenerationConfig.from_pretrained(folder)
    if generation.use_cache is False:
        generation.use_cache = True
        generation.save_pretrained(folder)


def _read_config_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of a model folder or hub id (the hub's copy through HF's cache), or None."""
    file = Path(path) / "config.json"
    if not file.is_file() and not Path(path).exists():
        from transformers.utils import cached_file

        try:
            found = cached_file(str(path), "config.json", _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False)
        except Exception:  # not a hub id, gated, offline and not cached: the caller's own loading reports it
            found = None
        file = Path(found) if found else file
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` (a folder or hub id) holds a model saved by gaqprune with per-layer shapes (reads config.json
    only)."""
    data = _read_config_json(path)
    return data is not None and data.get("model_type") in PRUNED_FAMILIES


def register_pruned_classes() -> None:
    """Make a pruned model in this process behave like one loaded through ``trust_remote_code``: HF's own
    ``save_pretrained`` (a Trainer's, ``push_to_hub``) ships the modeling code with it, and peft's default LoRA
    targets know ``gaqprune_*`` (else ``LoraConfig()`` without ``target_modules`` fails on a pruned model)."""
    from gaqprune.models.remote_code.modeling_gaqprune_llama import register_lora_targets

    for pruned_type in PRUNED_FAMILIES:
        config_class, model_class = pruned_classes(pruned_type)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModelForCausalLM")
        register_lora_targets(pruned_type)  # as the shipped remote code does when it builds a model


def load_pruned_config(path: str | os.PathLike) -> GaqpruneLlamaConfig:
    """The ``Gaqprune*Config`` of a pruned checkpoint, built with gaqprune's copy of the class (no remote code)."""
    if not is_pruned_checkpoint(path):
        raise GaqpruneError(
            f"{str(path)!r} is not a pruned gaqprune checkpoint (its config.json model_type is not one of "
            f"{', '.join(PRUNED_FAMILIES)})"
        )
    config_class, _ = pruned_classes(_read_config_json(path)["model_type"])
    try:
        return config_class.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise GaqpruneError(f"{str(path)!r}: config.json could not be read: {str(err).splitlines()[0]}") from None


def _shape_mismatches(path: Path, config, model_class) -> list[str]:
    """The saved tensors whose shapes differ from the ones ``config`` builds (read from the safetensors headers and a
    model on the meta device: nothing is loaded), as ``name: [saved] saved, [expected] expected``."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        with torch.device("meta"):
            expected = {name: list(t.shape) for name, t in model_class(config).state_dict().items()}
        differ = []
        for file in files:
            with safe_open(path / file, framework="pt") as f:
                for name in f.keys():
                    saved = list(f.get_slice(name).get_shape())
                    if name in expected and saved != expected[name]:
                        differ.append(f"{name}: {saved} saved, {expected[name]} expected")
        return differ
    except Exception:  # only an error message's detail: the load's own error is reported instead
        return []


def load_pruned(path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a pruned checkpoint with gaqprune's own model class (a ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
    ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` subclass), in eval mode.

    ``dtype=None`` keeps the saved dtype. Every weight must match the recorded per-layer shapes:
    a missing, unexpected or mis-sized tensor is an error, not a silently re-initialised weight.
    """
    from gaqprune.models.names import resolve_dtype

    config = load_pruned_config(path)
    _, model_class = pruned_classes(config.model_type)
    torch_dtype = "auto" if dtype is None else resolve_dtype(dtype)
    from safetensors import SafetensorError

    try:
        model, info = model_class.from_pretrained(str(path), config=config, dtype=torch_dtype, output_loading_info=True)
    except SafetensorError as err:
        raise GaqpruneError(f"{str(path)!r}: its weights are truncated or corrupted ({str(err).splitlines()[0]}); "
                            "save the model again") from None
    except (OSError, RuntimeError, ValueError) as err:  # e.g. a weight whose size disagrees with per_layer_config
        differ = _shape_mismatches(Path(path), config, model_class)
        if differ:  # transformers says only "look at the above report", which its logging level may hide
            raise GaqpruneError(f"{str(path)!r}: {len(differ)} weights do not have the shapes config.json's "
                                f"per_layer_config gives (was one of them edited?), e.g. {differ[0]}") from None
        raise GaqpruneError(f"{str(path)!r} could not be loaded: {str(err).splitlines()[0]}") from None
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise GaqpruneError(f"{str(path)!r}: weights do not match config.json: {problems}")
    register_pruned_classes()
    if device is not None:
        model.to(device)
    return model.eval()


__all__ = ["build_config", "is_pruned_checkpoint", "load_pruned", "load_pruned_config", "save_pretrained_model"]
