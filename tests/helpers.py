"""What several test modules share (no test module imports another): tiny random models of every family and
hand-pruned ones, calibration texts, the one way to run the command line in a fresh process, the llama.cpp-semantics
forward pass of a GGUF file, and running code in the environment a user of a saved artefact has.

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
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch
from packaging.requirements import Requirement
from torch import nn

from gaqprune.core import surgery
from gaqprune.core.plan import apply_plan, build_plan
from gaqprune.settings import PruneSettings

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
    return torch.randint(3, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- builders


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


# tiny_llama's unit sizes: a GQA group (4 q heads + 1 kv head, head_dim 8, hidden 64) and an MLP channel
TINY_GROUP_PARAMS, TINY_CHANNEL_PARAMS = 5120, 192


def peer_calib(seed: int = 0, n: int = 8, t: int = 32) -> torch.Tensor:
    """Calibration windows of random token ids for the peer methods' tests (``benchmarks/peers``)."""
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def tiny_llama(seed: int = 0, **kw):
    """A randomly initialised tiny LlamaForCausalLM in eval mode (fp32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return spread(LlamaForCausalLM(tiny_llama_config(**kw)))


HEAD_DIM = 8  # tiny_llama: hidden 64 / 8 query heads


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.data = linear.weight.data[index].clone()
    return new


def keep_cols(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    new.weight.data = linear.weight.data[:, index].clone()
    return new


def prune(model):
    """Layer 1 keeps KV group 1 of 2 (its 4 query heads), layer 2 keeps 96 of 128 MLP channels, layer 3 goes."""
    attn = model.model.layers[1].self_attn
    q_rows = torch.arange(4 * HEAD_DIM, 8 * HEAD_DIM)
    kv_rows = torch.arange(HEAD_DIM, 2 * HEAD_DIM)
    attn.q_proj, attn.o_proj = keep_rows(attn.q_proj, q_rows), keep_cols(attn.o_proj, q_rows)
    attn.k_proj, attn.v_proj = keep_rows(attn.k_proj, kv_rows), keep_rows(attn.v_proj, kv_rows)
    mlp = model.model.layers[2].mlp
    channels = torch.arange(16, 112)
    mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, channels), keep_rows(mlp.up_proj, channels)
    mlp.down_proj = keep_cols(mlp.down_proj, channels)
    del model.model.layers[3]
    model.config.num_hidden_layers = 3
    return model


def tied_tiny(seed: int = 0):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return spread(LlamaForCausalLM(config))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(0))


def tiny_mistral(sliding_window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                           sliding_window=sliding_window, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_qwen(kind: str, seed: int = 0, vocab_size: int = 256, layers: int = 4):
    """A random tiny Qwen2 / Qwen3 (hidden 64, 8 query / 4 KV heads), weights and biases spread so units differ."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    # Qwen2 configs (Qwen2.5's released ones too) have no head_dim: hidden_size // num_attention_heads; Qwen3's do.
    head_dim = {"head_dim": HEAD_DIM} if kind == "qwen3" else {}
    config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, **head_dim)
    assert kind == "qwen3" or not hasattr(config, "head_dim")
    torch.manual_seed(seed)
    return spread(model_class(config), 0.05)


def pruned_qwen(kind: str, vocab_size: int = 256):
    """Groups and channels removed in every layer (LLM-Pruner's same-rate split), the residual refit, then layer 2
    removed whole: unequal layers and a shorter stack."""
    model = tiny_qwen(kind, vocab_size=vocab_size)
    settings = replace(PruneSettings(), pruning_ratio=0.3, layer_start=0, layer_end=4, unit_split="same_rate",
                       min_pruning_rate=0.1, allocation="fixed")
    plan = build_plan(model, {i: 1.0 + i for i in range(4)}, random_ids(4, 16, 1), settings, progress=False)
    apply_plan(model, plan, random_ids(8, 16, 2))
    surgery.remove_layers(model, [2])
    return model


ARGS = ["--importance_seq_len", "32", "--num_examples", "4", "--max_seq_len", "32", "--pruning_ratio", "0.3",
        "--min_pruning_rate", "0.1", "--layer_start", "0", "--layer_end", "4", "--data.max_seq_len", "32",
        "--trainer.logger", "false"]


def corpus(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(f"Section {i}. The committee met on day {i % 7} to discuss the harbour, the mill and "
                             f"the {['north', 'south', 'east'][i % 3]} road." for i in range(1500)))
    return f


def settings(**kw) -> PruneSettings:
    base = {"pruning_ratio": 0.3, "layer_start": 0, "layer_end": 4, "min_pruning_rate": 0.1, "max_pruning_rate": 0.6,
            "compensation": "none", "num_examples": 6, "max_seq_len": 32, "allocation": "fixed"}
    base.update(kw)
    return PruneSettings(**base)


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def weight(tensors, name: str) -> torch.Tensor:
    t = tensors[name]
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(*reversed([int(n) for n in t.shape]))


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_pairs(x: torch.Tensor, base: float, factors: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's 'normal' rotary: consecutive pairs (x[2i], x[2i+1]) rotate by pos * base^(-2i/d) / factor[i]."""
    seq, d = x.shape[-2], x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if factors is not None:
        freq = freq / factors.double()
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def _project(tensors, h: torch.Tensor, name: str, heads: int, head_dim: int) -> torch.Tensor:
    """``[B, heads, T, head_dim]`` of one projection, with its optional bias (Qwen2's q/k/v)."""
    out = h @ weight(tensors, f"{name}.weight").T
    if f"{name}.bias" in tensors:
        out = out + weight(tensors, f"{name}.bias")
    return out.view(*h.shape[:2], heads, head_dim).transpose(1, 2)


@torch.no_grad()
def gguf_forward(path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of llama.cpp's 'deci' graph, computed from the file alone (metadata + tensors)."""
    fields, tensors = read(path)
    arch = fields["general.architecture"]
    heads, kv_heads = fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]
    head_dim, eps = fields[f"{arch}.attention.key_length"], fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = fields[f"{arch}.rope.freq_base"]
    factors = weight(tensors, "rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    x = weight(tensors, "token_embd.weight")[ids]
    batch, seq, _ = x.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for i in range(fields[f"{arch}.block_count"]):
        h = rms(x, weight(tensors, f"blk.{i}.attn_norm.weight"), eps)
        q, k, v = (_project(tensors, h, f"blk.{i}.{name}", count, head_dim)
                   for name, count in (("attn_q", heads[i]), ("attn_k", kv_heads[i]), ("attn_v", kv_heads[i])))
        q, k = rope_pairs(q, base, factors), rope_pairs(k, base, factors)
        group = heads[i] // kv_heads[i]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(batch, seq, -1) @ weight(tensors, f"blk.{i}.attn_output.weight").T
        h = rms(x, weight(tensors, f"blk.{i}.ffn_norm.weight"), eps)
        gate = torch.nn.functional.silu(h @ weight(tensors, f"blk.{i}.ffn_gate.weight").T)
        x = x + (gate * (h @ weight(tensors, f"blk.{i}.ffn_up.weight").T)) @ weight(tensors, f"blk.{i}.ffn_down.weight").T
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    return rms(x, weight(tensors, "output_norm.weight"), eps) @ weight(tensors, head).T


# ----------------------------------------------------------------------------------- the command line


def cli_command(*args: str | os.PathLike) -> list[str]:
    """The command line of ``gaqprune <args>`` in a fresh process (``python -m gaqprune.cli``)."""
    return [sys.executable, "-m", "gaqprune.cli", *map(str, args)]


def cli(*args: str | os.PathLike, cwd, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``gaqprune <args>`` run in a fresh process, its output captured."""
    return subprocess.run(cli_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(stderr: str) -> str:
    """The ``gaqprune: error:`` line of a refused command (exactly one, and no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("gaqprune: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# a checkpoint folder loaded where only torch, transformers, accelerate, gguf and safetensors exist (run_bare)
LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
torch.save({"logits": logits, "class": type(model).__name__, "pip_list": PIP_LIST,
            "modules": sorted(m for m in sys.modules if m.partition(".")[0] in ("peft", "gaqprune"))}, sys.argv[3])
"""


def load_bare(folder, ids, tmp_path, allow=None) -> dict:
    torch.save(ids, tmp_path / "ids.pt")
    run_bare(LOAD, folder, tmp_path / "ids.pt", tmp_path / "out.pt", cwd=tmp_path, **({"allow": allow} if allow else {}))
    return torch.load(tmp_path / "out.pt")


def check_bare(out: dict) -> None:
    """The child really had neither gaqprune nor peft (nor anything of the training stack) to lean on."""
    names = {entry.split("==")[0].lower() for entry in out["pip_list"]}
    assert {"torch", "transformers", "accelerate", "gguf", "safetensors"} <= names
    assert not names & {"peft", "gaqprune", "lightning", "datasets", "torchmetrics", "jsonargparse"}, names
    assert out["modules"] == []
