"""Activation-aware per-input-channel scales for INT4 weights (AWQ-style, Lin et al. 2023).

For every linear, on calibration activations X (captured at its input in the 16-bit model) search

    s(a) = mean|X|^a  (normalised so that sqrt(max s * min s) = 1),  a in {0, 1/grid, ..., 1 - 1/grid}
    a*   = argmin_a || X W^T - (X / s) Q(W diag(s))^T ||^2

a = 0 gives s = 1, i.e. plain round-to-nearest, so the search never does worse than RTN on the
calibration data of that linear. Unlike AWQ we keep s per linear (inside ``Int4Linear``) instead of
folding 1/s into the previous norm: every layer swap stays local and every restore stays exact.
The AutoAWQ package is not used: it is deprecated and does not install against our torch
(see the platform notes); this is ~80 lines of core PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from morphlib.quant.int4 import dequantize_groupwise, quantize_groupwise
from morphlib.structure import decoder_layers, layer_linears


@torch.no_grad()
def search_scale(x: torch.Tensor, weight: torch.Tensor, group_size: int, symmetric: bool,
                 grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best input scale s for one linear. Returns (s [K], best alpha, loss ratio best/RTN)."""
    x = x.float()
    w = weight.float()
    ref = x @ w.t()
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-6)
    best = (None, 0.0, float("inf"))
    rtn_loss = None
    for i in range(grid):
        alpha = i / grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, scale, zero = quantize_groupwise(w * s[None, :], group_size, symmetric)
        wq = dequantize_groupwise(q, scale, zero, group_size) / s[None, :]
        loss = (x @ wq.t() - ref).pow(2).mean().item()
        if i == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2] / max(rtn_loss, 1e-30)


@torch.no_grad()
def awq_scales(model: nn.Module, calibration_ids: torch.Tensor, group_size: int, symmetric: bool = False,
               grid: int = 20, max_tokens: int = 2048, batch_size: int = 4,
               progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {linear name: s}} from one pass of the 16-bit model over ``calibration_ids`` [n, T]."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(layers):
        for name, lin in layer_linears(layer).items():
            def pre_hook(mod, args, li=li, name=name):
                captured.setdefault((li, name), []).append(args[0].reshape(-1, args[0].shape[-1]).to("cpu"))
            hooks.append(lin.register_forward_pre_hook(pre_hook))
    ids = calibration_ids
    tokens_per_window = ids.shape[1]
    n_windows = max(1, min(ids.shape[0], -(-max_tokens // tokens_per_window)))
    try:
        for start in range(0, n_windows, batch_size):
            model(ids[start:min(start + batch_size, n_windows)].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    scales: dict[int, dict[str, torch.Tensor]] = {}
    items = list(captured.items())
    for (li, name), xs in tqdm(items, desc="AWQ scale search", disable=not progress, leave=False):
        x = torch.cat(xs)[:max_tokens].to(device)
        lin = layer_linears(layers[li])[name]
        s, _, _ = search_scale(x, lin.weight, group_size, symmetric, grid)
        scales.setdefault(li, {})[name] = s.to(torch.float32).cpu()
    return scales
