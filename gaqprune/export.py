"""Pruned checkpoints (placeholder until the checkpoint module lands)."""



def is_pruned_checkpoint(path) -> bool:
    return False
