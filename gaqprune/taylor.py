"""First-order Taylor importance of GQA groups and MLP channels: sum of |w * dL/dw| over what a unit owns.

One accumulated backward pass over all calibration windows gives the gradients of every selected
layer at once (the guide's script ran a pass per layer). Only the decoder-layer Linear weights of the
selected layers require grad, so embeddings / LM head hold no gradient memory, and each module's
gradient is turned into unit scores (in row chunks) and freed right after.
"""

from __future__ import annotations

import torch
from torch import nn

from gaqprune import units
from gaqprune.errors import GaqpruneError
from gaqprune.metrics import causal_nll

CHUNK_ELEMENTS = 1 << 22  # elements of |w * g| (float32) materialised at once when reducing a weight: 16 MB
# The backward runs on the summed NLL scaled to this many tokens (not on the mean): with the mean, weight gradients
# of a float16 model fall below its smallest normal number (6e-5) and lose precision; scores are rescaled after.
LOSS_TOKENS = 1024


def unit_scores_from_grads(layer: nn.Module, kind: str) -> torch.Tensor:
    """Per-unit sum of |w * grad| for one layer (grads must be populated); float64 on the weight's device."""
    owners = units.owners(layer, kind)
    device = units.linear(layer, owners[0].path).weight.device
    scores = torch.zeros(units.unit_count(layer, kind), dtype=torch.float64, device=device)
    for owner in owners:
        lin = units.linear(layer, owner.path)
        unit_of = owner.unit_of.to(device)
        # Reduce over the dimension the unit does not own, chunk by chunk, so no full-size temporary exists: one
        # float32 chunk (a bf16/fp16 product is exact in float32), summed in float64.
        rows = max(1, CHUNK_ELEMENTS // lin.weight.shape[1])
        for start in range(0, lin.weight.shape[0], rows):
            contrib = lin.weight[start : start + rows].detach().to(torch.float32, copy=True)
            contrib.mul_(lin.weight.grad[start : start + rows]).abs_()
            if owner.dim == 0:
                scores.index_add_(0, unit_of[start : start + rows], contrib.sum(1, dtype=torch.float64))
            else:
                scores.index_add_(0, unit_of, contrib.sum(0, dtype=torch.float64))
            del contrib
        if owner.dim == 0 and lin.bias is not None and lin.bias.grad is not None:
            scores.index_add_(0, unit_of, (lin.bias.detach().double() * lin.bias.grad.double()).abs())
    return scores


def _prunable_linears(layer: nn.Module) -> list[nn.Linear]:
    return [units.linear(layer, o.path) for kind in (units.ATTENTION, units.MLP) for o in units.owners(layer, kind)]


def taylor_scores(hf_model, windows: torch.Tensor, layers: list[int], batch_size: int = 4,
                  progress: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Taylor scores ``{layer: {"attention": [groups], "mlp": [channels]}}`` (float64, CPU) for ``layers``.

    The loss is the mean next-token NLL over all ``windows``; micro-batches of ``batch_size`` windows
    accumulate into the same gradients (one backward per micro-batch, the sum equals one big pass).
    """
    from tqdm.auto import tqdm

    decoder = hf_model.model.layers
    params = list(hf_model.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = hf_model.training
    device = next(hf_model.parameters()).device
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for idx in layers:
            for lin in _prunable_linears(decoder[idx]):
                for p in lin.parameters():
                    p.requires_grad_(True)
        hf_model.eval()  # no dropout: scores must be deterministic
        total_tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        loss_scale = min(1.0, LOSS_TOKENS / total_tokens)  # backward of loss_scale * summed NLL (see LOSS_TOKENS)
        batches = range(0, len(windows), batch_size)
        with torch.enable_grad():
            for start in tqdm(batches, desc="Taylor scores", disable=not progress, leave=False):
                ids = windows[start : start + batch_size].to(device)
                nll, _ = causal_nll(hf_model, ids)
                if not torch.isfinite(nll):
                    raise GaqpruneError(f"the Taylor pass produced a {nll.item()} loss on calibration windows "
                                        f"{start}..{start + len(ids) - 1}; the model is numerically broken (try --dtype float32)")
                (nll * loss_scale).backward()
        scores: dict[int, dict[str, torch.Tensor]] = {}
        for idx in layers:
            layer = decoder[idx]
            # rescaled to the gradients of the mean NLL over all windows
            scores[idx] = {kind: unit_scores_from_grads(layer, kind).cpu() / (loss_scale * total_tokens)
                           for kind in (units.ATTENTION, units.MLP)}
            if not all(torch.isfinite(v).all() for v in scores[idx].values()):
                raise GaqpruneError(f"Taylor scores of layer {idx} are not finite (NaN/inf gradients); try --dtype float32")
            for lin in _prunable_linears(layer):
                for p in lin.parameters():
                    p.grad = None  # free this layer's gradient memory before reducing the next
        return scores
    finally:
        for p, flag in zip(params, saved_flags):
            p.grad = None
            p.requires_grad_(flag)
        hf_model.train(was_training)
