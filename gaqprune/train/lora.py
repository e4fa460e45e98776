"""After a LoRA fit: save the adapters on their own and export a merged model.

Adapters are injected in place (``peft.inject_adapter_in_model``) so ``LitCausalLM.model`` stays
a plain HF causal LM throughout; merging folds each adapter into its base Linear and puts the
base Linear back, exactly like peft's ``merge_and_unload``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gaqprune.run.rundir import RunDir

log = logging.getLogger(__name__)


def lora_modules(hf_model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in hf_model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]


PEFT_PREFIX = "base_model.model."


def save_lora_adapter(hf_model, out_dir: str | Path, lora_config: dict) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's file names) atomically."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from gaqprune.atomic import atomic_dir, write_json

    # LoRA was injected into the model itself (no PeftModel around it); peft's files name each weight as a
    # PeftModel does, under ``base_model.model.``, and PeftModel.from_pretrained finds nothing without that prefix.
    state = {f"{PEFT_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(hf_model).items()}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        save_file(state, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "adapter_config.json", lora_config)
    return Path(out_dir)


@torch.no_grad()
def merge_lora(hf_model) -> int:
    """Fold every LoRA adapter into its base weight and remove the adapter modules; returns how many."""
    modules = lora_modules(hf_model)
    for name, module in modules:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        setattr(parent, child, module.get_base_layer())
    if hasattr(hf_model, "peft_config"):
        del hf_model.peft_config
    return len(modules)


def export_finetuned(lit_model, tokenizer, run_dir: RunDir, gguf_type: str | None = None,
                     adapter_base: str | Path | None = None, pruned_here: bool = False,
                     progress: bool = True) -> dict[str, str]:
    """Save LoRA adapters (if any) and the merged model in the run folder (``lora_adapter/``, ``model_finetuned/``, and
    ``model_finetuned.gguf`` with ``gguf_type``); returns the paths written.

    ``adapter_config.json`` names the model the adapters fit, for peft's ``AutoPeftModelForCausalLM``:
    ``adapter_base`` (the pruned model this run saved), else ``--base_model``, unless the model was pruned in this
    run (``pruned_here``) and not saved: then none exists, and it names none (``null``).
    """
    from gaqprune.models.names import absolute_if_local, model_origin
    from gaqprune.models.pruned import save_pretrained_model

    paths = {}
    hf_model = lit_model.model
    hp = lit_model.hparams
    if lora_modules(hf_model):
        config = {
            "peft_type": "LORA", "r": hp.lora_r, "lora_alpha": hp.lora_alpha, "lora_dropout": hp.lora_dropout,
            "target_modules": sorted(set(hp.lora_target_modules or [])) or None, "bias": "none", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": (str(Path(adapter_base).resolve()) if adapter_base
                                        else None if pruned_here else absolute_if_local(hp.base_model)),
        }
        if config["target_modules"] is None:
            from gaqprune.train.module import DEFAULT_LORA_TARGETS

            config["target_modules"] = list(DEFAULT_LORA_TARGETS)
        paths["adapter"] = str(save_lora_adapter(hf_model, run_dir / RunDir.ADAPTER, config))
        if config["base_model_name_or_path"] is None:
            log.info(
                "note: lora_adapter/ fits the pruned model, which this run did not save (--save_model false): "
                "model_finetuned/ holds the merged result; rerun with --save_model true to keep the adapters' base")
        merge_lora(hf_model)
        lit_model.lora_attached = False
    was_training = hf_model.training
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    # origin: the dense model a loaded pruned checkpoint came from, else --base_model (never a cache path)
    origin = None if getattr(hf_model.config, "gaqprune_base_model", None) else model_origin(hp.base_model)
    paths["model"] = str(save_pretrained_model(hf_model, tokenizer, run_dir / RunDir.FINETUNED, overwrite=True,
                                               base_model=origin))
    if gguf_type:
        from gaqprune.models.gguf import save_gguf

        paths["gguf"] = str(save_gguf(hf_model, tokenizer, run_dir / RunDir.FINETUNED_GGUF, out_type=gguf_type,
                                      overwrite=True, progress=progress))
    hf_model.train(was_training)
    return paths
