"""First-order Taylor importance of GQA groups and MLP channels: sum of |w * dL/dw| over what a unit owns.

One backward pass over all calibration windows gives the gradients of every selected layer (the guide's
script ran a pass per layer). Only the decoder-layer Linear weights of the selected layers require grad, and
each layer's gradient is turned into unit scores (in row chunks) and freed before the next layer's exists.

The backward runs **layer by layer** ("streamed"): a no-grad forward caches every layer's input, the loss's
gradient is taken at the last layer's output, and each layer, from the last down to the first selected one,
recomputes its forward from its cached input and backpropagates the gradient it receives, micro-batch by
micro-batch. Only one layer's weight gradients exist at a time, so peak memory is the weights + one layer's
gradients + the cached hidden states (tokens x hidden per layer) instead of the weights + the gradients of every
selected layer (1.85x the bf16 weights of an 8B model, which does not fit a 24 GB GPU). It costs one extra
forward. When those gradients are small anyway (under 1 GiB), or the hidden-state cache would outgrow them (very
long calibration sets), the plain accumulated backward over the whole model is used instead; both give the same
scores.
"""

from __future__ import annotations

import torch
from torch import nn

from gaqprune.core import units
from gaqprune.core.layers import batch_layer_inputs, call_layer, micro_batches, offload_store, resident
from gaqprune.core.metrics import causal_nll, tail_nll
from gaqprune.errors import GaqpruneError

CHUNK_ELEMENTS = 1 << 22  # elements of |w * g| (float32) materialised at once when reducing a weight: 16 MB
# The backward runs on the summed NLL scaled to this many tokens (not on the mean): with the mean, weight gradients
# of a float16 model fall below its smallest normal number (6e-5) and lose precision; scores are rescaled after.
LOSS_TOKENS = 1024
METHODS = ("auto", "streamed", "accumulated")
# Up to this many bytes of gradients (a model of a few hundred million parameters), keeping them all costs no memory
# that matters, and the accumulated backward saves the streamed one's extra forward (1.1-1.6x the Taylor time).
SMALL_GRADIENTS = 1 << 30


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


def memory_estimate(hf_model, windows: torch.Tensor, layers: list[int]) -> dict[str, int]:
    """Bytes each method keeps besides the weights and one micro-batch's activations: ``streamed`` the hidden-state
    cache (plus one layer's gradients), ``accumulated`` the gradients of every selected layer."""
    decoder = hf_model.model.layers
    weight = next(hf_model.parameters())
    element = weight.element_size()
    width = hf_model.config.hidden_size
    grads = {idx: sum(p.numel() for lin in _prunable_linears(decoder[idx]) for p in lin.parameters()) * element
             for idx in layers}
    # layer inputs from the first selected layer on, the last layer's output and its gradient
    cached = windows.numel() * width * element * (len(decoder) - min(layers) + 2)
    return {"streamed": cached + max(grads.values()), "accumulated": sum(grads.values())}


def taylor_scores(hf_model, windows: torch.Tensor, layers: list[int], batch_size: int = 4, progress: bool = False,
                  method: str = "auto") -> dict[int, dict[str, torch.Tensor]]:
    """Taylor scores ``{layer: {"attention": [groups], "mlp": [channels]}}`` (float64, CPU) for ``layers``.

    The loss is the mean next-token NLL over all ``windows`` (micro-batches of ``batch_size`` windows accumulate
    into the same gradients: the sum equals one big pass). ``method``: ``streamed`` (layer by layer, one layer's
    gradients at a time), ``accumulated`` (one backward through the whole model, every selected layer's gradients
    at once) or ``auto``: ``accumulated`` while its gradients are small (``SMALL_GRADIENTS``), otherwise the one of
    the two that keeps fewer bytes (``memory_estimate``).
    """
    if method not in METHODS:
        raise GaqpruneError(f"Taylor method {method!r} is not one of {', '.join(METHODS)}")
    if not layers:
        return {}
    if offload_store(hf_model) is not None:
        if method == "accumulated":
            raise GaqpruneError("the accumulated Taylor backward needs every layer on the device at once; an offloaded "
                                "model is scored with the streamed one (method 'streamed' or 'auto')")
        method = "streamed"  # the only one that needs a single layer on the device
    if method == "auto":
        estimate = memory_estimate(hf_model, windows, layers)
        cheap = estimate["accumulated"] <= max(SMALL_GRADIENTS, estimate["streamed"])
        method = "accumulated" if cheap else "streamed"
    decoder = hf_model.model.layers
    params = list(hf_model.parameters())
    # by name: an offloaded layer's parameters are new objects each time it is read in
    saved_flags = {name: p.requires_grad for name, p in hf_model.named_parameters()}
    was_training = hf_model.training
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
        # backward of loss_scale * summed NLL (see LOSS_TOKENS); scores are rescaled to the mean NLL's gradients
        loss_scale = min(1.0, LOSS_TOKENS / total_tokens)
        scores: dict[int, dict[str, torch.Tensor]] = {}

        def score(idx: int) -> None:  # this layer's gradients are complete: reduce them to unit scores, free them
            layer = decoder[idx]
            scores[idx] = {kind: unit_scores_from_grads(layer, kind).cpu() / (loss_scale * total_tokens)
                           for kind in (units.ATTENTION, units.MLP)}
            if not all(torch.isfinite(v).all() for v in scores[idx].values()):
                raise GaqpruneError(f"Taylor scores of layer {idx} are not finite (NaN/inf gradients); try --dtype float32")
            for lin in _prunable_linears(layer):
                for p in lin.parameters():
                    p.grad = None

        backward = _streamed if method == "streamed" else _accumulated
        backward(hf_model, windows, sorted(layers), batch_size, loss_scale, score, progress)
        return {idx: scores[idx] for idx in layers}
    finally:
        for name, p in hf_model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_flags[name])
        hf_model.train(was_training)


def _check_loss(nll: torch.Tensor, first: int, count: int) -> None:
    if not torch.isfinite(nll):
        raise GaqpruneError(f"the Taylor pass produced a {nll.item()} loss on calibration windows "
                            f"{first}..{first + count - 1}; the model is numerically broken (try --dtype float32)")


def _accumulated(hf_model, windows, layers, batch_size, loss_scale, score, progress) -> None:
    """One backward per micro-batch through the whole model; every selected layer's gradients are kept until the end."""
    from tqdm.auto import tqdm

    device = next(hf_model.parameters()).device
    with torch.enable_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="Taylor scores", disable=not progress, leave=False):
            ids = windows[start : start + batch_size].to(device)
            nll, _ = causal_nll(hf_model, ids)
            _check_loss(nll, start, len(ids))
            (nll * loss_scale).backward()
    for idx in layers:
        score(idx)


def _streamed(hf_model, windows, layers, batch_size, loss_scale, score, progress) -> None:
    """Layer-by-layer backward from cached layer inputs; a layer is scored as soon as its gradients are complete.

    Both sweeps go layer by layer over all micro-batches, so an offloaded layer is read twice (once up, once down)."""
    from tqdm.auto import tqdm

    decoder = hf_model.model.layers
    device = next(hf_model.parameters()).device
    first, selected = layers[0], set(layers)
    batches = micro_batches(windows, batch_size, device)
    # inputs[b]: the inputs of layers first.. for micro-batch b (popped from the end as the backward descends)
    hidden, layer_kwargs = (list(column) for column in zip(*batch_layer_inputs(hf_model, batches)))
    inputs: list[list[torch.Tensor]] = [[] for _ in batches]
    with tqdm(total=len(batches) * (2 * len(decoder) - first + 1), desc="Taylor scores", disable=not progress,
              leave=False) as bar, torch.no_grad():
        for idx in range(len(decoder)):
            with resident(hf_model, idx) as layer:
                for b in range(len(batches)):
                    if idx >= first:
                        inputs[b].append(hidden[b])
                    hidden[b] = call_layer(layer, hidden[b], layer_kwargs[b])
                    bar.update(1)
        with torch.enable_grad():
            grads = []  # d(loss) / d(output of the current layer), per micro-batch
            for b, ids in enumerate(batches):
                out = hidden[b].requires_grad_()
                nll = tail_nll(hf_model, out, ids)
                _check_loss(nll, b * batch_size, len(ids))
                (nll * loss_scale).backward()
                grads.append(out.grad)
                hidden[b] = None
                bar.update(1)
            for idx in range(len(decoder) - 1, first - 1, -1):
                with resident(hf_model, idx) as layer:
                    for b in range(len(batches)):
                        state = inputs[b].pop().requires_grad_(idx > first)  # no input gradient below the first layer
                        call_layer(layer, state, layer_kwargs[b]).backward(grads[b])
                        grads[b] = state.grad
                        bar.update(1)
                    if idx in selected:
                        score(idx)
