"""Python API: the CLI's pruning pipeline on a model you already hold (a notebook, your own training script).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gaqprune

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Meta-Llama-3-8B-Instruct", dtype="bfloat16").cuda()
    tokenizer = AutoTokenizer.from_pretrained("meta-llama/Meta-Llama-3-8B-Instruct")
    plan = gaqprune.prune(model, tokenizer, data="wikitext2", pruning_ratio=0.25, importance_samples=50)
    print(gaqprune.perplexity(model, tokenizer, data="wikitext2"))
    gaqprune.save_pretrained(model, tokenizer, "llama3-p25")   # loads with from_pretrained(..., trust_remote_code=True)

Same stages, defaults and checks as `gaqprune prune`: with the same settings, data and seed, the plan and the
pruned weights are those the CLI writes. Keyword arguments are the CLI's flags without the dashes; a bad value is a
``GaqpruneError`` that names the flag, raised before the model is touched.
"""

from __future__ import annotations

import numbers
import os
import types
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np

from gaqprune.errors import GaqpruneError
from gaqprune.models.names import EMBEDDED
from gaqprune.settings import ImportanceSettings, PruneSettings, check_context, check_seed

_SETTINGS = (ImportanceSettings, PruneSettings)


def _datamodule(tokenizer, data: str | os.PathLike, **kw):
    from gaqprune.data.datamodule import LMDataModule

    named = isinstance(tokenizer, (str, os.PathLike))
    datamodule = LMDataModule(source=str(data), tokenizer=str(tokenizer) if named else EMBEDDED, **kw)
    if not named:
        datamodule._tokenizer = tokenizer  # an in-memory tokenizer (the name is never loaded)
    return datamodule


def _options(hint) -> tuple:
    """The alternatives of a settings field's type: ``int | None`` -> (int, NoneType); anything else -> (hint,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _accepts(value, hint) -> bool:
    for option in _options(hint):
        if option is type(None) and value is None:
            return True
        if typing.get_origin(option) is typing.Literal and isinstance(value, str) and value in typing.get_args(option):
            return True
        if option is bool and isinstance(value, (bool, np.bool_)):  # numpy's too
            return True
        if option is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return True  # numpy integers too
        if option is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return True
        if option is str and isinstance(value, (str, os.PathLike)):
            return True
    return False


def _describe(hint) -> str:
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    described = [", ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is typing.Literal else names[o]
                 for o in _options(hint)]
    return " or ".join(described)


def _plain(value):
    """A setting as the CLI would hold it: numpy numbers as Python ones, paths as strings."""
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _settings(options: dict) -> tuple[ImportanceSettings, PruneSettings]:
    """The settings dataclasses from keyword arguments, each value checked against its flag's type."""
    hints = {name: hint for cls in _SETTINGS for name, hint in typing.get_type_hints(cls).items()}
    unknown = sorted(set(options) - set(hints))
    if unknown:
        raise TypeError(f"gaqprune.prune() got unknown settings {unknown}; accepted: {sorted(hints)}")
    for name, value in options.items():
        if not _accepts(value, hints[name]):
            raise GaqpruneError(f"--{name} {value!r} is invalid; give {_describe(hints[name])}")
    options = {k: _plain(v) for k, v in options.items()}
    return tuple(cls(**{k: v for k, v in options.items() if k in {f.name for f in fields(cls)}}) for cls in _SETTINGS)


def _check_args(function: str, **values: tuple) -> None:
    """``name=(value, type hint)``: a value of the wrong type is a ``GaqpruneError`` naming the argument (not a
    ``TypeError`` from deep inside, or a silently wrong result)."""
    for name, (value, hint) in values.items():
        if not _accepts(value, hint):
            raise GaqpruneError(f"{function}({name}={value!r}) is invalid; give {_describe(hint)}")


def _check_tokenizer(function: str, model, tokenizer) -> None:
    """A tokenizer (or a model name/path to load one from) that fits the model's vocabulary."""
    if tokenizer is None:
        raise GaqpruneError(f"{function}(tokenizer=None) is invalid; give the model's tokenizer, or the name or path of "
                            "a model whose tokenizer to load")
    if isinstance(tokenizer, (str, os.PathLike)):
        return  # loaded (and so checked) by name
    if not (callable(getattr(tokenizer, "get_vocab", None)) and hasattr(tokenizer, "__len__")):
        raise GaqpruneError(f"{function}(tokenizer=...) got a {type(tokenizer).__name__}; give a transformers "
                            "tokenizer, or the name or path of a model whose tokenizer to load")
    if len(tokenizer) > model.config.vocab_size:
        raise GaqpruneError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of "
                            f"{model.config.vocab_size}: it is not this model's tokenizer")


def _check_is_model(function: str, model) -> None:
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise GaqpruneError(f"{function}(model=...) got a {type(model).__name__}; give a transformers causal LM "
                            "(AutoModelForCausalLM.from_pretrained(...) or gaqprune.load_pruned(...))")


def _check_model(model, tokenizer) -> None:
    import torch

    from gaqprune.models.load import check_architecture

    _check_is_model("gaqprune.prune", model)
    if hasattr(model, "get_base_model") or any("lora_" in name for name, _ in model.named_parameters()):
        raise GaqpruneError("the model has LoRA adapters (peft); merge them (merge_and_unload) or prune the model "
                            "without them: pruning would cut the adapters' weights with no way to keep them consistent")
    if torch.is_inference_mode_enabled():
        raise GaqpruneError("gaqprune.prune() needs gradients (one Taylor backward pass); call it outside "
                            "torch.inference_mode()")
    check_architecture(model.config, getattr(model.config, "_name_or_path", None) or type(model).__name__)
    _check_tokenizer("gaqprune.prune", model, tokenizer)


def prune(model, tokenizer, *, data: str | os.PathLike = EMBEDDED, seed: int = 42, progress: bool = True,
          **settings) -> dict:
    """Prune ``model`` in place and return the plan (what the CLI writes as ``pruning_plan.json``).

    The work runs in eval mode (no dropout) where the weights are, in their dtype; the model's train/eval mode is
    restored afterwards. A pruned Llama becomes what ``gaqprune.load_pruned`` returns (its config lists the
    per-layer shapes), so transformers' own ``save_pretrained``, a ``Trainer``'s checkpoints and ``push_to_hub``
    write a checkpoint that ``from_pretrained(..., trust_remote_code=True)`` loads.

    Args:
        model: a transformers Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3 ForCausalLM, a gaqprune checkpoint)
            without LoRA adapters.
        tokenizer: its tokenizer, or the name or path of a model whose tokenizer to load.
        data: calibration text, as ``--data.source``: embedded, wikitext2, ptb, c4, a hub dataset id, a .txt/.jsonl
            file.
        seed: seed of the calibration windows (``--seed``).
        progress: show progress bars.
        **settings: any flag of the layer-importance and pruning stages, e.g. ``pruning_ratio=0.3,
            importance_samples=128, num_examples=32, pruning_strategy="inverse", alpha=1.0, layer_start=3,
            skip_importance_analysis=True, importance_config="prune_log/run/layer_importance_config.json"``.
    """
    from gaqprune.run import stages

    _check_args("gaqprune.prune", seed=(seed, int), progress=(progress, bool), data=(data, str))
    imp, prune_settings = _settings(settings)
    seed = _plain(seed)
    check_seed(seed)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: prune the module it runs (it recompiles)
    _check_model(model, tokenizer)
    context = getattr(model.config, "max_position_embeddings", None)
    imp.check(context)
    start, end = prune_settings.check(model.config.num_hidden_layers, getattr(model.config, "intermediate_size", None),
                                      context)
    datamodule = _datamodule(tokenizer, data)
    stages.check_calibration_budget(datamodule, imp, prune_settings, seed)  # a short text fails before any work
    device = next(model.parameters()).device
    meta = stages.importance_meta(model, imp, start, end, getattr(model.config, "_name_or_path", "") or "in-memory",
                                  datamodule.source, seed)
    was_training = model.training
    model.eval()
    try:
        _, plan = stages.prune_model(model, datamodule, imp, prune_settings, seed, meta, device, progress)
    finally:
        model.train(was_training)
    _adopt_pruned_class(model)
    return plan


def _adopt_pruned_class(model) -> None:
    """Turn an in-memory pruned ``LlamaForCausalLM`` (``MistralForCausalLM``, ``Qwen2ForCausalLM``,
    ``Qwen3ForCausalLM``) into the ``Gaqprune*ForCausalLM`` a saved one loads as: its config records the per-layer
    shapes, and the class ships its code, so any ``save_pretrained`` writes a loadable checkpoint. (The subclass only
    builds layers from the config; the modules are already the right shapes.)"""
    from gaqprune.models.pruned import PRUNED_FAMILIES, build_config, pruned_classes, register_pruned_classes

    old = model.config
    stock = {family[3]: pruned_type for pruned_type, family in PRUNED_FAMILIES.items()}
    pruned_type = stock.get(type(model).__name__)
    if pruned_type is None or type(model).__module__.split(".")[0] != "transformers":
        # a gaqprune checkpoint keeps its config in step (sync_layer_config); subclasses are someone's own:
        # gaqprune.save_pretrained handles all of them
        return
    config = build_config(model)
    if config.model_type != pruned_type:
        return  # nothing changed shape
    config._attn_implementation = old._attn_implementation
    config.use_cache = old.use_cache
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = pruned_classes(pruned_type)[1]
    register_pruned_classes()


def perplexity(model, tokenizer, *, data: str | os.PathLike = EMBEDDED, seq_len: int = 128,
               max_windows: int | None = None, batch_size: int = 8, progress: bool = True) -> float:
    """Perplexity on ``data``'s evaluation split, by the protocol of `gaqprune validate` (``--data.max_seq_len`` =
    ``seq_len``, ``--data.max_eval_windows`` = ``max_windows``, ``--data.eval_batch_size`` = ``batch_size``). A peft
    model is measured with its adapters."""
    from gaqprune.core.metrics import perplexity as measure
    from gaqprune.data.datamodule import LMDataModule

    _check_args("gaqprune.perplexity", data=(data, str), seq_len=(seq_len, int), max_windows=(max_windows, int | None),
                batch_size=(batch_size, int), progress=(progress, bool))
    _check_is_model("gaqprune.perplexity", model)
    _check_tokenizer("gaqprune.perplexity", model, tokenizer)
    seq_len, max_windows, batch_size = (_plain(v) for v in (seq_len, max_windows, batch_size))
    LMDataModule.check_args({"source": str(data), "eval_source": None, "max_seq_len": seq_len,
                            "max_eval_windows": max_windows, "eval_batch_size": batch_size, "batch_size": 1,
                            "num_workers": 0, "instruction_data": None, "eval_fraction": 0.1}, False)
    if hasattr(model, "get_base_model"):  # a PeftModel: its base model runs with the adapters injected
        model = model.get_base_model()
    check_context("--data.max_seq_len", seq_len, getattr(model.config, "max_position_embeddings", None))
    windows = _datamodule(tokenizer, data, max_seq_len=seq_len, max_eval_windows=max_windows).eval_windows()
    device = next(model.parameters()).device
    return measure(model, windows.to(device), batch_size, progress="perplexity" if progress else None)


def save_pretrained(model, tokenizer, out_dir: str | os.PathLike, overwrite: bool = False,
                    base_model: str | None = None) -> Path:
    """Save a (pruned) model as the CLI's ``model/`` folder: safetensors, tokenizer and a config with per-layer shapes
    that ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` and ``gaqprune.load_pruned`` load.
    ``base_model`` names the dense model it came from (default: the one it was loaded from)."""
    from gaqprune.models.pruned import save_pretrained_model

    _check_args("gaqprune.save_pretrained", out_dir=(out_dir, str), overwrite=(overwrite, bool),
                base_model=(base_model, str | None))
    _check_is_model("gaqprune.save_pretrained", model)
    _check_tokenizer("gaqprune.save_pretrained", model, tokenizer)  # a saved model without one cannot be evaluated
    if isinstance(tokenizer, (str, os.PathLike)):
        from gaqprune.models.load import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    try:
        return save_pretrained_model(model, tokenizer, out_dir, overwrite=overwrite, base_model=base_model)
    except GaqpruneError as err:
        raise GaqpruneError(str(err).replace("pass --overwrite true", "pass overwrite=True")) from None


__all__ = ["GaqpruneError", "perplexity", "prune", "save_pretrained"]
