"""A checkpoint saved by gaqprune 0.1.0 before the package moved into layers (tests/assets/pruned_llama_v0.1.0: a tiny
random Llama pruned by gaqprune's own plan, layers of unequal shapes) still loads, with gaqprune's loader and with the
remote code it shipped, and gives the logits recorded when it was saved: to float32 rounding (``ATOL``), since the CPU
that recorded them may have used other kernels (AVX-512 against AVX2 reorder the sums: 5.7e-7 seen on logits of
magnitude 1.5); a wrong or missing weight moves them by orders of magnitude more."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import run_bare
from safetensors.torch import load_file

import gaqprune

ASSET = Path(__file__).parent / "assets" / "pruned_llama_v0.1.0"
EXPECTED = load_file(str(ASSET.with_name(ASSET.name + ".expected.safetensors")))
ATOL = 1e-5


def test_old_checkpoint_loads_with_gaqprune():
    model = gaqprune.load_pruned(ASSET)
    shapes = [(layer.self_attn.k_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers]
    assert len(shapes) == 3 and len(set(shapes)) > 1
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["input_ids"]).logits, EXPECTED["logits"], rtol=0, atol=ATOL)
        torch.testing.assert_close(gaqprune.load_model(str(ASSET))(EXPECTED["input_ids"]).logits, EXPECTED["logits"],
                                   rtol=0, atol=ATOL)


LOAD = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
expected = load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=float(sys.argv[3]))
print(type(model).__name__)
"""


def test_old_checkpoint_loads_with_its_own_remote_code_in_a_bare_environment(tmp_path):
    out = run_bare(LOAD, ASSET, ASSET.with_name(ASSET.name + ".expected.safetensors"), ATOL, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "GaqpruneLlamaForCausalLM"
