"""What several test modules share: running code in the environment a user of a saved artefact has.

``run_bare`` starts a fresh interpreter in which only some distributions exist: the ones named and what they
require (their ``Requires-Dist`` closure, extras left out), as in a virtual environment where a user ran
``pip install torch transformers accelerate gguf safetensors`` and nothing else. Every other installed
distribution (gaqprune itself, peft, lightning, datasets, ...) is hidden before anything is imported: its modules
cannot be imported (``find_spec`` returns None, ``import`` raises "No module named ..."), and ``importlib.metadata``
does not list it, so ``transformers.utils.is_peft_available()`` and transformers' ``check_imports`` see what they
would see in that environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

# What a user who serves or evaluates a saved checkpoint installs (the stock-transformers promise).
CHECKPOINT_USER = ("torch", "transformers", "accelerate", "gguf", "safetensors")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, importlib.metadata.Distribution]:
    return {_norm(d.metadata["Name"]): d for d in importlib.metadata.distributions() if d.metadata["Name"]}


def closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions ``roots`` need: each root and, transitively, its unconditional requirements (those
    without an ``extra`` marker, whose markers hold on this interpreter)."""
    installed = _installed()
    seen: set[str] = set()
    todo = [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for spec in installed[name].requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or one for another platform / Python
            todo.append(_norm(req.name))
    return seen


def _hidden_modules(allowed: set[str]) -> list[str]:
    """Top-level module names that belong only to distributions outside ``allowed`` (gaqprune always among them:
    an editable install may not list its modules)."""
    hidden = {"gaqprune"}
    for module, dists in importlib.metadata.packages_distributions().items():
        if not any(_norm(d) in allowed for d in dists):
            hidden.add(module)
    return sorted(hidden)


PREAMBLE = r"""
import importlib.abc, json, re, sys
_spec = json.loads(sys.argv.pop(1))
_HIDDEN, _ALLOWED = set(_spec["hidden"]), set(_spec["allowed"])


class _Bare(importlib.abc.MetaPathFinder):
    '''One of the interpreter's finders, blind to the distributions this environment does not have.'''

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in getattr(self.inner, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() in _ALLOWED:
                yield dist

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [_Bare(finder) for finder in sys.meta_path]
sys.path_importer_cache.clear()
import importlib.metadata as _metadata
PIP_LIST = sorted(f"{d.metadata['Name']}=={d.version}" for d in _metadata.distributions())
"""


def run_bare(code: str, *args: str | os.PathLike, allow: tuple[str, ...] = CHECKPOINT_USER, cwd: Path,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` (after ``PREAMBLE``, which defines ``PIP_LIST``: what ``pip list`` would show there) with ``args``
    as ``sys.argv[1:]`` in a fresh isolated interpreter where only ``allow`` and their requirements are installed;
    fails the test with the child's stderr when it exits non-zero."""
    allowed = closure(allow)
    spec = json.dumps({"hidden": _hidden_modules(allowed), "allowed": sorted(allowed)})
    env = {**os.environ, "HF_MODULES_CACHE": str(Path(cwd) / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", PREAMBLE + code, spec, *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def tiny_family(kind: str, seed: int = 0, vocab_size: int = 256, layers: int = 4):
    """A random tiny model of one supported family (hidden 64, 8 query / 2 KV heads, head_dim 8, MLP 128; Qwen2 with
    its q/k/v biases and no head_dim field, Qwen3 with its per-head q/k norms, Mistral with a sliding window of 8
    tokens), weights spread so that units differ. Eval mode, float32."""
    import torch
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    extra = {"head_dim": 8} if kind != "qwen2" else {}
    if kind == "mistral":
        extra["sliding_window"] = 8
    config = getattr(transformers, f"{names}Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{names}ForCausalLM")(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def random_ids(n: int, seq_len: int, seed: int, vocab_size: int = 256):
    import torch

    return torch.randint(3, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
