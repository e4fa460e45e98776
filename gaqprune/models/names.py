"""The names things go by: the embedded model, what a saved model records as its origin, dtypes, the cache folder.

Shared by the loaders (``load``) and the checkpoint format (``pruned``), which must not import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gaqprune.errors import GaqpruneError

EMBEDDED = "embedded"


EMBEDDED_NAME = "SmolLM2-135M-Instruct"


EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# How checkpoints pruned from the embedded model name their source (``gaqprune_base_model``).
EMBEDDED_SOURCE = f"HuggingFaceTB/{EMBEDDED_NAME} (embedded Q4_1 GGUF)"


def model_name(base_model: str) -> str:
    """``base_model`` for people (GGUF metadata): as given, with ``embedded`` spelled out."""
    return EMBEDDED_SOURCE if base_model == EMBEDDED else base_model


def absolute_if_local(model: str) -> str:
    """A local model path made absolute (it must resolve from any folder later); hub ids and names as they are."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def model_origin(base_model: str) -> str:
    """What a saved model records as the model it was pruned from (``gaqprune_base_model``, the distillation
    teacher's default): ``model_name``, a local path made absolute."""
    return model_name(base_model) if base_model == EMBEDDED else absolute_if_local(base_model)


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32, "32-true": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16, "16-true": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) to torch."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise GaqpruneError(
            f"--dtype {name!r} is not supported; use one of float32, bfloat16, float16 (or fp32, bf16, fp16)"
        ) from None


def cache_root() -> Path:
    """Where converted models and tokenized text are cached (``$GAQPRUNE_CACHE`` overrides)."""
    return Path(os.environ.get("GAQPRUNE_CACHE", Path.home() / ".cache" / "gaqprune"))
