"""Text sources, tokenization (once, cached) and fixed-length token windows (``LMDataModule`` serves them).

A source gives two disjoint parts: ``train`` (calibration for importance/Taylor, and fine-tuning)
and ``eval`` (perplexity). Sources:

* ``embedded``: the offline Wikipedia sample (split by article, see ``gaqprune.corpus``);
* ``wikitext2`` / ``ptb`` / ``c4``: the HF datasets used by LLM-Pruner (train vs test/validation); ``c4`` is one
  shard per split, as LLM-Pruner's calibration and the SparseGPT/Wanda c4 perplexity use it (``C4``);
* any hub dataset id with a ``text`` column (``train`` vs ``test``/``validation`` split; of a ``train`` split of
  more than ``C4["train_docs"]`` documents, the same fixed draw as c4's);
* a local ``.txt`` / ``.jsonl`` file: its token stream is cut at ``eval_fraction`` (default 0.1,
  the tail is evaluation); ``eval_fraction 1.0`` evaluates the whole file.

Perplexity follows LLM-Pruner: documents joined by blank lines, tokenized once, non-overlapping
windows of ``max_seq_len`` tokens, the remainder dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gaqprune.errors import GaqpruneError
from gaqprune.models.names import EMBEDDED, cache_root

HF_PRESETS = {
    # name: (dataset path, config, train split, eval split, text column)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "validation", "sentence"),  # as LLM-Pruner evaluates it
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
}
# c4's shards are large (356k training documents, 45k validation ones): LLM-Pruner calibrates on documents drawn at
# random from the first training shard, and the c4 perplexity papers report (SparseGPT, Wanda; LLM-Pruner reports
# none) is the first 1,100 validation documents joined by spaces. Tokenizing whole shards would take minutes and
# tens of GB for no use: a fixed random draw of training documents (about 8M tokens, far more than calibration or
# a fine-tune of this tool's sizes need) and those evaluation documents.
C4 = {"train_docs": 20_000, "seed": 0, "eval_docs": 1_100, "eval_separator": " "}
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{input_clause}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def alpaca_prompt(record: dict, template: str = ALPACA_TEMPLATE) -> str:
    """The Alpaca prompt of one ``{"instruction", "input", "output"}`` record (response not included)."""
    extra = (record.get("input") or "").strip()
    return template.format(
        instruction=record["instruction"].strip(),
        input_clause=", paired with an input that provides further context" if extra else "",
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def instruction_records(source: str) -> list[dict]:
    """Alpaca-style records from a local .json (a list) / .jsonl file or a hub dataset id (train split)."""
    path = Path(source).expanduser()
    if path.suffix.lower() in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise GaqpruneError(f"--data.instruction_data {source!r}: file not found")
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text) if path.suffix.lower() == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise GaqpruneError(f"--data.instruction_data {source!r} is not valid JSON/JSONL ({err})") from None
    else:
        import datasets

        try:
            records = list(datasets.load_dataset(source, split="train"))
        except Exception as err:
            raise GaqpruneError(f"--data.instruction_data {source!r} could not be loaded "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict) or not isinstance(r.get("instruction"), str)
                or not isinstance(r.get("output"), str)), None)
    if not records or bad is not None:
        raise GaqpruneError(f"--data.instruction_data {source!r}: record {bad} needs string 'instruction' and 'output' "
                            "fields (Alpaca format: instruction, input, output)")
    return records


def tokenize_instructions(records: list[dict], tokenizer, seq_len: int, template: str = ALPACA_TEMPLATE):
    """``(input_ids, attention_mask, labels)`` with the loss on response tokens only, padded to ``seq_len``."""
    n = len(records)
    ids = torch.full((n, seq_len), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros((n, seq_len), dtype=torch.int64)
    labels = torch.full((n, seq_len), -100, dtype=torch.int64)
    for i, record in enumerate(records):
        prompt = tokenizer(alpaca_prompt(record, template), add_special_tokens=True)["input_ids"]
        answer = tokenizer(record["output"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens = (prompt + answer)[:seq_len]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        labels[i, len(prompt) : len(tokens)] = torch.tensor(tokens[len(prompt) :], dtype=torch.int64)
    return ids, mask, labels


def is_local(source: str) -> bool:
    return Path(source).suffix.lower() in TEXT_SUFFIXES or Path(source).expanduser().exists()


def resolved_source(source: str) -> str:
    """One name per text source: a local file's resolved path (so one file reached by two paths is one source)."""
    return str(Path(source).expanduser().resolve()) if is_local(source) else source


def check_local_source(source: str | None) -> None:
    """Read a local text source once to refuse a missing, binary, empty or malformed file before a model is loaded
    (hub datasets are checked when loaded)."""
    if source and source != EMBEDDED and is_local(source):
        _source_key(source)
        _read_local(Path(source).expanduser())


def _read_local(path: Path) -> str:
    if not path.is_file():
        raise GaqpruneError(f"--data.source {str(path)!r}: file not found")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise GaqpruneError(f"--data.source {str(path)!r} looks binary; give a UTF-8 .txt or .jsonl file")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GaqpruneError(f"--data.source {str(path)!r} is not UTF-8 text; give a UTF-8 .txt or .jsonl file") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise GaqpruneError(f"--data.source {str(path)!r} line {n} is not JSON; JSONL needs one object a line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GaqpruneError(f"--data.source {str(path)!r} line {n} has no string 'text' field")
            docs.append(record["text"])
        content = "\n\n".join(docs)
    if not content.strip():
        raise GaqpruneError(f"--data.source {str(path)!r} is empty; give a file with text in it")
    return content


def _hf_texts(source: str) -> tuple[list[str], list[str]]:
    import datasets

    name, config, train_split, eval_split, column = HF_PRESETS.get(source, (source, None, "train", None, "text"))
    try:
        if eval_split is None:  # a hub id: take its test or validation split
            available = datasets.get_dataset_split_names(name, config)
            eval_split = next((s for s in ("test", "validation") if s in available), None)
            if eval_split is None:
                raise GaqpruneError(f"--data.source {source!r} has no test/validation split (has {available})")
        if source == "c4":  # LLM-Pruner: one shard of each split, not the whole corpus
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
            ds = datasets.load_dataset(name, data_files=files)
        else:
            ds = datasets.load_dataset(name, config)
    except GaqpruneError:
        raise
    except Exception as err:  # network, unknown id, missing split: all one message for the user
        raise GaqpruneError(
            f"--data.source {source!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"use 'embedded', {', '.join(HF_PRESETS)}, a hub dataset id with a text column, or a .txt/.jsonl file"
        ) from None
    if column not in ds[train_split].column_names:
        raise GaqpruneError(f"--data.source {source!r} has no {column!r} column (has {ds[train_split].column_names})")
    train, evaluation = ds[train_split], ds[eval_split]
    if len(train) > C4["train_docs"] and source not in ("wikitext2", "ptb"):  # (their "documents" are lines)
        # c4 and any large hub dataset: a fixed draw, in the split's order so the joined text does not depend on the
        # draw's order; tokenizing millions of documents would take hours and tens of GB for no use
        rank_zero_info(f"{source}: calibrating/training on a fixed draw of {C4['train_docs']:,} of the "
                       f"{len(train):,} {train_split} documents")
        train = train.select(sorted(random.Random(C4["seed"]).sample(range(len(train)), C4["train_docs"])))
    if source == "c4":
        evaluation = evaluation.select(range(min(len(evaluation), C4["eval_docs"])))
    return list(train[column]), list(evaluation[column])


def source_texts(source: str) -> tuple[str, str] | str:
    """Raw text of a source: ``(train, eval)`` joined documents, or one string for a local file."""
    if source == EMBEDDED:
        from gaqprune.data.corpus import embedded_articles

        parts = embedded_articles(cache_root())
        return "\n\n".join(parts["train"]), "\n\n".join(parts["eval"])
    if is_local(source):
        return _read_local(Path(source).expanduser())
    train, evaluation = _hf_texts(source)
    # wikitext/ptb lines are already split; LLM-Pruner joins them with blank lines (c4's evaluation: see C4)
    return "\n\n".join(train), (C4["eval_separator"] if source == "c4" else "\n\n").join(evaluation)


def _tokenize(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes when the tokenizer would produce different ids."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 4096)]) + f"{len(vocab)}:{tokenizer.bos_token_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_key(source: str) -> str:
    if is_local(source):
        p = Path(resolved_source(source))
        if not p.is_file():
            raise GaqpruneError(f"--data.source {source!r}: file not found" if p.suffix.lower() in TEXT_SUFFIXES
                                else f"--data.source {source!r} is not a file; give a .txt/.jsonl file or a dataset name")
        st = p.stat()
        return f"file:{p}:{st.st_size}:{int(st.st_mtime)}"
    if source in ("wikitext2", "ptb"):
        return f"source:{source}"
    return f"source:{source}:{json.dumps(C4, sort_keys=True)}"  # c4 and other hub ids: their cut (see _hf_texts)


def token_streams(source: str, tokenizer, eval_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Token ids of a source's ``train`` and ``eval`` parts, tokenized once and cached on disk."""
    if not 0.0 < eval_fraction <= 1.0:
        raise GaqpruneError(f"--data.eval_fraction {eval_fraction} must be in (0, 1]")
    key = hashlib.sha256(f"{_source_key(source)}|{tokenizer_fingerprint(tokenizer)}|v1".encode()).hexdigest()[:20]
    cache = cache_root() / "tokens" / f"{key}.pt"
    if cache.is_file():
        streams = torch.load(cache)
    else:
        rank_zero_info(f"tokenizing {source} (once; cached in {cache.parent})")
        texts = source_texts(source)
        if isinstance(texts, str):
            streams = {"all": _tokenize(texts, tokenizer)}
        else:
            streams = {"train": _tokenize(texts[0], tokenizer), "eval": _tokenize(texts[1], tokenizer)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{id(streams)}")
        torch.save(streams, tmp)
        tmp.replace(cache)
    if "all" in streams:  # a local file: the tail is evaluation text, the head calibration/training
        ids = streams["all"]
        cut = int(round(len(ids) * (1.0 - eval_fraction)))
        return {"train": ids[:cut], "eval": ids[cut:]}
    return streams


def make_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]`` of a token stream; the remainder is dropped."""
    if seq_len < 2:
        raise GaqpruneError(f"sequence length {seq_len} is too short; use at least 2 tokens")
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def sample_windows(ids: torch.Tensor, seq_len: int, n: int, seed: int, what: str) -> torch.Tensor:
    """``n`` distinct windows drawn (reproducibly, by ``seed``) from a stream's windows."""
    windows = make_windows(ids, seq_len)
    if n > len(windows):
        raise GaqpruneError(
            f"{what} {n} asks for more windows of {seq_len} tokens than the calibration text holds "
            f"({len(windows)}); lower it or use a larger --data.source"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n]
    return windows[order.sort().values]



