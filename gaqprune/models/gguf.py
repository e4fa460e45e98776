"""GGUF export: a pruned model that runs in llama.cpp (checked through llama-cpp-python).

llama.cpp's ``deci`` architecture, written for NVIDIA's Llama-3.1-Nemotron NAS models, reads the
query-head, KV-head and FFN counts as one value per layer and builds every layer with its own
shapes. Its layers are Llama layers (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP),
so a gaqprune model, whose layers differ exactly in those three numbers, maps onto it one to one.
Its layers also take optional q/k/v biases, so Qwen2 / Qwen2.5 models map onto it too (Qwen3's per-head
q/k norms do not, and are refused). A dense model is written the same way (one architecture for both,
so their speeds compare).

What is written:
- hyper-parameters: per-layer ``head_count`` / ``head_count_kv`` / ``feed_forward_length``
  arrays, head dimension, RMSNorm epsilon, rotary base and scaling (Llama-3's frequency factors as
  the ``rope_freqs`` tensor, linear scaling as metadata);
- weights in f32, f16, bf16 or q8_0, query and key rows (and their biases) reordered from HF's half-split
  rotary layout to llama.cpp's interleaved pairs; norms and rotary factors stay f32. A pruned layer's MLP width can be any
  number, but quantized types need whole blocks along ``ffn_down``'s rows: for q8_0 each width is padded
  with zero channels to a multiple of 32 (exact: a zero channel adds nothing), and any other matrix whose
  rows are not whole blocks falls back to f16;
- the tokenizer (byte-level BPE: Llama 3, Qwen2, SmolLM2, GPT-2 style), its merges, special tokens and
  chat template, with llama.cpp's name for its pre-tokenizer.

Tensors are converted and written one at a time (peak memory: one tensor), into a temporary file
renamed into place at the end, so an interrupted export leaves no half-written ``.gguf``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gaqprune.atomic import _tmp_sibling, unwritable
from gaqprune.errors import GaqpruneError

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "deci"
Q8_BLOCK = 32
# llama.cpp's names for the pre-tokenizers of byte-level BPE tokenizers, keyed by the HF pre-tokenizer
# steps (tokenizers' JSON): each step as (type, the setting that distinguishes it).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 / Qwen2.5 / Qwen3: digits one by one
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
_ROTATED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias")


def _gguf():
    import gguf

    if not hasattr(gguf.MODEL_ARCH, "DECI"):
        from importlib.metadata import version

        raise GaqpruneError(f"GGUF export needs gguf>=0.17 (llama.cpp's 'deci' architecture); found gguf {version('gguf')}")
    return gguf


def _pre_tokenizer_steps(spec: dict | None) -> tuple:
    if not spec:
        return ()
    kind = spec.get("type")
    if kind == "Sequence":
        return tuple(step for sub in spec.get("pretokenizers", []) for step in _pre_tokenizer_steps(sub))
    if kind == "ByteLevel":
        return ((kind, bool(spec.get("use_regex", True))),)
    if kind == "Digits":
        return ((kind, bool(spec.get("individual_digits", False))),)
    if kind == "Split":
        return ((kind, (spec.get("pattern") or {}).get("Regex")),)
    return ((kind, None),)


def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (error if unknown)."""
    model, decoder = tokenizer_json.get("model") or {}, tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise GaqpruneError(
            f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2 style); this one is a "
            f"{model.get('type')!r} model with a {decoder.get('type')!r} decoder"
        )
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise GaqpruneError(
            f"unknown pre-tokenizer {steps!r}; GGUF export knows {', '.join(sorted(PRE_TOKENIZERS.values()))} "
            "(pass tokenizer_pre= with llama.cpp's name for it)"
        )
    return PRE_TOKENIZERS[steps]


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows per head from HF's rotate-half layout (first half, second half) to llama.cpp's pairs (x0, x1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope(config) -> tuple[float, str, dict]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "llama3", "linear"):
        raise GaqpruneError(f"rope type {kind!r} has no GGUF mapping here; GGUF export supports default, llama3, linear")
    return theta, kind, rope


def _llama3_rope_factors(config, head_dim: int, theta: float) -> torch.Tensor:
    """llama.cpp divides each rotary frequency by these factors: dense frequencies / Llama-3's (transformers')."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (plain / scaled.double()).float()


def _padded(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def _tensors(hf_model, head_dim: int, rope_factors: torch.Tensor | None,
             ffn_multiple: int) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(GGUF name, shape, tensor maker) in file order: the maker builds the tensor as written (q/k rows interleaved
    for llama.cpp's rotary, MLP widths zero-padded) only when called, so the header pass copies nothing."""
    gguf = _gguf()
    layers = hf_model.model.layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(layers))

    def plain(tensor: torch.Tensor):
        return tuple(tensor.shape), lambda: tensor

    yield "token_embd.weight", *plain(hf_model.model.embed_tokens.weight)
    if rope_factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", *plain(rope_factors)
    for index, layer in enumerate(layers):
        width = layer.mlp.down_proj.in_features
        pad = _padded(width, ffn_multiple) - width
        for hf_name, param in layer.named_parameters():
            shape, make = plain(param)
            if hf_name in _ROTATED:
                make = partial(_interleave_rotary, param, param.shape[0] // head_dim)
            elif pad and hf_name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                shape = (width + pad, param.shape[1])  # zero channels: silu(0) * 0 adds nothing
                make = partial(torch.nn.functional.pad, param, (0, 0, 0, pad))
            elif pad and hf_name == "mlp.down_proj.weight":
                shape = (param.shape[0], width + pad)
                make = partial(torch.nn.functional.pad, param, (0, pad))
            base, _, suffix = hf_name.rpartition(".")
            yield f"{names.get_name(f'model.layers.{index}.{base}')}.{suffix}", shape, make
    yield "output_norm.weight", *plain(hf_model.model.norm.weight)
    head = hf_model.get_output_embeddings().weight
    if head.data_ptr() != hf_model.model.embed_tokens.weight.data_ptr():  # tied: llama.cpp reuses token_embd
        yield "output.weight", *plain(head)


def _encoding(gguf, shape: tuple[int, ...], out_type: str):
    """The GGML type a tensor is stored in: norms and rotary factors f32; q8_0 only for rows of whole blocks."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0":
        return Q.Q8_0 if shape[-1] % Q8_BLOCK == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[out_type]


def _encode(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return gguf.quants.quantize(data, qtype)


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _tokenizer_json(tokenizer, folder: str) -> dict:
    tokenizer.save_pretrained(folder)
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise GaqpruneError("GGUF export needs a fast (tokenizer.json) tokenizer")
    return json.loads(file.read_text(encoding="utf-8"))


def check_supported(config, tokenizer, tokenizer_pre_name: str | None = None) -> str:
    """Refuse, before any work, what GGUF export cannot write; returns the pre-tokenizer name it will use."""
    _check_config(config)
    if tokenizer_pre_name:
        return tokenizer_pre_name
    with tempfile.TemporaryDirectory() as tmp:
        return tokenizer_pre(_tokenizer_json(tokenizer, tmp))


def _check_config(config) -> None:
    from gaqprune.models.pruned import PRUNED_MODEL_TYPE, PRUNED_TYPE_OF

    family = PRUNED_TYPE_OF.get(getattr(config, "model_type", None))
    if family == "gaqprune_qwen3":
        raise GaqpruneError(f"cannot write a {config.model_type!r} model as GGUF: Qwen3's per-head q/k norms have "
                            "no place in llama.cpp's 'deci' layers (the architecture that takes per-layer shapes)")
    if family not in (PRUNED_MODEL_TYPE, "gaqprune_mistral", "gaqprune_qwen2"):
        raise GaqpruneError(f"cannot write a {config.model_type!r} model as GGUF; llama, mistral and qwen2 layouts only")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GaqpruneError(f"GGUF 'deci' layers use SiLU; this model's hidden_act is {config.hidden_act!r}")
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if types is not None:  # Qwen2 / Qwen3: the layers marked sliding_attention use the window, the others do not
        sliding = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
        if sliding and window is not None:
            raise GaqpruneError(f"cannot write a model whose layers {sliding} use a sliding window ({window} tokens) as "
                                "GGUF 'deci' (no sliding window there)")
    elif window is not None:
        raise GaqpruneError(f"cannot write a model with sliding_window={window} as GGUF 'deci' (no sliding window "
                            "there); in Python, set config.sliding_window = None if every sequence you will run is "
                            "shorter than the window")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):  # Qwen2's q/k/v biases are
        # its layout (no such flags), written as the 'deci' layers' optional biases
        raise GaqpruneError("GGUF export writes Llama layers without o_proj / MLP biases; this model has "
                            "attention_bias or mlp_bias set")
    _rope(config)


def _tokenizer_metadata(writer, gguf, tokenizer, vocab_size: int, pre: str | None) -> None:
    """Tokens, their types, llama.cpp's pre-tokenizer name (``pre``, else detected), merges and special tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = _tokenizer_json(tokenizer, tmp)  # the saved files also feed SpecialVocab below
        pre = pre or tokenizer_pre(spec)
        reverse = {index: token for token, index in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for index in range(vocab_size):  # the embedding's rows, padded past the tokenizer's vocabulary
            if index in added:
                tokens.append(added[index].content)
                types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
            elif index in reverse:
                tokens.append(reverse[index])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens))
        # What the HF tokenizer really does, rather than what its config files may or may not say.
        probe = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
        special.add_to_gguf(writer, quiet=True)


def check_output(path: Path, out_type: str, overwrite: bool, ffn_multiple: int | None) -> int:
    """Refuse a bad output path, type or padding multiple before any work; returns the padding multiple to use."""
    if out_type not in OUT_TYPES:
        raise GaqpruneError(f"GGUF type {out_type!r} is not supported; use one of {', '.join(OUT_TYPES)}")
    if ffn_multiple is not None and ffn_multiple < 1:
        raise GaqpruneError(f"ffn_multiple {ffn_multiple} must be a positive integer (or None for the type's default)")
    if path.suffix != ".gguf":
        raise GaqpruneError(f"GGUF output {str(path)!r} must end in .gguf")
    if path.is_dir():
        raise GaqpruneError(f"GGUF output {str(path)!r} is a folder; give a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise GaqpruneError(f"output file {str(path)!r} already exists; pass overwrite (--overwrite true) to replace it")
    refused = unwritable(path.parent)
    if refused is not None:
        raise GaqpruneError(f"GGUF output {str(path)!r}: cannot write to {str(refused[0])!r} ({refused[1]})")
    return ffn_multiple or (Q8_BLOCK if out_type == "q8_0" else 1)


def save_gguf(hf_model, tokenizer, path: str | os.PathLike, out_type: str = "f16", overwrite: bool = False,
              tokenizer_pre: str | None = None, name: str | None = None, ffn_multiple: int | None = None,
              progress: bool = False) -> Path:
    """Write ``hf_model`` (dense or pruned) and ``tokenizer`` as one GGUF file for llama.cpp.

    ``out_type``: f32, f16, bf16 or q8_0. ``tokenizer_pre`` overrides the detected pre-tokenizer name.
    ``ffn_multiple``: pad each layer's MLP width with zero channels (exact: they add nothing) to a multiple of
    this, so quantized types keep whole blocks along ``ffn_down``'s rows; None = 32 for q8_0 (its block),
    1 otherwise; 256 suits an f16 file meant for llama.cpp's K-quants. An existing ``path`` is refused unless
    ``overwrite``. ``progress`` shows a bar (bytes written, ETA).
    """
    from tqdm.auto import tqdm

    from gaqprune.models.pruned import _checked_layer_shapes

    gguf = _gguf()
    path = Path(path)
    ffn_multiple = check_output(path, out_type, overwrite, ffn_multiple)
    config = hf_model.config
    _check_config(config)
    shapes = _checked_layer_shapes(hf_model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, rope_kind, rope = _rope(config)
    rope_factors = _llama3_rope_factors(config, head_dim, theta) if rope_kind == "llama3" else None
    vocab_size = hf_model.model.embed_tokens.weight.shape[0]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name or str(getattr(config, "gaqprune_base_model", None) or config.name_or_path or "model"))
        writer.add_block_count(len(shapes))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_head_count([s["num_attention_heads"] for s in shapes])
        writer.add_head_count_kv([s["num_key_value_heads"] for s in shapes])
        writer.add_feed_forward_length([_padded(s["intermediate_size"], ffn_multiple) for s in shapes])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope_kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[out_type]
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        _tokenizer_metadata(writer, gguf, tokenizer, vocab_size, tokenizer_pre)
        # Two passes over the weights: tensor infos first (the header needs them), then the data one at a time.
        total = 0
        for tensor_name, shape, _ in _tensors(hf_model, head_dim, rope_factors, ffn_multiple):
            qtype = _encoding(gguf, shape, out_type)
            nbytes = _nbytes(gguf, shape, qtype)
            total += nbytes
            writer.add_tensor_info(tensor_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad(), tqdm(total=total, desc=f"GGUF {out_type}", unit="B", unit_scale=True,
                                   disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for _, shape, make in _tensors(hf_model, head_dim, rope_factors, ffn_multiple):
                data = _encode(gguf, make(), _encoding(gguf, shape, out_type))
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path


def main(model: str, out: str, out_type: str = "f16", overwrite: bool = False, tokenizer_pre: str | None = None,
         ffn_multiple: int | None = None, dtype: str = "float32") -> None:
    """Write a model (a gaqprune run's model/ folder, any Llama-layout HF folder or hub id, 'embedded') as GGUF.

    Args:
        model: what to convert (any --base_model form).
        out: the .gguf file to write.
        out_type: f32, f16, bf16 or q8_0.
        overwrite: replace an existing file.
        tokenizer_pre: llama.cpp's pre-tokenizer name, if the tokenizer's is not recognised.
        ffn_multiple: pad MLP widths with zero channels to a multiple of this (default: 32 for q8_0, else 1;
            256 for an f16 file meant for llama.cpp's K-quants).
        dtype: dtype the model is loaded in (bfloat16 halves the memory an 8B model needs).
    """
    from gaqprune.models.load import load_config, load_model, load_tokenizer

    check_output(Path(out), out_type, overwrite, ffn_multiple)  # before the (possibly 16 GB) model is loaded
    try:
        tokenizer = load_tokenizer(model)
        check_supported(load_config(model), tokenizer, tokenizer_pre)  # so is what GGUF cannot express
        hf_model = load_model(model, dtype=dtype)
    except GaqpruneError as err:  # the loaders name the prune/fit flag; this command takes the model positionally
        raise GaqpruneError(str(err).replace("--base_model", "model", 1)) from None
    path = save_gguf(hf_model, tokenizer, out, out_type=out_type, overwrite=overwrite,
                     tokenizer_pre=tokenizer_pre, ffn_multiple=ffn_multiple, progress=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {out_type})")


def cli(args: list[str] | None = None) -> None:
    """Console entry point ``gaqprune-gguf``: one-line errors and a non-zero exit on bad input."""
    import sys

    from jsonargparse import auto_cli

    from gaqprune.atomic import Terminated, sigterm_unwinds

    try:
        with sigterm_unwinds():
            auto_cli(main, args=args)
    except GaqpruneError as err:
        print(f"gaqprune-gguf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, Terminated) as err:  # the temporary file is gone (save_gguf's finally)
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"gaqprune-gguf: {how}; no file was written (an existing one is unchanged)", file=sys.stderr)
        raise SystemExit(143 if isinstance(err, Terminated) else 130) from None


__all__ = ["OUT_TYPES", "PRE_TOKENIZERS", "check_supported", "cli", "save_gguf", "tokenizer_pre"]
