"""A callback for tests: the job is sent SIGTERM (as a scheduler pre-empting it would) after a given training step."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigtermAt(Callback):
    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class FailAtStart(Callback):
    """An error before the first optimizer step (as a CUDA out-of-memory at the first batch would be)."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("simulated failure before training")


class SigintAt(SigtermAt):
    """Ctrl-C in the terminal after a given training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class FailOnRank(Callback):
    """An error on one rank only (as an out-of-memory on one GPU would be) after a given training step."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"simulated failure on rank {self.rank}")
