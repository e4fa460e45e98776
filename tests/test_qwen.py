"""Qwen2 and Qwen3: Llama-layout GQA models (Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms) pruned, saved,
reloaded with and without gaqprune, evaluated and fine-tuned like Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ARGS, corpus, pruned_qwen, random_ids, spread, tiny_mistral, tiny_qwen

import gaqprune
from gaqprune.cli.main import run
from gaqprune.errors import GaqpruneError
from gaqprune.models import load as models
from gaqprune.models import pruned as export

HEAD_DIM = 8








RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save({"logits": model(ids).logits, "class": type(model).__name__,
                "k_bias": [layer.self_attn.k_proj.bias is not None for layer in model.model.layers]}, sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_pruned_qwen_saves_and_reloads_bit_exactly(tmp_path, kind):
    model = pruned_qwen(kind)
    layers = model.model.layers
    kv = [layer.self_attn.k_proj.out_features // HEAD_DIM for layer in layers]
    assert len(layers) == 3 and min(kv) < 4 and kv == [layer.self_attn.v_proj.out_features // HEAD_DIM for layer in layers]
    if kind == "qwen2":  # the biases of the kept q/k/v rows go with them
        assert [layer.self_attn.k_proj.bias.shape[0] for layer in layers] == [k * HEAD_DIM for k in kv]
        assert all(layer.self_attn.o_proj.bias is None for layer in layers)
    else:  # per-head norms over head_dim, shared by every head: untouched
        assert all(layer.self_attn.q_norm.weight.shape == (HEAD_DIM,) for layer in layers)
    ckpt = export.save_pretrained_model(model, None, tmp_path / "model")
    config = json.loads((ckpt / "config.json").read_text())
    pruned_type = f"gaqprune_{kind}"
    assert config["model_type"] == pruned_type and config["num_hidden_layers"] == 3 and config["head_dim"] == HEAD_DIM
    assert config["architectures"] == [f"Gaqprune{kind.capitalize()}ForCausalLM"]
    assert config["auto_map"] == export.auto_map(pruned_type) and len(config["layer_types"]) == 3
    assert [shape["num_key_value_heads"] for shape in config["per_layer_config"].values()] == kv
    assert export.is_pruned_checkpoint(ckpt)

    ids = random_ids(2, 12, 7)
    with torch.no_grad():
        expected = model(ids).logits
        ours = gaqprune.load_pruned(ckpt)
        assert type(ours).__name__ == f"Gaqprune{kind.capitalize()}ForCausalLM"
        assert torch.equal(ours(ids).logits, expected)
    torch.save(ids, tmp_path / "ids.pt")  # stock transformers in a fresh process: the shipped remote code alone
    subprocess.run([sys.executable, "-c", RELOAD, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == f"Gaqprune{kind.capitalize()}ForCausalLM"
    assert out["k_bias"] == [kind == "qwen2"] * 3
    assert torch.equal(out["logits"], expected)


def test_qwen_biases_that_its_config_cannot_express_are_refused(tmp_path):
    model = tiny_qwen("qwen2")
    attn = model.model.layers[1].self_attn
    attn.o_proj = torch.nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=True)
    with pytest.raises(GaqpruneError, match=r"layer 1: o_proj bias presence disagrees with Qwen2's layout"):
        export.save_pretrained_model(model, None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_in_memory_pruned_model_becomes_the_saved_class(tmp_path, embedded_tokenizer, kind):
    from transformers import AutoModelForCausalLM

    text = corpus(tmp_path)
    if kind == "mistral":  # sliding window kept
        model = tiny_mistral(sliding_window=16)
        model.resize_token_embeddings(len(embedded_tokenizer))
    else:
        model = tiny_qwen(kind, vocab_size=len(embedded_tokenizer))
    gaqprune.prune(model, embedded_tokenizer, data=str(text), progress=False, importance_samples=4,
                   importance_seq_len=32, num_examples=4, max_seq_len=32, pruning_ratio=0.3, min_pruning_rate=0.1,
                   layer_start=0, layer_end=4, unit_split="same_rate")
    assert type(model).__name__ == f"Gaqprune{kind.capitalize()}ForCausalLM"
    assert model.config.model_type == f"gaqprune_{kind}"
    model.save_pretrained(tmp_path / "hf_saved")  # transformers' own save: ships the remote code
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_saved", trust_remote_code=True)
    ids = random_ids(2, 24, 3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_cli_prunes_validates_and_fits_a_qwen3(tmp_path, monkeypatch, embedded_tokenizer):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "tiny-qwen3"
    tiny_qwen("qwen3", vocab_size=len(embedded_tokenizer)).save_pretrained(base)
    embedded_tokenizer.save_pretrained(base)
    text = corpus(tmp_path)
    quiet = ["--trainer.enable_progress_bar", "false"]
    run(["prune", "--base_model", str(base), "--data.source", str(text), "--importance_samples", "4", *ARGS,
         "--save_model", "true", "--test_after_prune", "true", "--data.max_eval_windows", "4",
         "--save_ckpt_log_name", "q3", "--unit_split", "same_rate", *quiet])
    run_dir = tmp_path / "prune_log" / "q3"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["params"]["achieved_ratio_selected"] == pytest.approx(0.3, abs=0.03)
    assert json.loads((run_dir / "model" / "config.json").read_text())["model_type"] == "gaqprune_qwen3"

    cli = run(["validate", "--base_model", str(run_dir / "model"), "--data.source", str(text),
               "--data.max_seq_len", "32", "--data.max_eval_windows", "4", "--trainer.logger", "false", *quiet])
    assert cli.trainer.callback_metrics["val_ppl"].item() == pytest.approx(metrics["ppl_after"], rel=1e-5)

    run(["fit", "--base_model", str(run_dir / "model"), "--data.source", str(text), "--data.max_seq_len", "32",
         "--data.max_eval_windows", "4", "--trainer.max_steps", "2", "--finetune_samples", "16",
         "--data.batch_size", "4", "--trainer.logger", "false", "--save_ckpt_log_name", "q3fit", *quiet])
    fit_dir = tmp_path / "prune_log" / "q3fit"
    assert json.loads((fit_dir / "fit_metrics.json").read_text())["steps"] == 2
    tuned = gaqprune.load_pruned(fit_dir / "model_finetuned")  # LoRA merged: the pruned shapes, new weights
    pruned = gaqprune.load_pruned(run_dir / "model")
    assert [s for s in tuned.config.layer_shapes()] == pruned.config.layer_shapes()
    assert not torch.equal(tuned.model.layers[1].self_attn.q_proj.weight, pruned.model.layers[1].self_attn.q_proj.weight)


def test_gguf_export_refuses_qwen3(tmp_path, embedded_tokenizer):
    # Qwen2 is written (tests/test_gguf.py); Qwen3's per-head q/k norms have no place in llama.cpp's 'deci' layers
    from gaqprune.models.gguf import save_gguf

    with pytest.raises(GaqpruneError, match="cannot write a 'qwen3' model as GGUF: Qwen3's per-head q/k norms"):
        save_gguf(pruned_qwen("qwen3"), embedded_tokenizer, tmp_path / "qwen3.gguf")
    assert list(tmp_path.iterdir()) == []


def test_supported_model_types_agree_and_others_are_refused():
    from transformers import GemmaConfig

    assert set(models.SUPPORTED_MODEL_TYPES) == set(export.PRUNABLE_MODEL_TYPES)
    with pytest.raises(GaqpruneError, match="is a 'gemma' model; gaqprune prunes Llama-family models .*qwen2, qwen3"):
        models.check_architecture(GemmaConfig(), "google/gemma-2b")


def test_dense_qwen_saves_as_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = tiny_qwen("qwen2")
    ckpt = export.save_pretrained_model(model, None, tmp_path / "dense")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "auto_map" not in config and not list(Path(ckpt).glob("*.py"))
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(reloaded) is Qwen2ForCausalLM
    ids = random_ids(1, 8, 4)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_layers_mixing_full_and_sliding_attention_are_each_run_with_their_own_mask():
    # layer 0's mask was reused for every layer: the sliding layers of a Qwen2 with use_sliding_window and
    # max_window_layers below the layer count were calibrated as full attention (importance, Taylor, refit)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gaqprune.core.compensation import capture_layer_inputs, run_layer
    from gaqprune.core.importance import compute_layer_importance, removal_importance_naive
    from gaqprune.core.taylor import taylor_scores

    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2, tie_word_embeddings=False)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    torch.manual_seed(0)
    model = spread(Qwen2ForCausalLM(config), 0.05).eval()
    ids = random_ids(4, 32, 3)  # longer than the window
    # the layers run one by one reproduce the model's own forward
    stream = capture_layer_inputs(model, ids, 2)
    for layer in model.model.layers:
        stream = run_layer(layer, stream)
    with torch.no_grad():
        reference = model.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
        by_layer = model.model.norm(torch.cat([hidden for hidden, _ in stream]))
    torch.testing.assert_close(by_layer, reference, rtol=1e-5, atol=1e-5)
    cached = compute_layer_importance(model, ids, method="removal")
    naive = removal_importance_naive(model, ids)
    assert cached == pytest.approx(naive, rel=1e-4, abs=1e-3)
    streamed = taylor_scores(model, ids, [0, 1, 2, 3], batch_size=2, method="streamed")
    accumulated = taylor_scores(model, ids, [0, 1, 2, 3], batch_size=2, method="accumulated")  # the model's forward
    for layer in range(4):
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(streamed[layer][kind], accumulated[layer][kind], rtol=1e-4, atol=1e-9)
    # GGUF ('deci' layers have no window): refused for the sliding layers it names; a window no layer uses is no reason
    from gaqprune.models.gguf import _check_config

    with pytest.raises(GaqpruneError, match=r"layers \[2, 3\] use a sliding window \(8 tokens\)"):
        _check_config(config)
    _check_config(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=28))
