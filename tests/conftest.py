"""Shared fixtures: tiny random Llama models (a few layers, hidden 64, 8 query / 2 KV heads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the user's cache or the network.
os.environ.setdefault("GAQPRUNE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(vocab_size: int = 256, layers: int = 4, heads: int = 8, kv_heads: int = 2,
                      hidden: int = 64, intermediate: int = 128, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw,
    )


def spread(model, scale: float = 0.02):
    """Random init leaves near-identical layers; spread every weight so scores differ between units. Eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def tiny_llama(seed: int = 0, **kw):
    """A randomly initialised tiny LlamaForCausalLM in eval mode (fp32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return spread(LlamaForCausalLM(tiny_llama_config(**kw)))


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from gaqprune.models.load import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A saved tiny random Llama (4 layers) with the embedded model's tokenizer: for CLI tests."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = tiny_llama(vocab_size=len(embedded_tokenizer))
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def random_windows():
    return torch.randint(3, 256, (6, 32), generator=torch.Generator().manual_seed(0))
