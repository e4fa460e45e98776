"""GGUF export for llama.cpp: metadata, weights, and a forward pass with llama.cpp's semantics that must
reproduce the HF logits; with llama-cpp-python installed, llama.cpp itself must reproduce them too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import (
    gguf_forward,
    keep_cols,
    keep_rows,
    prune,
    pruned_qwen,
    read,
    tied_tiny,
    tiny_llama,
    tiny_llama_config,
    tokens,
    weight,
)

from gaqprune.core.units import layer_shapes
from gaqprune.errors import GaqpruneError
from gaqprune.models import gguf as gguf_export
from gaqprune.models import pruned as export

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}














@torch.no_grad()
def hf_logits(model, ids):
    return model(ids).logits


def test_pruned_model_metadata_and_llama_cpp_semantics(tmp_path, embedded_tokenizer):
    model = prune(tiny_llama())
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", out_type="f32")
    fields, tensors = read(path)
    shapes = layer_shapes(model)
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [s["num_attention_heads"] for s in shapes] == [8, 4, 8]
    assert fields["deci.attention.head_count_kv"] == [s["num_key_value_heads"] for s in shapes] == [2, 1, 2]
    assert fields["deci.feed_forward_length"] == [s["intermediate_size"] for s in shapes] == [128, 128, 96]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 256  # the embedding's rows
    assert fields["tokenizer.ggml.eos_token_id"] == embedded_tokenizer.eos_token_id
    assert "tokenizer.ggml.merges" in fields and "tokenizer.chat_template" in fields
    assert [int(n) for n in tensors["blk.1.attn_q.weight"].shape] == [64, 32]  # GGUF order: (in, out)
    assert [int(n) for n in tensors["blk.2.ffn_down.weight"].shape] == [96, 64]
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    # Query/key rows were reordered for llama.cpp's rotary: the file's weights differ from HF's ...
    assert not torch.equal(weight(tensors, "blk.0.attn_q.weight"), model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(weight(tensors, "blk.0.attn_v.weight"), model.model.layers[0].self_attn.v_proj.weight)
    # ... and with llama.cpp's pairwise rotary they give HF's logits.
    ids = tokens()
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_pruned_qwen2_biases_are_written_rotated_with_their_rows(tmp_path, embedded_tokenizer):
    model = pruned_qwen("qwen2")
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "q.gguf", out_type="f32")
    fields, tensors = read(path)
    attn = model.model.layers[1].self_attn
    assert fields["deci.attention.head_count_kv"] == [s["num_key_value_heads"] for s in layer_shapes(model)]
    assert [int(n) for n in tensors["blk.1.attn_k.bias"].shape] == [attn.k_proj.out_features]
    assert not torch.equal(weight(tensors, "blk.1.attn_k.bias"), attn.k_proj.bias)  # reordered like the k rows
    assert torch.equal(weight(tensors, "blk.1.attn_v.bias"), attn.v_proj.bias)
    assert "blk.1.attn_output.bias" not in tensors
    ids = tokens()
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_llama3_rope_factors_and_tied_head(tmp_path, embedded_tokenizer):
    model = llama3_rope_tiny(256)
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", out_type="f32")
    fields, tensors = read(path)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    factors = weight(tensors, "rope_freqs.weight")
    assert factors.shape == (4,) and factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, low ones /8
    assert fields["deci.rope.freq_base"] == 500000.0
    ids = tokens(length=40)
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("out_type, atol", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 4e-2)])
def test_reduced_precision_types(tmp_path, embedded_tokenizer, out_type, atol):
    model = prune(tiny_llama(hidden=96, heads=12, kv_heads=3))  # rows of 96: three q8_0 blocks
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", out_type=out_type)
    _, tensors = read(path)
    Q = gguf.GGMLQuantizationType
    expected = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    assert tensors["blk.0.attn_q.weight"].tensor_type == expected
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    if out_type == "q8_0":  # ffn_down rows are the 96 kept channels of layer 2 (3 blocks) vs 128 elsewhere
        assert tensors["blk.2.ffn_down.weight"].tensor_type == Q.Q8_0
    ids = tokens()
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=0, atol=atol)


def hundred_channel_model():
    """Layer 1 keeps 100 MLP channels: ffn_down rows of 100 values are not whole 32-value q8_0 blocks."""
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    keep = torch.arange(100)
    mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, keep), keep_rows(mlp.up_proj, keep)
    mlp.down_proj = keep_cols(mlp.down_proj, keep)
    return model


def test_mlp_widths_are_zero_padded_to_whole_blocks(tmp_path, embedded_tokenizer):
    model = hundred_channel_model()
    ids = tokens()
    # Padding is exact: in f32, 100 channels padded to 128 give the same logits.
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "pad.gguf", out_type="f32", ffn_multiple=32)
    fields, tensors = read(path)
    assert fields["deci.feed_forward_length"] == [128, 128, 128, 128]
    assert torch.count_nonzero(weight(tensors, "blk.1.ffn_down.weight")[:, 100:]) == 0
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5)
    # q8_0 pads by default, so every ffn_down is q8_0.
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "q8.gguf", out_type="q8_0")
    fields, tensors = read(path)
    Q = gguf.GGMLQuantizationType
    assert fields["deci.feed_forward_length"][1] == 128
    assert all(tensors[f"blk.{i}.ffn_down.weight"].tensor_type == Q.Q8_0 for i in range(4))
    # Without padding the partial-block matrix falls back to f16 and keeps its 100 channels.
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "q8_nopad.gguf", out_type="q8_0",
                                 ffn_multiple=1)
    fields, tensors = read(path)
    assert fields["deci.feed_forward_length"][1] == 100
    assert tensors["blk.1.ffn_down.weight"].tensor_type == Q.F16
    assert tensors["blk.1.ffn_gate.weight"].tensor_type == Q.Q8_0  # rows of 64 values
    torch.testing.assert_close(gguf_forward(path, ids), hf_logits(model, ids), rtol=0, atol=4e-2)


def test_pre_tokenizer_names(llama3_style_tokenizer, qwen2_style_tokenizer):
    bpe = {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_export._LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert gguf_export.tokenizer_pre({**bpe, "pre_tokenizer": llama3}) == "llama-bpe"
    assert gguf_export.tokenizer_pre(json.loads(llama3_style_tokenizer.backend_tokenizer.to_str())) == "llama-bpe"
    assert gguf_export.tokenizer_pre(json.loads(qwen2_style_tokenizer.backend_tokenizer.to_str())) == "qwen2"
    assert gguf_export.tokenizer_pre({**bpe, "pre_tokenizer": smollm}) == "smollm"
    assert gguf_export.tokenizer_pre({**bpe, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(GaqpruneError, match="unknown pre-tokenizer .*Whitespace"):
        gguf_export.tokenizer_pre({**bpe, "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(GaqpruneError, match="byte-level BPE"):
        gguf_export.tokenizer_pre({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}})


def test_bad_inputs_and_existing_files(tmp_path, monkeypatch, embedded_tokenizer):
    model = tiny_llama()
    with pytest.raises(GaqpruneError, match="'q4_k'.*f32, f16, bf16, q8_0"):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", out_type="q4_k")
    with pytest.raises(GaqpruneError, match="ffn_multiple -3 must be a positive"):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", ffn_multiple=-3)
    with pytest.raises(GaqpruneError, match="ffn_multiple 0 must be a positive"):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf", ffn_multiple=0)
    with pytest.raises(GaqpruneError, match="must end in .gguf"):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.bin")
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(GaqpruneError, match="is a folder"):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "d.gguf", overwrite=True)
    (tmp_path / "d.gguf").rmdir()
    path = gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "m.gguf")
    before = path.read_bytes()
    with pytest.raises(GaqpruneError, match="already exists"):
        gguf_export.save_gguf(tiny_llama(seed=1), embedded_tokenizer, path)
    assert path.read_bytes() == before

    def explode(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C halfway through the weights

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", explode)
    with pytest.raises(KeyboardInterrupt):
        gguf_export.save_gguf(tiny_llama(seed=1), embedded_tokenizer, path, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(KeyboardInterrupt):
        gguf_export.save_gguf(model, embedded_tokenizer, tmp_path / "new.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    # the console script says so in one line (was: a traceback)
    def interrupted(model: str, out: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["gaqprune-gguf", "embedded", str(tmp_path / "i.gguf")])
    with pytest.raises(SystemExit) as info:
        gguf_export.cli()
    assert info.value.code == 130
    # a destination that cannot be written is refused before the model is loaded (was: after, with two tracebacks)
    from gaqprune import atomic

    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(GaqpruneError, match=f"cannot write to {str(tmp_path)!r}"):
        gguf_export.check_output(tmp_path / "sub" / "x.gguf", "f16", False, None)


def test_console_script(tmp_path, embedded_tokenizer):
    ckpt = export.save_pretrained_model(prune(tiny_llama(vocab_size=len(embedded_tokenizer))), embedded_tokenizer,
                                        tmp_path / "ckpt")
    run = [sys.executable, "-c", "from gaqprune.models.gguf import cli; cli()", str(ckpt)]
    ok = subprocess.run([*run, str(tmp_path / "m.gguf"), "--out_type", "q8_0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fields, _ = read(tmp_path / "m.gguf")
    assert fields["deci.attention.head_count_kv"] == [2, 1, 2] and len(fields["tokenizer.ggml.tokens"]) == 49152
    bad = subprocess.run([*run, str(tmp_path / "x.gguf"), "--out_type", "int3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "int3" in bad.stderr and not (tmp_path / "x.gguf").exists()
    # output checks come before the model is loaded (a missing model is not even looked at), in one line
    bad = subprocess.run([*run[:-1], str(tmp_path / "absent"), str(tmp_path / "x.gguf"), "--out_type", "int3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "gaqprune-gguf: error: GGUF type 'int3' is not supported; use one of f32, f16, bf16, q8_0"]
    bad = subprocess.run([*run[:-1], str(tmp_path / "absent"), str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"gaqprune-gguf: error: model {str(tmp_path / 'absent')!r}")
    # so is a model GGUF cannot express: refused from its config, before its weights (here: none) are loaded

    tiny_llama_config(vocab_size=49152, hidden_act="gelu").save_pretrained(tmp_path / "gelu")
    embedded_tokenizer.save_pretrained(tmp_path / "gelu")
    bad = subprocess.run([*run[:-1], str(tmp_path / "gelu"), str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert bad.returncode == 2 and "hidden_act is 'gelu'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def split_bpe_tokenizer(split: str, bos: str | None, eos: str):
    """A 1,000-token BPE trained here with a split regex + byte-level pre-tokenizer (merges ignored for whole
    words), as Llama 3's and Qwen2's tokenizers are built: their tokenizer families, without the hub."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gaqprune.data.corpus import embedded_articles
    from gaqprune.models.load import cache_root

    texts = [text for split in embedded_articles(cache_root()).values() for text in split][:40]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[t for t in (bos, eos) if t]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def llama3_style_tokenizer():
    return split_bpe_tokenizer(gguf_export._LLAMA3_SPLIT, "<|begin_of_text|>", "<|end_of_text|>")


@pytest.fixture(scope="module")
def qwen2_style_tokenizer():
    """Qwen2's split (digits one by one) and no BOS token, as Qwen2 / Qwen2.5 tokenizers have."""
    return split_bpe_tokenizer(gguf_export._QWEN2_SPLIT, None, "<|endoftext|>")


def llama3_rope_tiny(vocab_size: int):
    """Tied embeddings and Llama-3's rotary scaling: llama.cpp must reuse token_embd and apply rope_freqs."""
    model = tied_tiny()
    if vocab_size != model.config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.config.rope_parameters = dict(LLAMA3_ROPE)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("variant", ["pruned", "llama3_rope_tied", "llama3_tokenizer", "linear_rope", "qwen2"])
def test_llama_cpp_reproduces_hf_logits(tmp_path, embedded_tokenizer, llama3_style_tokenizer, qwen2_style_tokenizer,
                                        variant):
    """llama.cpp itself (llama-cpp-python) loads the file and gives HF's tokens and logits."""
    import llama_cpp

    tokenizer = {"llama3_tokenizer": llama3_style_tokenizer, "qwen2": qwen2_style_tokenizer}.get(variant,
                                                                                                 embedded_tokenizer)
    vocab = len(tokenizer)
    if variant == "qwen2":  # q/k/v biases (rotated with their rows), unequal layers, no BOS
        model = pruned_qwen("qwen2", vocab_size=vocab)
    else:
        model = llama3_rope_tiny(vocab) if variant == "llama3_rope_tied" else prune(tiny_llama(vocab_size=vocab))
    if variant == "linear_rope":  # positions divided by 4 (HF) = rotary frequencies scaled by 1/4 (llama.cpp)
        model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    path = gguf_export.save_gguf(model, tokenizer, tmp_path / "m.gguf", out_type="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    text = ("Structured pruning removes whole GQA groups and MLP channels, 25 % of them, in 15 s.\n\n"
            "It's 2026; THEY'LL prune 8,030,261,248 parameters   twice\r\n\tand éléphant 1234567. ") * 2
    ids = tokenizer(text)["input_ids"]
    add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
    assert llm.tokenize(text.encode(), add_bos=add_bos, special=True) == ids
    llm.eval(ids)
    ours = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    torch.testing.assert_close(ours, hf_logits(model, torch.tensor([ids]))[0], rtol=1e-3, atol=1e-3)
