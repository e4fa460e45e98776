"""ReplaceMe (Shopkhoev et al., 2025): depth pruning with one linear map folded into the block before the cut.

Follows the official code, github.com/mts-ai/ReplaceMe at commit 5bb71d99da40c8b0ba0df488589e14d77ced7fee
(``ReplaceMe/distance.py``, ``ReplaceMe/utils.py``, ``ReplaceMe/lstsq.py``, ``ReplaceMe/cosine_dist.py``).

Notation: ``h_l`` is the residual stream leaving decoder layer ``l`` (0-based; HF's ``outputs.hidden_states[l + 1]``,
whose last entry HF returns after the final norm, as the official code uses it), ``M_l`` the output of layer ``l``'s
MLP (``down_proj``, before the residual add), so ``h_l = Y_l + M_l`` with ``Y_l`` the stream after attention.

1. Distance (``distance.py`` / ``utils.compute_block_distances``): for a span of ``n`` layers ``s .. s+n-1``
   (``s >= 1``), ``d(s) = mean over windows of arccos(cos(h_{s-1}, h_{s+n-1})) / pi`` on the LAST token of each
   calibration sequence (``get_last_non_padded_tokens``; our windows are unpadded, so position ``T - 1``).
2. The span with the smallest ``d`` is removed (``select_non_overlapping_blocks`` with ``num_A = 1``).
3. LS variant (``lstsq.py``): over all calibration tokens, ``X = M_{s-1}``, target ``Z = h_{s+n-1} - Y_{s-1}``
   ( = ``h_{s+n-1} + M_{s-1} - h_{s-1}``), ``T = (X^T X + alpha I)^{-1} X^T Z`` in float64, ``alpha = 0`` by
   default (their configs). Then layer ``s-1``'s ``down_proj`` weight ``W`` becomes ``T^T W``, so the model computes
   ``Y_{s-1} + M_{s-1} T`` in place of ``h_{s+n-1}``: the stock Llama layout, ``n`` layers fewer.
4. Cosine variant (``cosine_dist.py`` / ``utils.adam_method``, ``accurate = False``): the same ``X``, ``Z``;
   ``T`` initialised to the identity and trained with Adam (lr 1e-4, batch 1024 tokens, shuffled, 10 epochs) on
   ``1 - mean_tokens cos(X T, Z)``.

``n = round(fraction * num_layers)``; each layer holds the same parameters, so the decoder share removed is
``n / num_layers`` (exactly 20/30/40/50 % for 30 layers).

Deviations: calibration is the harness's 128 x 128 windows (the paper: 8000 SlimOrca samples of up to 1024 tokens);
the official code runs the LS fold in bfloat16 on the saved model, here everything stays float32 (T in float64).
"""

from __future__ import annotations

import math
import time

import torch

from gaqprune.core.surgery import remove_layers

BATCH = 16  # calibration windows per forward pass (memory only; results do not depend on it)


def _decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


@torch.no_grad()
def _forward_states(model, ids: torch.Tensor, mlp_layer: int | None = None):
    """HF forward with ``output_hidden_states``; also the MLP output of ``mlp_layer`` (a hook), if asked."""
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if mlp_layer is not None:
        def save(_module, _inputs, output):
            captured["mlp"] = output.detach()
        hook = model.model.layers[mlp_layer].mlp.register_forward_hook(save)
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    return out.hidden_states[1:], captured.get("mlp")


@torch.no_grad()
def block_distances(model, calib: torch.Tensor, n: int) -> list[float]:
    """``d[l] = mean_w arccos(cos(h_l, h_{l+n})) / pi`` at each window's last token, for ``l = 0 .. L-1-n``:
    the distance of removing layers ``l+1 .. l+n`` (``utils.compute_block_distances`` with ``angular_distance``)."""
    num_layers = len(model.model.layers)
    sums = torch.zeros(num_layers - n, dtype=torch.float64)
    for start in range(0, len(calib), BATCH):
        states, _ = _forward_states(model, calib[start:start + BATCH])
        last = [h[:, -1, :].double() for h in states]
        for i in range(num_layers - n):
            a = torch.nn.functional.normalize(last[i], dim=-1)
            b = torch.nn.functional.normalize(last[i + n], dim=-1)
            sums[i] += (torch.acos((a * b).sum(-1).clamp(-1, 1)) / math.pi).sum()
    return (sums / len(calib)).tolist()


@torch.no_grad()
def span_activations(model, calib: torch.Tensor, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Z)`` over all calibration tokens for removing layers ``first .. first+n-1``:
    ``X = M_{first-1}`` (MLP output of the layer before the span), ``Z = h_{first+n-1} + X - h_{first-1}``."""
    xs, zs = [], []
    for start in range(0, len(calib), BATCH):
        states, mlp = _forward_states(model, calib[start:start + BATCH], mlp_layer=first - 1)
        width = mlp.shape[-1]
        x = mlp.reshape(-1, width)
        xs.append(x)
        zs.append(states[first + n - 1].reshape(-1, width) + x - states[first - 1].reshape(-1, width))
    return torch.cat(xs), torch.cat(zs)


def lstsq_transform(x: torch.Tensor, z: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``T = (X^T X + alpha I)^{-1} X^T Z`` in float64 (``lstsq.py``; ``alpha`` their ridge term)."""
    x64, z64 = x.double(), z.double()
    gram = x64.T @ x64 + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    # lstsq.py inverts the Gram matrix; solve() is the same map with less rounding.
    return torch.linalg.solve(gram, x64.T @ z64)


def cosine_transform(x: torch.Tensor, z: torch.Tensor, epochs: int = 10, lr: float = 1e-4, batch_size: int = 1024,
                     seed: int = 0) -> torch.Tensor:
    """``T`` minimising ``1 - mean cos(X T, Z)`` with Adam from the identity (``utils.adam_method``, loss cosine)."""
    gen = torch.Generator().manual_seed(seed)
    width = x.shape[1]
    lin = torch.nn.Linear(width, width, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width))
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    xf, zf = x.float(), z.float()
    for _ in range(epochs):
        order = torch.randperm(len(xf), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            pred = lin(xf[idx])
            loss = 1 - torch.nn.functional.cosine_similarity(pred, zf[idx], dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    # nn.Linear computes x W^T, so the map x -> x T has T = W^T (adam_method returns model.weight.T).
    return lin.weight.detach().T.double()


def choose_span(model, calib: torch.Tensor, n: int) -> tuple[int, list[float]]:
    """First removed layer ``s`` (``>= 1``) of the span with the smallest block distance, and all distances."""
    dist = block_distances(model, calib, n)
    best = min(range(len(dist)), key=lambda i: dist[i])
    return best + 1, dist


def replace_span(model, calib: torch.Tensor, first: int, n: int, *, loss: str = "lstsq", alpha: float = 0.0,
                 epochs: int = 10, lr: float = 1e-4, batch_size: int = 1024, seed: int = 0) -> dict[str, float]:
    """Estimate ``T`` for layers ``first .. first+n-1``, fold it into layer ``first-1``'s ``down_proj`` and remove the
    span, in place. Returns the calibration residuals ``||Z - X||^2`` (plain removal) and ``||Z - X T||^2``."""
    x, z = span_activations(model, calib, first, n)
    if loss == "lstsq":
        transform = lstsq_transform(x, z, alpha)
    else:
        transform = cosine_transform(x, z, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    residual_plain = (z - x).double().pow(2).sum().item()
    residual_fit = (z.double() - x.double() @ transform).pow(2).sum().item()
    del x, z
    down = model.model.layers[first - 1].mlp.down_proj
    with torch.no_grad():
        # out = a W^T T = a (T^T W)^T: the map folds into down_proj's weight (lstsq.py / cosine_dist.py).
        down.weight.copy_((transform.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((down.bias.double() @ transform).to(down.bias.dtype))
    remove_layers(model, list(range(first, first + n)))
    return {"plain_removal": residual_plain, "with_transform": residual_fit}


def prune(model, calib: torch.Tensor, fraction: float, *, loss: str = "lstsq", alpha: float = 0.0,
          epochs: int = 10, lr: float = 1e-4, batch_size: int = 1024, seed: int = 0, **_unused) -> dict:
    """Remove ``round(fraction * L)`` contiguous layers chosen by block distance and fold one linear map ``T``
    (``loss`` ``"lstsq"``: closed form; ``"cosine"``: Adam on the cosine loss) into the ``down_proj`` before them."""
    if loss not in ("lstsq", "cosine"):
        raise ValueError(f"loss must be 'lstsq' or 'cosine', not {loss!r}")
    t0 = time.time()
    model.eval()
    num_layers = len(model.model.layers)
    before = _decoder_params(model)
    n = round(fraction * num_layers)
    if not 1 <= n <= num_layers - 2:
        raise ValueError(f"fraction {fraction} removes {n} of {num_layers} layers; ReplaceMe needs 1 .. L-2")
    first, dist = choose_span(model, calib, n)
    residuals = replace_span(model, calib, first, n, loss=loss, alpha=alpha, epochs=epochs, lr=lr,
                             batch_size=batch_size, seed=seed)
    removed = list(range(first, first + n))
    after = _decoder_params(model)
    return {
        "method": "replaceme" if loss == "lstsq" else "replaceme_cosine",
        "decoder_params_before": before, "decoder_params_after": after,
        "removed_decoder": 1 - after / before, "seconds": round(time.time() - t0, 1),
        "removed_layers": removed, "folded_into_layer": first - 1, "num_blocks": n,
        "distances": [round(d, 5) for d in dist],
        "options": {"loss": loss, "alpha": alpha, **({"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                                      "seed": seed} if loss == "cosine" else {})},
        "calibration_tokens": int(calib.numel()),
        "span_residual_sq": residuals,
    }
