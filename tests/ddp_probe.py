"""A callback for the DDP test: each rank writes what its model looks like after pruning."""

import hashlib
import json
import os

import lightning as L
import torch


class ShapeProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        from gaqprune.core.units import layer_shapes

        digest = hashlib.sha256()
        for name, p in sorted(pl_module.model.named_parameters()):
            if "lora_" not in name:
                digest.update(name.encode())
                digest.update(p.detach().to(torch.float32).cpu().numpy().tobytes())
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            teacher = pl_module._teacher
            json.dump({"world": trainer.world_size, "shapes": layer_shapes(pl_module.model), "sha": digest.hexdigest(),
                       "teacher_shapes": None if teacher is None else layer_shapes(teacher)}, f)

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.steps"), "w") as f:
            f.write(str(trainer.global_step))
