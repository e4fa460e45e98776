"""gaqprune: GQA-aware, layer-wise unbalanced structured pruning for Llama-family LLMs."""

from gaqprune.errors import GaqpruneError
from gaqprune.version import __version__

__all__ = ["GaqpruneError", "__version__", "load_model", "load_pruned", "perplexity", "prune", "save_pretrained"]


def __getattr__(name):  # lazy: importing the package must stay cheap (no torch at import)
    if name in ("prune", "perplexity", "save_pretrained"):
        from gaqprune import api

        return getattr(api, name)
    if name == "load_model":
        from gaqprune.models.load import load_model

        return load_model
    if name == "load_pruned":
        from gaqprune.models.pruned import load_pruned

        return load_pruned
    raise AttributeError(name)
