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
``GaqpruneError`` that names the flag.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from gaqprune.errors import GaqpruneError
from gaqprune.models import EMBEDDED
from gaqprune.settings import ImportanceSettings, PruneSettings

_SETTINGS = (ImportanceSettings, PruneSettings)


def _datamodule(tokenizer, data: str, **kw):
    from gaqprune.data import LMDataModule

    datamodule = LMDataModule(source=data, tokenizer=tokenizer if isinstance(tokenizer, str) else EMBEDDED, **kw)
    if not isinstance(tokenizer, str):
        datamodule._tokenizer = tokenizer  # an in-memory tokenizer (the name is never loaded)
    return datamodule


def _settings(options: dict) -> tuple[ImportanceSettings, PruneSettings]:
    names = {f.name for cls in _SETTINGS for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"gaqprune.prune() got unknown settings {unknown}; accepted: {sorted(names)}")
    return tuple(cls(**{k: v for k, v in options.items() if k in {f.name for f in fields(cls)}}) for cls in _SETTINGS)


def prune(model, tokenizer, *, data: str = EMBEDDED, seed: int = 42, progress: bool = True, **settings) -> dict:
    """Prune ``model`` in place and return the plan (what the CLI writes as ``pruning_plan.json``).

    Args:
        model: a transformers Llama-family causal LM (LlamaForCausalLM, MistralForCausalLM, a gaqprune checkpoint),
            on any device, in any dtype; the work runs where its weights are.
        tokenizer: its tokenizer, or the name of a model whose tokenizer to load.
        data: calibration text, as ``--data.source``: embedded, wikitext2, ptb, c4, a hub dataset id, a .txt/.jsonl
            file.
        seed: seed of the calibration windows (``--seed``).
        progress: show progress bars.
        **settings: any flag of the layer-importance and pruning stages, e.g. ``pruning_ratio=0.3,
            importance_samples=128, num_examples=32, pruning_strategy="inverse", alpha=1.0, layer_start=3,
            skip_importance_analysis=True, importance_config="prune_log/run/layer_importance_config.json"``.
    """
    from gaqprune import pipeline
    from gaqprune.cli import validate_importance_settings
    from gaqprune.models import check_architecture
    from gaqprune.pruning import apply_plan, validate_prune_settings

    imp, prune_settings = _settings(settings)
    config = model.config
    check_architecture(config, getattr(config, "_name_or_path", None) or type(model).__name__)
    context = getattr(config, "max_position_embeddings", None)
    validate_importance_settings(imp, context)
    start, end = validate_prune_settings(prune_settings, config.num_hidden_layers, getattr(config, "intermediate_size", None))
    datamodule = _datamodule(tokenizer, data)
    pipeline.check_calibration_budget(datamodule, imp, prune_settings, seed)  # a short text fails before any work
    device = next(model.parameters()).device
    meta = pipeline.importance_meta(model, imp, start, end, getattr(config, "_name_or_path", "") or "in-memory",
                                    datamodule.source, seed)
    scores = pipeline.layer_importance_stage(model, datamodule, imp, start, end, None, meta, device, progress)
    taylor = pipeline.taylor_windows(datamodule, prune_settings, seed, device)
    refit = pipeline.compensation_windows(datamodule, prune_settings, seed, device, taylor)
    plan = pipeline.plan_stage(model, scores, taylor, prune_settings, progress)
    apply_plan(model, plan, refit, progress=progress)
    return plan


def perplexity(model, tokenizer, *, data: str = EMBEDDED, seq_len: int = 128, max_windows: int | None = None,
               batch_size: int = 8, progress: bool = True) -> float:
    """Perplexity on ``data``'s evaluation split, by the protocol of `gaqprune validate` (``--data.max_seq_len`` =
    ``seq_len``, ``--data.max_eval_windows`` = ``max_windows``, ``--data.eval_batch_size`` = ``batch_size``)."""
    from gaqprune.cli import validate_data_settings
    from gaqprune.metrics import perplexity as measure

    validate_data_settings({"source": data, "eval_source": None, "max_seq_len": seq_len, "max_eval_windows": max_windows,
                            "eval_batch_size": batch_size, "batch_size": 1, "num_workers": 0, "instruction_data": None},
                           False)
    windows = _datamodule(tokenizer, data, max_seq_len=seq_len, max_eval_windows=max_windows).eval_windows()
    device = next(model.parameters()).device
    return measure(model, windows.to(device), batch_size, progress="perplexity" if progress else None)


def save_pretrained(model, tokenizer, out_dir: str | Path, overwrite: bool = False, base_model: str | None = None) -> Path:
    """Save a (pruned) model as the CLI's ``model/`` folder: safetensors, tokenizer and a config with per-layer shapes
    that ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` and ``gaqprune.load_pruned`` load.
    ``base_model`` names the dense model it came from (default: the folder it was loaded from)."""
    from gaqprune.export import save_pretrained_model

    if isinstance(tokenizer, str):
        from gaqprune.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return save_pretrained_model(model, tokenizer, out_dir, overwrite=overwrite, base_model=base_model)


__all__ = ["GaqpruneError", "perplexity", "prune", "save_pretrained"]
