"""GPU-only checks (skipped without CUDA): prune in setup, then LoRA under FSDP with bf16-mixed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_llama
from torch.utils.data import DataLoader, TensorDataset

from gaqprune.core.units import layer_shapes
from gaqprune.settings import ImportanceSettings, PruneSettings
from gaqprune.train.callbacks import GQAPrune, LayerImportance
from gaqprune.train.module import LitCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class RandomTokens(L.LightningDataModule):
    """Random-token windows with the two things the pruning callbacks read (source, calibration_windows)."""

    source = "random"

    def __init__(self, vocab: int = 256, seq_len: int = 32):
        super().__init__()
        self.data = torch.randint(3, vocab, (64, seq_len), generator=torch.Generator().manual_seed(0))

    def calibration_windows(self, n, seq_len, seed=None, what=""):
        return torch.randint(3, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed or 0))

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.data), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.data[:16]), batch_size=8)


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_fsdp_lora_after_pruning_in_setup(tmp_path, distill_weight):
    tiny_llama(layers=4).save_pretrained(tmp_path / "tiny")
    lit = LitCausalLM(base_model=str(tmp_path / "tiny"), lora_r=4, learning_rate=1e-3, distill_weight=distill_weight)
    prune = PruneSettings(pruning_ratio=0.3, min_pruning_rate=0.1, num_examples=4, max_seq_len=32)
    importance = LayerImportance(ImportanceSettings(importance_samples=4, importance_seq_len=32), prune, "tiny")
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy="fsdp", precision="bf16-mixed", max_steps=4,
                        callbacks=[importance, GQAPrune(prune, importance)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=RandomTokens())
    shapes = layer_shapes(lit.model)
    assert any(s["intermediate_size"] < 128 or s["num_key_value_heads"] < 2 for s in shapes)  # really pruned
    trained = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train_loss"])))
