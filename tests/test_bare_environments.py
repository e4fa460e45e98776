"""Saved artefacts where their users use them: a fresh interpreter that has only what such a user installs.

A checkpoint folder is loaded where only torch, transformers, accelerate, gguf and safetensors exist (no gaqprune, no
peft: most serving and evaluation set-ups), through the remote code it ships; with peft added, ``LoraConfig()`` finds
its default targets and the saved LoRA adapter loads onto the saved pruned model. A GGUF file is run where only
llama-cpp-python exists. ``helpers.run_bare`` hides every other installed distribution.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace

import pytest
import torch
from helpers import check_bare, load_bare, random_ids, run_bare, tiny_family

from gaqprune.core import surgery
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.models import pruned as export
from gaqprune.settings import PruneSettings

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def pruned(kind: str, vocab_size: int = 256):
    """GQA groups and MLP channels removed in every layer by gaqprune's own plan (same-rate split, residual refit),
    then layer 2 removed whole: unequal layers, a shorter stack."""
    model = tiny_family(kind, vocab_size=vocab_size)
    settings = replace(PruneSettings(), pruning_ratio=0.3, layer_start=0, layer_end=4, unit_split="same_rate",
                       min_pruning_rate=0.1, allocation="fixed")
    plan = build_plan(model, {i: 1.0 + i for i in range(4)}, random_ids(4, 16, 1), settings, progress=False)
    apply_plan(model, plan, random_ids(8, 16, 2))
    surgery.remove_layers(model, [2])
    kv = [layer.self_attn.k_proj.out_features for layer in model.model.layers]
    mlp = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert len(kv) == 3 and min(kv) == 8 and max(mlp) < 128 and len(set(zip(kv, mlp))) > 1  # unequal, narrower layers
    return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_pruned_checkpoint_loads_without_gaqprune_or_peft(tmp_path, kind):
    model = pruned(kind)
    ids = random_ids(2, 12, 0)
    folder = export.save_pretrained_model(model, None, tmp_path / "model")
    out = load_bare(folder, ids, tmp_path)
    check_bare(out)
    assert out["class"] == export.PRUNED_FAMILIES[export.PRUNED_TYPE_OF[kind]][1]
    with torch.no_grad():
        assert torch.equal(out["logits"], model(ids).logits)


def _with_lora(model, seed: int = 0):
    """LoRA adapters injected as a fit attaches them, with non-zero weights (as after training)."""
    from peft import LoraConfig, inject_adapter_in_model

    from gaqprune.train.module import DEFAULT_LORA_TARGETS

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_LORA_TARGETS)), model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


class _Lit:
    """What ``export_finetuned`` reads of a LitCausalLM: the model and the LoRA hyperparameters."""

    def __init__(self, model, base_model: str):
        from types import SimpleNamespace

        self.model = model
        self.hparams = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                                       base_model=base_model)
        self.lora_attached = True


ADAPTER = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save({"logits": model(torch.load(sys.argv[3])).logits, "pip_list": PIP_LIST}, sys.argv[4])
"""


def test_finetuned_checkpoint_and_its_adapter_load_without_gaqprune(tmp_path):
    """A fine-tune's outputs: model_finetuned/ (merged) without gaqprune or peft; lora_adapter/ with peft added, on
    the pruned model the run saved, reproducing the merged model."""
    from gaqprune.run.rundir import RunDir
    from gaqprune.train.lora import export_finetuned

    model = pruned("llama")
    base = export.save_pretrained_model(model, None, tmp_path / "run" / "model")
    ids = random_ids(2, 12, 0)
    lit = _Lit(_with_lora(model), str(base))
    with torch.no_grad():
        adapted = model(ids).logits
    paths = export_finetuned(lit, None, RunDir.at(tmp_path / "run"), adapter_base=base, progress=False)
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    out = load_bare(paths["model"], ids, tmp_path)
    check_bare(out)
    assert torch.equal(out["logits"], merged)
    torch.save(ids, tmp_path / "ids.pt")
    run_bare(ADAPTER, base, paths["adapter"], tmp_path / "ids.pt", tmp_path / "adapter.pt", cwd=tmp_path,
             allow=("torch", "transformers", "safetensors", "peft"))
    out = torch.load(tmp_path / "adapter.pt")
    assert not any(entry.lower().startswith("gaqprune") for entry in out["pip_list"])
    torch.testing.assert_close(out["logits"], adapted, rtol=1e-5, atol=1e-5)


TARGETS = """
import sys
from peft import LoraConfig, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
peft_model = get_peft_model(model, LoraConfig(r=2))  # no target_modules: peft's defaults for the model type
found = sorted({name.split(".lora_A")[0].split(".")[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name})
print(json.dumps({"found": found, "stock": sorted(defaults[sys.argv[2]])}))
"""


@pytest.mark.parametrize("kind", FAMILIES)
def test_peft_finds_default_lora_targets_without_gaqprune(tmp_path, kind):
    folder = export.save_pretrained_model(pruned(kind), None, tmp_path / "model")
    result = run_bare(TARGETS, folder, kind, cwd=tmp_path, allow=("torch", "transformers", "safetensors", "peft"))
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["found"] == out["stock"] and out["found"]  # what LoraConfig() picks on the dense model


LLAMA_CPP = """
import sys, json
import numpy as np
import llama_cpp
ids = json.loads(sys.argv[2])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, logits_all=True, verbose=False, n_threads=1)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps(PIP_LIST))
"""


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_gguf_file_runs_where_only_llama_cpp_is_installed(tmp_path, embedded_tokenizer):
    import numpy as np

    from gaqprune.models.gguf import save_gguf

    model = pruned("llama", vocab_size=len(embedded_tokenizer))
    path = save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", out_type="f32", progress=False)
    ids = embedded_tokenizer("Structured pruning removes whole GQA groups and MLP channels.")["input_ids"]
    result = run_bare(LLAMA_CPP, path, json.dumps(ids), tmp_path / "scores.npy", cwd=tmp_path,
                      allow=("llama-cpp-python",))
    names = {entry.split("==")[0].lower() for entry in json.loads(result.stdout.strip().splitlines()[-1])}
    assert "llama_cpp_python" in names or "llama-cpp-python" in names
    assert not names & {"torch", "transformers", "gaqprune", "gguf"}, names
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "scores.npy")), expected, rtol=1e-3, atol=1e-3)


def test_shipped_remote_code_needs_only_torch_and_transformers():
    """What transformers' check_imports demands of every checkpoint: the packages imported outside ``try`` blocks."""
    from transformers.dynamic_module_utils import get_imports

    files = sorted(export.REMOTE_CODE_DIR.glob("*_gaqprune_llama.py"))
    assert [f.name for f in files] == [export.CONFIG_FILE, export.MODELING_FILE]
    imported = {name for f in files for name in get_imports(f)} - set(sys.stdlib_module_names)
    assert imported == {"torch", "transformers"}


FINGERPRINT = """
import json, sys
import gaqprune
from gaqprune.core.importance import model_fingerprint
from gaqprune.run.records import load_importance
model = gaqprune.load_model(sys.argv[1])
scores = load_importance(sys.argv[2], {"model_fingerprint": model_fingerprint(model), "num_layers": 4,
                                       "layer_start": 0, "layer_end": 4})
print(json.dumps({"fingerprint": model_fingerprint(model), "scores": scores}))
"""


def test_importance_record_is_reused_from_another_folder_and_process(tmp_path, tiny_model_dir):
    """The layer-importance record names the model by its weights (a fingerprint), not by where it lay or what the
    writing process was: a copy of the model folder elsewhere, read by another process, reuses it."""
    import shutil
    import subprocess

    from gaqprune.core.importance import model_fingerprint
    from gaqprune.models.load import load_model
    from gaqprune.run.records import importance_record, save_importance

    model = load_model(str(tiny_model_dir))
    meta = {"base_model": str(tiny_model_dir), "model_fingerprint": model_fingerprint(model), "num_layers": 4,
            "method": "removal", "samples": 2, "seq_len": 16, "data_source": str(tiny_model_dir / "x.txt"),
            "layer_start": 0, "layer_end": 4, "seed": 42}
    save_importance(tmp_path / "record.json", importance_record({i: 0.5 + i for i in range(4)}, meta))
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model")
    (tmp_path / "cwd").mkdir()
    out = subprocess.run([sys.executable, "-c", FINGERPRINT, str(copy), str(tmp_path / "record.json")],
                         cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"fingerprint": meta["model_fingerprint"], "scores": {str(i): 0.5 + i for i in range(4)}}
