"""The Lightning datamodule: token windows for calibration, LoRA training and perplexity evaluation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from gaqprune.data.text import (
    ALPACA_TEMPLATE,
    check_local_source,
    instruction_records,
    is_local,
    make_windows,
    resolved_source,
    sample_windows,
    token_streams,
    tokenize_instructions,
)
from gaqprune.errors import GaqpruneError
from gaqprune.models.names import EMBEDDED


class EvalWindows(Dataset):
    """Evaluation windows as ``(window, real)`` pairs. Index ``n + i`` (``n`` windows) is window ``i`` again with
    ``real`` False: the padding a distributed sampler needs, which the loss must not count."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.windows)
        return self.windows[index % n], torch.tensor(index < n)


class PaddedEvalSampler(DistributedSampler):
    """Shards ``EvalWindows`` over ranks in order. Like ``DistributedSampler``, it pads every rank to the same number
    of windows, so ranks run the same number of steps (FSDP gathers weights in every forward); unlike it, the padding
    is marked (``EvalWindows``), so every window counts exactly once in the perplexity."""

    def __init__(self, dataset: EvalWindows, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        n = len(self.dataset)
        indices = list(range(n)) + [n + i % n for i in range(self.total_size - n)]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class LMDataModule(L.LightningDataModule):
    """Token windows for calibration, LoRA training and perplexity evaluation."""

    def __init__(
        self,
        source: str = EMBEDDED,
        eval_source: str | None = None,
        tokenizer: str = EMBEDDED,
        max_seq_len: int = 128,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        max_eval_windows: int | None = None,
        eval_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 42,
        instruction_data: str | None = None,
        prompt_template: str = ALPACA_TEMPLATE,
    ):
        """
        Args:
            source: calibration/training text: ``embedded``, ``wikitext2``, ``ptb``, ``c4``, a hub
                dataset id with a text column, or a local ``.txt``/``.jsonl`` file.
            eval_source: evaluation text (default: the evaluation part of ``source``).
            tokenizer: model whose tokenizer to use (set from ``--base_model``).
            max_seq_len: window length for evaluation and fine-tuning (LLM-Pruner reports 128 and 2048).
            batch_size: training batch size (windows).
            eval_batch_size: evaluation batch size (windows).
            max_eval_windows: evaluate only the first N windows (None: all).
            eval_fraction: share of a local file's tokens (its tail) used for evaluation; 1.0 = all.
            num_workers: DataLoader workers.
            seed: seed for drawing and shuffling the fine-tune's training windows (the pruning's calibration
                windows follow ``--seed``).
            instruction_data: fine-tune on Alpaca-style records (a .json list, a .jsonl file or a hub id with
                instruction/input/output) instead of plain text windows; the loss covers response tokens only.
            prompt_template: Python format string of the prompt ({instruction}, {input_clause}, {input_block}).
        """
        super().__init__()
        self.save_hyperparameters()
        self.source = source
        self.eval_source = eval_source or source
        self.tokenizer_name = tokenizer
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_eval_windows = max_eval_windows
        self.eval_fraction = eval_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.instruction_data = instruction_data
        self.prompt_template = prompt_template
        self._tokenizer = None
        self._streams: dict[str, dict[str, torch.Tensor]] = {}
        self.train_windows_limit: int | None = None  # set by the fine-tune settings (finetune_samples)

    @staticmethod
    def check_args(data: dict, trains: bool) -> None:
        """``--data.*`` before anything is loaded: window and batch sizes, the evaluated share of a text file, local
        text files (read once: missing, binary, empty or malformed ones are refused), and, when a fine-tune will read
        it, the instruction data file."""
        for flag, low in (("max_seq_len", 2), ("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0)):
            if data[flag] < low:
                raise GaqpruneError(f"--data.{flag} {data[flag]} is invalid; give an integer >= {low}")
        if not 0.0 < data["eval_fraction"] <= 1.0:
            raise GaqpruneError(f"--data.eval_fraction {data['eval_fraction']} is invalid; give the share of a text "
                                "file evaluated, in (0, 1] (1.0: all of it)")
        if data["max_eval_windows"] is not None and data["max_eval_windows"] < 1:
            raise GaqpruneError(f"--data.max_eval_windows {data['max_eval_windows']} is invalid; give a count >= 1, or "
                                "null for every window")
        if trains and data["instruction_data"] and not Path(data["instruction_data"]).expanduser().is_file():
            raise GaqpruneError(f"--data.instruction_data {data['instruction_data']!r}: file not found")
        check_local_source(data["source"])
        check_local_source(data["eval_source"])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gaqprune.models.load import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def streams(self, source: str) -> dict[str, torch.Tensor]:
        key = resolved_source(source)
        if key not in self._streams:
            # A file used only for evaluation is evaluated whole, unless it also calibrates (under any spelling of
            # its path): then only its tail is evaluated, so calibration and evaluation text never overlap.
            fraction = self.eval_fraction
            if is_local(source) and key != resolved_source(self.source):
                fraction = 1.0
            self._streams[key] = token_streams(source, self.tokenizer, fraction)
        return self._streams[key]

    def calibration_windows(self, n: int, seq_len: int, seed: int | None = None, what: str = "--num_examples"):
        """``n`` windows of ``seq_len`` tokens from the calibration (train) part of ``source``."""
        return sample_windows(self.streams(self.source)["train"], seq_len, n, self.seed if seed is None else seed, what)

    def eval_windows(self) -> torch.Tensor:
        windows = make_windows(self.streams(self.eval_source)["eval"], self.max_seq_len)
        if self.max_eval_windows is not None:
            windows = windows[: self.max_eval_windows]
        if len(windows) == 0:
            raise GaqpruneError(
                f"--data.eval_source {self.eval_source!r} holds no full window of {self.max_seq_len} tokens; "
                "give more text or a smaller --data.max_seq_len"
            )
        return windows

    def train_windows(self) -> torch.Tensor:
        windows = make_windows(self.streams(self.source)["train"], self.max_seq_len)
        if self.train_windows_limit is not None and self.train_windows_limit > len(windows):
            rank_zero_info(f"note: --finetune_samples {self.train_windows_limit}: {self.source} holds {len(windows)} "
                           f"training windows of {self.max_seq_len} tokens; training on all of them")
        if self.train_windows_limit is not None:
            windows = sample_windows(
                self.streams(self.source)["train"], self.max_seq_len, min(self.train_windows_limit, len(windows)),
                self.seed, "--finetune_samples",
            )
        return windows

    def num_train_examples(self) -> int:
        """How many training examples ``setup("fit")`` will make (windows or instruction records)."""
        if self.instruction_data:
            n = len(instruction_records(self.instruction_data))
        else:
            n = len(make_windows(self.streams(self.source)["train"], self.max_seq_len))
        return n if self.train_windows_limit is None else min(n, self.train_windows_limit)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.instruction_data:
            records = instruction_records(self.instruction_data)
            if self.train_windows_limit is not None and len(records) > self.train_windows_limit:
                order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed))
                records = [records[i] for i in order[: self.train_windows_limit].sort().values]
            self._train = TensorDataset(*tokenize_instructions(records, self.tokenizer, self.max_seq_len,
                                                               self.prompt_template))
        elif stage == "fit":
            self._train = TensorDataset(self.train_windows())
        if stage in ("fit", "validate", "test"):
            self._eval = EvalWindows(self.eval_windows())

    def train_dataloader(self):
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None if world == 1 else PaddedEvalSampler(self._eval, world, self.trainer.global_rank)
        return DataLoader(self._eval, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers)

    def test_dataloader(self):
        return self.val_dataloader()
