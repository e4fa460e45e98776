"""Shared fixtures (the builders behind them are in helpers.py): tiny random Llama models, their saved folder, the
embedded tokenizer, random token windows."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the user's cache or the network (set before anything imports huggingface_hub).
os.environ.setdefault("GAQPRUNE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_llama  # noqa: E402


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
