"""Lightning: the LightningModule, the pruning callbacks, the prune job (with its fine-tune) and LoRA adapters."""
