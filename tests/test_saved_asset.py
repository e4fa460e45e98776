"""A checkpoint saved by gaqprune 0.1.0 before the package moved into layers (tests/assets/pruned_llama_v0.1.0: a tiny
random Llama pruned by gaqprune's own plan, layers of unequal shapes) still loads, with gaqprune's loader and with the
remote code it shipped, and gives the logits recorded when it was saved."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import run_bare
from safetensors.torch import load_file

import gaqprune

ASSET = Path(__file__).parent / "assets" / "pruned_llama_v0.1.0"
EXPECTED = load_file(str(ASSET.with_name(ASSET.name + ".expected.safetensors")))


def test_old_checkpoint_loads_with_gaqprune():
    model = gaqprune.load_pruned(ASSET)
    shapes = [(layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers]
    assert len(shapes) == 3 and len(set(shapes)) > 1
    with torch.no_grad():
        assert torch.equal(model(EXPECTED["input_ids"]).logits, EXPECTED["logits"])
    assert torch.equal(gaqprune.load_model(str(ASSET))(EXPECTED["input_ids"]).logits, EXPECTED["logits"])


LOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
expected = load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    assert torch.equal(model(expected["input_ids"]).logits, expected["logits"])
print(type(model).__name__)
"""


def test_old_checkpoint_loads_with_its_own_remote_code_in_a_bare_environment(tmp_path):
    out = run_bare(LOAD, ASSET, ASSET.with_name(ASSET.name + ".expected.safetensors"), cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "GaqpruneLlamaForCausalLM"
