"""Models whose decoder layers stay off the device (``--offload cpu|disk``): one layer's weights resident at a time.

Every pruning stage is layer-shaped (layer importance, the streamed Taylor backward, the surgery and refit, the
perplexity sweep, the save), so none needs more than one decoder layer's weights on the device. The model is built
with its decoder layers on the meta device (``accelerate.init_empty_weights``: right shapes, no storage); the rest
(embeddings, final norm, LM head, rotary tables) is real. An ``OffloadStore`` attached to the model
(``gaqprune.core.layers.OFFLOAD_ATTR``) holds where each layer's weights are:

* ``cpu``: in host memory (the model is read once, as without offload; then the layers leave the device);
* ``disk``: in the input folder's safetensors files, memory-mapped (``safetensors.safe_open``): a layer's tensors are
  read when its turn comes and dropped after, so host memory holds one layer, not the model.

``gaqprune.core.layers.resident`` reads a layer in (``accelerate.utils.set_module_tensor_to_device``, which casts to
the model's dtype exactly as ``from_pretrained`` does) and releases it to the meta device after. A layer the surgery
changed is written back: to host memory (``cpu``) or to a safetensors file of its own in a scratch folder (``disk``),
so the pruned model never exists in memory as a whole either. ``layer_shard_writer`` saves the pruned model one layer
per safetensors shard, reading one layer at a time.

Peak memory per stage (``benchmarks/offload.py`` measures it; README "Pruning models larger than memory" tabulates
it for Llama-3-8B and -70B): the device holds the embeddings and LM head, one decoder layer (its gradients too in the
Taylor pass), and the stage's hidden states (windows x seq_len x hidden per cached stream).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gaqprune.core.layers import LAYERS_PREFIX, OFFLOAD_ATTR, offload_store, resident
from gaqprune.errors import GaqpruneError
from gaqprune.models.names import resolve_dtype

MODES = ("none", "cpu", "disk")
INDEX_FILE = "model.safetensors.index.json"


def _set(module: torch.nn.Module, name: str, device, value: torch.Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    # never an inference tensor (layer importance runs in inference mode): the Taylor pass later needs gradients
    with torch.inference_mode(False):
        set_module_tensor_to_device(module, name, device, value=value)


def _return_freed_memory() -> None:
    """Hand the heap pages freed with a layer back to the system (glibc keeps freed blocks under 32 MB in its heap,
    and a run of many layers crept up by some 30 MB per layer on the Llama-3.2-1B shape); nothing elsewhere."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


class OffloadStore:
    """Where each decoder layer's weights are while they are not on the device (see the module docstring).

    A layer is known by its module (surgery replaces its Linears, ``remove_layers`` renumbers the list; the layer
    module stays the same object). Its source is ``{name in the layer: tensor}`` (``cpu``, or a layer the surgery
    changed) or ``{name in the layer: (file, name in the file)}`` (``disk``)."""

    def __init__(self, hf_model, mode: str, sources: dict[int, dict], device: torch.device | str = "cpu"):
        self.mode = mode
        self.device = torch.device(device)
        self._sources = {id(hf_model.model.layers[i]): source for i, source in sources.items()}
        self._scratch: Path | None = None
        self.scratch_parent: Path | None = None  # where a ``disk`` store writes changed layers (None: the temp dir)
        self._count = itertools.count()
        self.reads = 0  # layer reads so far (how often a stage read the model: benchmarks/offload.py)

    # -- residency -----------------------------------------------------------------------------------------------
    def _read(self, layer) -> dict[str, torch.Tensor]:
        source = self._sources[id(layer)]
        if all(isinstance(v, torch.Tensor) for v in source.values()):
            return dict(source)
        from safetensors import safe_open

        tensors = {}
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, (file, key) in source.items():
            by_file.setdefault(file, []).append((name, key))
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, key in names:
                    tensors[name] = f.get_tensor(key)
        return tensors

    @contextmanager
    def resident(self, layer: torch.nn.Module, keep: bool = False) -> Iterator[torch.nn.Module]:
        """The layer with its weights on ``self.device`` (see ``gaqprune.core.layers.resident``)."""
        with torch.inference_mode(False):  # see _set
            tensors = self._read(layer)
        self.reads += 1
        names = [name for name, _ in layer.named_parameters()]
        if sorted(names) != sorted(tensors):
            raise GaqpruneError(f"offloaded layer weights {sorted(set(names) ^ set(tensors))} do not match the layer")
        for name in names:
            _set(layer, name, self.device, tensors.pop(name))
        try:
            yield layer
            if keep:
                self._write(layer)
        finally:
            for name, _ in list(layer.named_parameters()):
                _set(layer, name, "meta")
            _return_freed_memory()

    def _write(self, layer: torch.nn.Module) -> None:
        """Keep the layer's current weights (after surgery) as its source."""
        tensors = {name: p.detach().to("cpu") for name, p in layer.named_parameters()}
        if self.mode == "cpu":
            self._sources[id(layer)] = tensors
            return
        from safetensors.torch import save_file

        file = self._scratch_dir() / f"layer-{next(self._count):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
        self._sources[id(layer)] = {name: (str(file), name) for name in tensors}

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            parent = self.scratch_parent
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix=".gaqprune-offload-", dir=parent))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)  # also at exit
        return self._scratch

    def close(self) -> None:
        """Remove the scratch folder of changed layers (a finished run has saved them)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


# ------------------------------------------------------------------------------------------------------ placing


def to_device(hf_model, device: torch.device | str):
    """``hf_model.to(device)``; an offloaded model moves everything but its decoder layers, which its store then
    reads onto ``device``."""
    store = offload_store(hf_model)
    if store is None:
        return hf_model.to(device)
    layers = hf_model.model.layers
    hf_model.model.layers = torch.nn.ModuleList()  # Module.to keeps tied weights tied; meta layers cannot move
    try:
        hf_model.to(device)
    finally:
        hf_model.model.layers = layers
    store.device = torch.device(device)
    return hf_model


def _layer_names(hf_model, index: int) -> list[str]:
    return [name for name, _ in hf_model.model.layers[index].named_parameters()]


def _detach_layers(hf_model, mode: str, sources: dict[int, dict]) -> OffloadStore:
    store = OffloadStore(hf_model, mode, sources)
    setattr(hf_model, OFFLOAD_ATTR, store)
    for layer in hf_model.model.layers:
        for name, _ in list(layer.named_parameters()):
            _set(layer, name, "meta")
    return store


# ------------------------------------------------------------------------------------------------------ loading


def safetensors_files(path: Path) -> dict[str, str]:
    """``{tensor name: file}`` of a folder's safetensors weights (sharded with an index, or one file); only the
    headers are read."""
    from safetensors import safe_open

    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(path / file) for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), str(single))


def check_offload(mode: str, subcommand: str, finetune: bool, save_gguf: str | None, base_model: str) -> None:
    """Refuse, before anything is loaded, an ``--offload`` that is not a mode, or that the run cannot honour: only
    `prune` streams layers (a fit trains every layer at once), not with --finetune or --save_gguf; ``disk`` needs the
    input's weights as safetensors (read from the headers only)."""
    if mode not in MODES:
        raise GaqpruneError(f"--offload {mode!r} is not accepted; give one of {', '.join(MODES)}")
    if mode == "none":
        return
    if subcommand != "prune":
        raise GaqpruneError(f"--offload {mode} applies to `gaqprune prune` only (`{subcommand}` runs every layer at "
                            "once); drop it, or prune with --offload first and fit the saved model")
    for flag, given in (("--finetune", finetune), ("--save_gguf", save_gguf)):
        if given:
            raise GaqpruneError(f"--offload {mode} cannot be combined with {flag} (it needs the whole pruned model in "
                                f"memory); prune with --offload {mode} --save_model, then run {flag} on the saved model")
    if mode == "disk":
        from gaqprune.models.load import resolve_model_path

        path = Path(resolve_model_path(base_model))
        if not path.is_dir() or not safetensors_files(path):
            raise GaqpruneError(f"--offload disk reads the weights from --base_model's safetensors files, and "
                                f"{base_model!r} has none (give a local folder with model.safetensors or a sharded "
                                "index, or use --offload cpu)")


def load_offloaded(base_model: str, dtype: str | torch.dtype, mode: str):
    """``--base_model`` with its decoder layers off the device (``mode`` ``cpu`` or ``disk``), in eval mode."""
    from gaqprune.models.load import load_model, resolve_model_path

    if mode not in MODES[1:]:
        raise GaqpruneError(f"--offload {mode!r} is not accepted; give one of {', '.join(MODES)}")
    if mode == "cpu":
        model = load_model(base_model, dtype=dtype)
        sources = {i: {name: p.detach() for name, p in layer.named_parameters()}
                   for i, layer in enumerate(model.model.layers)}
        _detach_layers(model, mode, sources)
        return model
    check_offload(mode, "prune", False, None, base_model)
    path = Path(resolve_model_path(base_model))
    files = safetensors_files(path)
    model = _empty_model(base_model, dtype)
    state = model.state_dict()
    layer_names = {name for name in state if name.startswith(LAYERS_PREFIX)}
    missing = sorted(name for name in state if name not in files and not _tied(model, name))
    if missing:
        raise GaqpruneError(f"--base_model {base_model!r}: its safetensors files lack {len(missing)} weights the "
                            f"model needs, e.g. {missing[0]!r}")
    from safetensors import safe_open

    for name in sorted(set(state) - layer_names):
        if _tied(model, name) and name not in files:
            continue
        with safe_open(files[name], framework="pt", device="cpu") as f:
            _set(model, name, "cpu", f.get_tensor(name))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    sources = {i: {name: (files[f"{LAYERS_PREFIX}{i}.{name}"], f"{LAYERS_PREFIX}{i}.{name}")
                   for name in _layer_names(model, i)} for i in range(len(model.model.layers))}
    setattr(model, OFFLOAD_ATTR, OffloadStore(model, mode, sources))
    model.config.use_cache = False
    if str(path) != str(base_model):
        model.config._name_or_path = base_model
    return model.eval()


def _tied(model, name: str) -> bool:
    """Whether ``name`` is the LM head tied to the input embeddings (saved once, under the embeddings' name)."""
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _empty_model(base_model: str, dtype: str | torch.dtype):
    """The model ``--base_model`` describes, decoder layers on the meta device, everything else allocated on the CPU
    (to be filled from the files); buffers (rotary tables) computed as ``from_pretrained`` computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from gaqprune.models.load import load_config
    from gaqprune.models.pruned import PRUNED_FAMILIES, pruned_classes, register_pruned_classes

    config = load_config(base_model)
    torch_dtype = resolve_dtype(dtype)
    with init_empty_weights(include_buffers=False):
        if config.model_type in PRUNED_FAMILIES:
            model = pruned_classes(config.model_type)[1]._from_config(config, dtype=torch_dtype)
            register_pruned_classes()
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model


# ------------------------------------------------------------------------------------------------------ saving


def layer_shard_writer(hf_model) -> Callable[[Path], None]:
    """A writer of ``hf_model``'s weights into a folder as ``from_pretrained`` reads them: the embeddings, norm and
    LM head in the first safetensors shard, then one shard per decoder layer, each layer read in, written and
    released before the next (``model.safetensors.index.json`` maps every tensor to its shard)."""

    def write(folder: Path) -> None:
        from safetensors.torch import save_file

        layers = hf_model.model.layers
        shards = len(layers) + 1
        shard = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
        weight_map: dict[str, str] = {}
        total = 0

        def save(tensors: dict[str, torch.Tensor], file: str) -> None:
            nonlocal total
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        rest, seen = {}, set()
        for name, tensor in hf_model.state_dict().items():
            if name.startswith(LAYERS_PREFIX):
                continue
            if tensor.data_ptr() in seen:  # a tied LM head: saved once, under the embeddings' name (as HF does)
                continue
            seen.add(tensor.data_ptr())
            rest[name] = tensor
        save(rest, shard[0])
        for i in range(len(layers)):
            with resident(hf_model, i) as layer:
                save({f"{LAYERS_PREFIX}{i}.{k}": v for k, v in layer.state_dict().items()}, shard[i + 1])
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        generation = getattr(hf_model, "generation_config", None)
        if generation is not None and hf_model.can_generate():
            generation.save_pretrained(folder)

    return write
