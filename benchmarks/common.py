"""Shared helpers of the benchmark scripts: random models of real shapes, calibration windows, timing, memory.

GPU speed does not depend on weight values (the same kernels run on the same shapes and dtype), so the large-model
benchmarks build a randomly initialised ``LlamaForCausalLM`` with the exact config shape directly on the device in
the target dtype (no fp32 copy of 8B parameters) and feed it random tokens. ``embedded`` is the real SmolLM2-135M with
calibration text from the embedded corpus (CPU runs).

Only torch, transformers and gaqprune's light modules are imported on the random-model path: no
``datasets``, ``jsonargparse`` or ``gguf`` (the GPU machine has none of them).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

EMBEDDED = "embedded"
# Real shapes (random weights). head_dim is explicit; vocab and rope follow the released configs.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-3.2-1B (without its llama3 rope scaling: speed does not depend on it)
    "llama3-1b-shape": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                            head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
                            max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # SmolLM2-135M's shape (the embedded model) with random weights
    "smollm2-135m-shape": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                               head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # a few-second CPU smoke shape (GQA 4:1 like Llama-3)
    "tiny": dict(num_hidden_layers=8, hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                 intermediate_size=704, vocab_size=2048, rope_theta=500000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}
MODEL_CHOICES = (EMBEDDED, *RANDOM_SHAPES)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def timed(device: str | torch.device, fn, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)`` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of ``RANDOM_SHAPES[shape]``, created on ``device`` in ``dtype``.

    The default dtype is switched while the modules are created, so an 8B model never exists in fp32
    (that would be 32 GB) and never touches host memory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(RANDOM_SHAPES[shape])
    if layers:
        values["num_hidden_layers"] = layers
    config = LlamaConfig(**values)
    config.use_cache = False  # as gaqprune.models.load_model does
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    # Parameters are already in ``dtype``; the rotary inv_freq buffer stays float32 as from_pretrained leaves it.
    assert all(p.dtype == dtype for p in model.parameters()), "a parameter was not created in the requested dtype"
    return model.eval()


def random_windows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` random token ids (CPU, int64): speed does not depend on the text."""
    return torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def load(model: str, device: str, dtype: torch.dtype, layers: int | None = None):
    """``(hf_model, tokenizer or None, window_fn(n, seq_len, seed) -> [n, seq_len] ids, description)``."""
    if model == EMBEDDED:
        from gaqprune.data.datamodule import LMDataModule
        from gaqprune.models.load import load_model, load_tokenizer

        hf_model = load_model(EMBEDDED, dtype=dtype, device=device)
        if layers:
            raise SystemExit("--layers applies to random shapes only")
        data = LMDataModule()

        def windows(n: int, seq_len: int, seed: int) -> torch.Tensor:
            return data.calibration_windows(n, seq_len, seed=seed)

        return hf_model, load_tokenizer(EMBEDDED), windows, "embedded SmolLM2-135M-Instruct (real weights, Wikipedia text)"
    hf_model = build_random_model(model, device, dtype, layers)
    vocab = hf_model.config.vocab_size

    def windows(n: int, seq_len: int, seed: int) -> torch.Tensor:
        return random_windows(n, seq_len, vocab, seed)

    return hf_model, None, windows, f"random {model} ({len(hf_model.model.layers)} layers, random tokens)"


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the parameters, in their own dtype or as if stored in ``dtype``."""
    if dtype is None:
        return sum(p.numel() * p.element_size() for p in module.parameters())
    return param_count(module) * torch.empty((), dtype=dtype).element_size()


def matmul_params(hf_model) -> int:
    """Parameters every token multiplies through: decoder layers + LM head (embedding lookups are free)."""
    return param_count(hf_model.model.layers) + hf_model.get_output_embeddings().weight.numel() + param_count(hf_model.model.norm)


def reset_peak(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str | torch.device) -> int:
    """Peak GPU memory allocated since the last ``reset_peak`` on CUDA; on CPU the process's peak RSS (never reset)."""
    if is_cuda(device):
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated while active and still alive: a CPU stand-in for CUDA's
    ``max_memory_allocated`` (which the CPU allocator does not keep), for tensors created inside the block.

    Every op's outputs are counted once per storage and released when the storage dies. Tensors that existed
    before (the weights) are not counted: the peak is what a stage needs on top of them. Ops pass through Python
    here, so time a stage without it.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key and nbytes and key not in self._alive:
                    self._alive[key] = weakref.ref(storage, lambda _ref, k=key, n=nbytes: self._release(k, n))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def extra_peak_bytes(device: str | torch.device, fn, *args, **kwargs) -> tuple[Any, int]:
    """(fn's result, the peak memory fn allocated on top of what was allocated before): CUDA's allocator statistics
    on a GPU, ``LiveTensorBytes`` on the CPU (slower: time fn separately)."""
    if is_cuda(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result, int(torch.cuda.max_memory_allocated() - before)
    with LiveTensorBytes() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.peak


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def machine() -> dict[str, Any]:
    """What ran the benchmark (goes into the JSON)."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | None, data: dict) -> None:
    """Write ``data`` to ``path`` (parents created); nothing when ``path`` is empty."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
