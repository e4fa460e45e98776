"""Pruned checkpoints: save, then reload bit-exactly with gaqprune's loader and with stock transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HEAD_DIM, keep_rows, prune, settings, tied_tiny, tiny_llama, tiny_mistral, tokens
from torch import nn

from gaqprune.core.units import layer_shapes
from gaqprune.errors import GaqpruneError
from gaqprune.models import pruned as export
from gaqprune.models.remote_code.configuration_gaqprune_llama import GaqpruneLlamaConfig

PRUNED_SHAPES = [
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128},
    {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 128},
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 96},
]












@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True)


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# A fresh interpreter loads the checkpoint and writes logits + greedy tokens. In "stock" mode it first
# removes gaqprune's editable-install finder, so only transformers (and the folder's own code) can help.
CHILD = r"""
import importlib.util, sys
mode, ckpt, io, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "stock":
    sys.meta_path[:] = [f for f in sys.meta_path if "gaqprune" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "gaqprune" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("gaqprune") is None
    try:
        import gaqprune  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("gaqprune is importable")
import torch
torch.set_num_threads(threads)
if mode == "stock":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
else:
    import gaqprune
    model = gaqprune.load_pruned(ckpt)
ids = torch.load(io + "/ids.pt")
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True)
# HF's StaticCache (the cache torch.compile'd decoding uses) sizes each layer from its own first keys
static = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=True,
                        cache_implementation="static", disable_compile=True)
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
torch.save({"logits": logits, "generated": generated, "static": static, "module": type(model).__module__, "dtype": model.dtype,
            "tied": tied, "gaqprune_loaded": "gaqprune" in sys.modules}, f"{io}/{mode}.pt")
"""


def run_child(mode: str, ckpt: Path, io: Path) -> dict:
    env = {**os.environ, "HF_MODULES_CACHE": str(io / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, mode, str(ckpt), str(io), str(torch.get_num_threads())],
        cwd=io, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # every weight found a module of its size: no "MISMATCH ... Reinit" / missing-key load report
    assert "LOAD REPORT" not in result.stderr and "Reinit" not in result.stderr, result.stderr[-3000:]
    return torch.load(io / f"{mode}.pt")


def test_pruned_checkpoint_reloads_bit_exactly_in_fresh_processes(tmp_path):
    model = prune(tiny_llama())
    ids = tokens()
    ref_logits, ref_generated = logits_of(model, ids), greedy(model, ids)
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt", base_model="tiny-random-llama")
    torch.save(ids, tmp_path / "ids.pt")

    ours = run_child("gaqprune", ckpt, tmp_path)
    stock = run_child("stock", ckpt, tmp_path)

    assert ours["module"] == "gaqprune.models.remote_code.modeling_gaqprune_llama"
    assert stock["module"].startswith("transformers_modules.") and not stock["gaqprune_loaded"]
    for result in (ours, stock):
        assert result["logits"].shape == (2, 12, 256)
        assert torch.equal(result["logits"], ref_logits)
        assert torch.equal(result["generated"], ref_generated)
        assert torch.equal(result["static"], ref_generated)
    assert ref_generated.shape == (2, 20)


def test_config_json_records_per_layer_shapes(tmp_path):
    ckpt = export.save_pretrained_model(prune(tiny_llama()), None, tmp_path / "ckpt", base_model="tiny-random-llama")
    config = read_config(ckpt)
    assert config["model_type"] == "gaqprune_llama" == GaqpruneLlamaConfig.model_type == export.PRUNED_MODEL_TYPE
    assert config["architectures"] == ["GaqpruneLlamaForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gaqprune_llama.GaqpruneLlamaConfig",
        "AutoModelForCausalLM": "modeling_gaqprune_llama.GaqpruneLlamaForCausalLM",
    }
    # Global fields keep the original (valid Llama) values; the layers' own counts live in per_layer_config.
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (8, 2, 128)
    assert config["num_hidden_layers"] == 3
    assert config["per_layer_config"] == {str(i): shape for i, shape in enumerate(PRUNED_SHAPES)}
    assert config["gaqprune_version"] == "0.1.0" and config["gaqprune_base_model"] == "tiny-random-llama"
    assert config["dtype"] == "float32"
    for name in ("configuration_gaqprune_llama.py", "modeling_gaqprune_llama.py"):
        assert (ckpt / name).read_bytes() == (export.REMOTE_CODE_DIR / name).read_bytes()

    assert export.is_pruned_checkpoint(ckpt) and not export.is_pruned_checkpoint(tmp_path / "missing")
    loaded = export.load_pruned_config(ckpt)
    assert type(loaded) is GaqpruneLlamaConfig
    assert loaded.num_attention_heads == 8 and loaded.layer_shapes() == PRUNED_SHAPES
    assert [c.num_key_value_heads for c in loaded.per_layer_config] == [2, 1, 2]
    # transformers sizes per-layer KV caches from this view
    from transformers.configuration_utils import get_head_shapes

    assert get_head_shapes(loaded) == ([2, 1, 2], HEAD_DIM)


def test_per_layer_heads_need_not_divide_hidden_size():
    # 24 query heads at hidden 4096 is refused by LlamaConfig; head_dim is global, so it is a valid layer here.
    config = GaqpruneLlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 num_hidden_layers=2, intermediate_size=14336,
                                 per_layer_config={1: {"num_attention_heads": 24, "num_key_value_heads": 6}})
    again = GaqpruneLlamaConfig.from_dict(json.loads(config.to_json_string()))
    assert again.layer_shapes()[1] == {"num_attention_heads": 24, "num_key_value_heads": 6, "intermediate_size": 14336}
    assert again.num_attention_heads == 32
    with pytest.raises(ValueError, match="multiple of KV heads"):
        GaqpruneLlamaConfig(num_hidden_layers=2, per_layer_config={1: {"num_attention_heads": 5, "num_key_value_heads": 2}})
    with pytest.raises(ValueError, match="outside"):
        GaqpruneLlamaConfig(num_hidden_layers=2, per_layer_config={2: {"intermediate_size": 5}})


def test_gaqprune_loaders_restore_shapes_and_logits(tmp_path):
    from gaqprune.models.load import load_model

    model = prune(tiny_llama())
    ids = tokens()
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt")
    for loaded in (export.load_pruned(ckpt), load_model(str(ckpt))):
        assert isinstance(loaded, type(model)) and not loaded.training
        assert layer_shapes(loaded) == PRUNED_SHAPES == layer_shapes(model)
        assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    loaded = load_model(str(ckpt), dtype="bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.config.use_cache is False
    # A loaded pruned model saves again with the same layout, its origin and the KV cache setting restored.
    again = export.save_pretrained_model(loaded, None, tmp_path / "again", base_model="tiny-random-llama")
    resaved = export.save_pretrained_model(export.load_pruned(again), None, tmp_path / "resaved")
    config = read_config(resaved)
    assert config["per_layer_config"] == read_config(ckpt)["per_layer_config"]
    assert config["gaqprune_base_model"] == "tiny-random-llama" and config["use_cache"] is True
    assert config["dtype"] == "bfloat16"


def test_weights_that_disagree_with_config_are_an_error(tmp_path):
    ckpt = export.save_pretrained_model(prune(tiny_llama()), None, tmp_path / "ckpt")
    config = read_config(ckpt)
    saved = config["per_layer_config"]["2"]["intermediate_size"]
    config["per_layer_config"]["2"]["intermediate_size"] = 112
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(GaqpruneError) as info:  # names a tensor and both shapes (was: "look at the above report")
        export.load_pruned(ckpt)
    assert "3 weights do not have the shapes config.json's per_layer_config gives" in str(info.value)
    assert f"model.layers.2.mlp.down_proj.weight: [64, {saved}] saved, [64, 112] expected" in str(info.value)
    # a truncated weights file: one line, not safetensors' traceback
    from gaqprune.models.load import load_model

    config["per_layer_config"]["2"]["intermediate_size"] = saved
    (ckpt / "config.json").write_text(json.dumps(config))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in (export.load_pruned, load_model):
        with pytest.raises(GaqpruneError, match="its weights are truncated or corrupted"):
            load(str(ckpt))
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "plain")
    weights = tmp_path / "plain" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GaqpruneError, match="its weights are truncated or corrupted"):
        load_model(str(tmp_path / "plain"))
    with pytest.raises(GaqpruneError, match="not a pruned gaqprune checkpoint"):
        export.load_pruned(export.save_pretrained_model(tiny_llama(), None, tmp_path / "dense"))


def test_weight_files_shrink_with_parameters(tmp_path):
    dense, pruned = tiny_llama(), prune(tiny_llama())
    dense_dir = export.save_pretrained_model(dense, None, tmp_path / "dense")
    pruned_dir = export.save_pretrained_model(pruned, None, tmp_path / "pruned")
    param_ratio = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in dense.parameters())
    byte_ratio = weight_bytes(pruned_dir) / weight_bytes(dense_dir)
    assert param_ratio < 0.85
    assert abs(byte_ratio - param_ratio) / param_ratio < 0.01


def test_dense_model_saves_as_plain_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = tiny_llama()
    del model.model.layers[3]  # depth pruning alone keeps every layer at the global shape
    model.config.num_hidden_layers = 3
    ids = tokens()
    ckpt = export.save_pretrained_model(model, None, tmp_path / "dense")
    config = read_config(ckpt)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and "per_layer_config" not in config
    assert not list(ckpt.glob("*.py")) and not export.is_pruned_checkpoint(ckpt)
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)  # no trust_remote_code
    assert type(reloaded) is LlamaForCausalLM and len(reloaded.model.layers) == 3
    assert torch.equal(logits_of(reloaded, ids), logits_of(model, ids))


def test_saved_generation_config_decodes_with_a_cache(tmp_path):
    # A model whose generation config had the cache off (a checkpoint saved from a training setup, as gaqprune's
    # loader leaves the config) must still save as a model that generates with a KV cache, like its config.json.
    from transformers import GenerationConfig

    model = prune(tiny_llama())
    model.config.use_cache = False
    model.generation_config = GenerationConfig(use_cache=False, bos_token_id=1, eos_token_id=2)
    ckpt = export.save_pretrained_model(model, None, tmp_path / "pruned")
    saved = json.loads((ckpt / "generation_config.json").read_text())
    assert saved["use_cache"] is True and saved["eos_token_id"] == 2
    assert read_config(ckpt)["use_cache"] is True


def test_bf16_and_tied_embeddings_are_preserved(tmp_path):
    from safetensors import safe_open

    model = prune(tied_tiny())
    # Cast parameters only: a bf16 from_pretrained keeps the rotary inv_freq buffer in fp32, Module.to would not.
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    ids = tokens()
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt")
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert read_config(ckpt)["dtype"] == "bfloat16" and read_config(ckpt)["tie_word_embeddings"] is True
    loaded = export.load_pruned(ckpt)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    torch.save(ids, tmp_path / "ids.pt")
    stock = run_child("stock", ckpt, tmp_path)  # a subprocess keeps the remote code out of ~/.cache/huggingface
    assert stock["dtype"] == torch.bfloat16 and stock["tied"]
    assert torch.equal(stock["logits"], logits_of(model, ids)) and torch.equal(stock["generated"], greedy(model, ids))


def test_sharded_save_reloads_bit_exactly(tmp_path):
    model = prune(tiny_llama())
    ids = tokens()
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert len(index["weight_map"]) == len(model.state_dict())
    assert torch.equal(logits_of(export.load_pruned(ckpt), ids), logits_of(model, ids))


def test_existing_folder_is_refused_without_overwrite(tmp_path):
    model = prune(tiny_llama())
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt")
    before = (ckpt / "model.safetensors").read_bytes()
    with pytest.raises(GaqpruneError, match="already exists"):
        export.save_pretrained_model(tiny_llama(seed=1), None, ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == before
    export.save_pretrained_model(tiny_llama(seed=1), None, ckpt, overwrite=True)
    assert read_config(ckpt)["model_type"] == "llama"


def test_interrupted_save_leaves_no_folder(tmp_path, monkeypatch, embedded_tokenizer):
    def explode(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the weights were written

    monkeypatch.setattr(type(embedded_tokenizer), "save_pretrained", explode)
    model = prune(tiny_llama(vocab_size=len(embedded_tokenizer)))
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained_model(model, embedded_tokenizer, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    # An interrupted overwrite keeps the previous complete folder.
    monkeypatch.undo()
    ckpt = export.save_pretrained_model(model, embedded_tokenizer, tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())
    monkeypatch.setattr(type(embedded_tokenizer), "save_pretrained", explode)
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained_model(tiny_llama(seed=1, vocab_size=len(embedded_tokenizer)), embedded_tokenizer, ckpt,
                                     overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in ckpt.iterdir()) == before and read_config(ckpt)["model_type"] == "gaqprune_llama"


def test_tokenizer_reloads_with_auto_tokenizer(tmp_path, embedded_tokenizer):
    from transformers import AutoTokenizer

    model = prune(tiny_llama(vocab_size=len(embedded_tokenizer)))
    ckpt = export.save_pretrained_model(model, embedded_tokenizer, tmp_path / "ckpt")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)  # no trust_remote_code needed for the tokenizer
    text = "Pruned checkpoints load anywhere: 24 heads, 96 channels."
    assert tokenizer(text)["input_ids"] == embedded_tokenizer(text)["input_ids"]
    assert len(tokenizer) == len(embedded_tokenizer) == 49152


def test_load_tokenizer_of_pruned_checkpoint_never_prompts(tmp_path, monkeypatch, embedded_tokenizer):
    """A user at a terminal must not meet transformers' "run the custom code? [y/N]" prompt."""
    from gaqprune.models.load import load_tokenizer

    prompts = []
    model = prune(tiny_llama(vocab_size=len(embedded_tokenizer)))
    ckpt = export.save_pretrained_model(model, embedded_tokenizer, tmp_path / "ckpt")
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    tokenizer = load_tokenizer(str(ckpt))
    assert prompts == []
    assert tokenizer("GQA groups")["input_ids"] == embedded_tokenizer("GQA groups")["input_ids"]




MISTRAL_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    torch.save({"logits": model(torch.load(sys.argv[2])).logits, "class": type(model).__name__,
                "window": model.config.sliding_window}, sys.argv[3])
"""


@pytest.mark.parametrize("window", [None, 8])
def test_pruned_mistral_saves_as_gaqprune_mistral(tmp_path, window):
    # Its sliding window is kept (8 tokens here, so 12-token sequences depend on it): Mistral-7B v0.1 included.
    model = prune(tiny_mistral(sliding_window=window))
    ids = tokens()
    ckpt = export.save_pretrained_model(model, None, tmp_path / "ckpt")
    config = read_config(ckpt)
    assert config["model_type"] == "gaqprune_mistral" and config["sliding_window"] == window
    assert config["architectures"] == ["GaqpruneMistralForCausalLM"]
    loaded = export.load_pruned(ckpt)
    assert layer_shapes(loaded) == PRUNED_SHAPES and loaded.config.sliding_window == window
    assert torch.equal(logits_of(loaded, ids), logits_of(model, ids))
    torch.save(ids, tmp_path / "ids.pt")  # stock transformers in a fresh process, through the shipped remote code
    subprocess.run([sys.executable, "-c", MISTRAL_RELOAD, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "GaqpruneMistralForCausalLM" and out["window"] == window
    assert torch.equal(out["logits"], logits_of(model, ids))
    if window is not None:  # the window matters at this length: without it the logits differ
        model.config.sliding_window = None
        assert not torch.allclose(logits_of(model, ids), out["logits"])
    dense_dir = export.save_pretrained_model(tiny_mistral(sliding_window=window), None, tmp_path / "dense")
    assert read_config(dense_dir)["model_type"] == "mistral" and read_config(dense_dir)["architectures"] == [
        "MistralForCausalLM"]


PEFT_CHILD = """
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
peft_model = get_peft_model(model, LoraConfig(r=2))  # no target_modules: peft's defaults for the model type
print(sorted({name.split(".lora_A")[0].split(".")[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name}))
"""


def test_stock_peft_finds_default_lora_targets_on_a_pruned_checkpoint(tmp_path):
    # A user with transformers + peft only (no gaqprune import): LoraConfig() must work as on the dense model.
    from gaqprune.models.remote_code.modeling_gaqprune_llama import STOCK_MODEL_TYPES

    assert STOCK_MODEL_TYPES == {kind: family[4][0] for kind, family in export.PRUNED_FAMILIES.items()}
    ckpt = export.save_pretrained_model(prune(tiny_llama()), None, tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-c", PEFT_CHILD, str(ckpt)], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "['q_proj', 'v_proj']"


def test_inconsistent_or_unmerged_models_are_refused(tmp_path):
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    attn.q_proj = keep_rows(attn.q_proj, torch.arange(4 * HEAD_DIM))  # o_proj left full width
    with pytest.raises(GaqpruneError, match="layer 0 has inconsistent shapes"):
        export.save_pretrained_model(model, None, tmp_path / "bad")
    biased = tiny_llama()
    down = biased.model.layers[2].mlp.down_proj
    biased.model.layers[2].mlp.down_proj = nn.Linear(down.in_features, down.out_features, bias=True)
    with pytest.raises(GaqpruneError, match=r"layer 2: down_proj bias presence disagrees with config.mlp_bias=False"):
        export.save_pretrained_model(biased, None, tmp_path / "biased")
    lora = tiny_llama()
    lora.model.layers[0].self_attn.q_proj.register_parameter("lora_A", nn.Parameter(torch.zeros(4, 64)))
    with pytest.raises(GaqpruneError, match="LoRA"):
        export.save_pretrained_model(lora, None, tmp_path / "lora")
    assert list(tmp_path.iterdir()) == []


def test_repruned_checkpoint_config_follows_its_layers(tmp_path):
    # A loaded pruned checkpoint pruned again: its per-layer config must describe the new layers (a static cache
    # sized from the config, HF's save_pretrained), not the ones it was loaded with.

    from gaqprune.core.plan import apply_plan, build_plan

    ckpt = export.save_pretrained_model(prune(tiny_llama()), None, tmp_path / "ckpt")
    model = export.load_pruned(ckpt)
    windows = tokens(4, 16)
    plan = build_plan(model, {0: 3.0, 1: 1.0, 2: 2.0}, windows, settings(layer_end=3, unit_split="same_rate",
                      pruning_ratio=0.4), progress=False)
    plan["removed_layers"], plan["layers"][0]["removed_whole"] = [0], True
    apply_plan(model, plan, windows)
    shapes = layer_shapes(model)
    assert len(shapes) == 2 and shapes != PRUNED_SHAPES[1:]
    assert model.config.layer_shapes() == shapes and model.config.num_hidden_layers == 2
    ids = tokens(2, 10)
    static = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            cache_implementation="static", prefill_chunk_size=4, disable_compile=True, pad_token_id=2)
    assert static.shape == (2, 18) and torch.equal(static, greedy(model, ids))
    # HF's own save_pretrained ships the modeling code, and stock transformers reloads the re-pruned model exactly
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "hf_saved")
    saved = {p.name for p in (tmp_path / "hf_saved").iterdir()}
    assert {"configuration_gaqprune_llama.py", "modeling_gaqprune_llama.py"} <= saved
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_saved", trust_remote_code=True)
    assert layer_shapes(stock) == shapes and torch.equal(logits_of(stock, ids), logits_of(model, ids))


def test_pruned_checkpoint_loads_by_hub_id(tmp_path):
    # A pruned model pushed to the hub: gaqprune's loaders take its id (here from an offline HF cache) as stock
    # transformers does, without remote code or a prompt.
    ckpt = export.save_pretrained_model(prune(tiny_llama()), None, tmp_path / "ckpt")
    snapshot = tmp_path / "hub" / "models--someone--pruned-tiny" / "snapshots" / ("a" * 40)
    import shutil

    shutil.copytree(ckpt, snapshot)
    (tmp_path / "hub" / "models--someone--pruned-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--pruned-tiny" / "refs" / "main").write_text("a" * 40)
    code = ("import torch\nfrom gaqprune.models.load import load_model\nfrom gaqprune.core.units import layer_shapes\n"
            "m = load_model('someone/pruned-tiny')\nprint(type(m.config).__name__, layer_shapes(m))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == f"GaqpruneLlamaConfig {PRUNED_SHAPES}"
