"""The layer-importance record: ``layer_importance_config.json``, written by a run and reused by later ones.

The record says everything needed to judge reuse (model fingerprint, layer count, method, data, range);
``load_importance`` refuses a record that does not fit the run with one line naming ``--importance_config``.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone

from gaqprune.atomic import write_json
from gaqprune.core.importance import ImportanceScores
from gaqprune.errors import GaqpruneError
from gaqprune.version import __version__

RECORD_FORMAT = "gaqprune.layer_importance"
RECORD_VERSION = 1
# Keys ``importance_record`` needs in ``meta``; ``dense_perplexity``, ``dtype`` and ``created`` are optional.
REQUIRED_META = ("base_model", "model_fingerprint", "num_layers", "method", "samples", "seq_len", "data_source",
                 "layer_start", "layer_end", "seed")
FLAG = "--importance_config"

def importance_record(scores: dict[int, float], meta: dict) -> dict:
    """The JSON-serialisable ``layer_importance_config.json`` record of ``scores`` measured as ``meta`` says.

    ``meta`` needs ``REQUIRED_META`` (``layer_end`` may be None = all layers); ``dense_perplexity``
    (removal; taken from ``scores.dense_perplexity`` when absent), ``dtype`` and ``created`` are
    optional. Everything but ``created`` is a function of the inputs, so equal inputs give equal bytes.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"importance_record: meta lacks {', '.join(missing)}")
    layer_end = meta["num_layers"] if meta["layer_end"] is None else meta["layer_end"]
    wanted = set(range(meta["layer_start"], layer_end))
    if set(scores) != wanted:
        raise ValueError(f"importance_record: scores cover layers {sorted(scores)}, meta says {meta['layer_start']}..{layer_end}")
    dense = meta.get("dense_perplexity", getattr(scores, "dense_perplexity", None))
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "gaqprune_version": __version__,
        "base_model": str(meta["base_model"]),
        "model_fingerprint": str(meta["model_fingerprint"]),
        "num_layers": int(meta["num_layers"]),
        "method": str(meta["method"]),
        "samples": int(meta["samples"]),
        "seq_len": int(meta["seq_len"]),
        "data_source": str(meta["data_source"]),
        "seed": None if meta["seed"] is None else int(meta["seed"]),
        "dtype": None if meta.get("dtype") is None else str(meta["dtype"]).replace("torch.", ""),
        "layer_start": int(meta["layer_start"]),
        "layer_end": int(layer_end),
        "dense_perplexity": None if dense is None else float(dense),
        "scores": {str(layer): float(scores[layer]) for layer in sorted(scores)},
        "created": meta.get("created") or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def save_importance(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` atomically as key-sorted JSON (equal records give byte-identical files)."""
    write_json(path, record)


def _refuse(path, problem: str) -> GaqpruneError:
    return GaqpruneError(
        f"{FLAG} {str(path)!r}: {problem}; rerun the layer importance analysis (drop --skip_importance_analysis)"
    )


def load_importance(path: str | os.PathLike, expected: dict) -> dict[int, float]:
    """Scores of a saved record for the requested layer range, after checking it fits this run.

    ``expected`` may hold ``num_layers``, ``model_fingerprint``, ``layer_start``, ``layer_end``
    (None = ``num_layers``) and any other record field (e.g. ``method``) that must match. Refuses,
    with a ``GaqpruneError`` naming ``--importance_config``, the path and found vs expected, a
    missing file, unreadable or corrupted JSON, another model or layer count, or scores that do
    not cover the range. Returns an ``ImportanceScores`` dict of the range's layers.
    """
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise _refuse(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(path, f"cannot be read ({type(err).__name__})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise _refuse(path, f"is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("scores"), dict):
        raise _refuse(path, "is not a gaqprune layer importance record (no 'format'/'scores')")
    version = record.get("format_version", RECORD_VERSION)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise _refuse(path, f"has format_version {version!r}; this gaqprune reads records up to version {RECORD_VERSION} "
                            "(written by a newer gaqprune?)")
    try:
        scores = {int(k): float(v) for k, v in record["scores"].items()}
    except (TypeError, ValueError):
        raise _refuse(path, "has corrupted scores (keys must be layer indices, values numbers)") from None
    bad = [layer for layer, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise _refuse(path, f"has non-finite scores for layers {bad}")

    for key, want in expected.items():
        if key in ("layer_start", "layer_end") or want is None:
            continue
        if record.get(key) != want:
            raise _refuse(path, f"{key} differs: found {record.get(key)!r}, expected {want!r} (a different model or setup)")
    num_layers = expected.get("num_layers", record.get("num_layers"))
    start = expected.get("layer_start")
    start = 0 if start is None else start
    end = expected.get("layer_end")
    end = num_layers if end is None else end
    if end is None:  # no layer count anywhere: return what the record holds
        wanted = sorted(scores)
    else:
        wanted = list(range(start, end))
        missing = [layer for layer in wanted if layer not in scores]
        if missing:
            raise _refuse(
                path,
                f"holds scores for layers {min(scores, default=0)}..{max(scores, default=-1)}, "
                f"expected layers {start}..{end - 1} (missing {missing})",
            )
    return ImportanceScores({layer: scores[layer] for layer in wanted}, str(record.get("method")), record.get("dense_perplexity"))

