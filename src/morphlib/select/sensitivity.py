"""Per-layer importance measures, per calibration window (so that they carry confidence intervals).

MorphServe's three cosine similarities (higher = safer to swap), averaged over tokens:

* LTS_l = cos(h_{l-1}, h_l)            how little 16-bit layer l changes its input
* LRS_l = cos(h_l, h_l^INT4)            16-bit vs INT4 output of layer l *on the same input*
* MDS_l|Q = cos(z_Q, z_{Q+l})           final hidden state z (after the last norm) with the swapped
                                        set Q vs with Q plus layer l
* LIS_l = 0.25 LTS_l + 0.25 LRS_l + 0.5 MDS_l|Q

Others: ShortGPT's Block Influence BI_l = 1 - LTS_l; Gromov et al.'s angular distance
d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi between the input of layer l and the output of layer
l+n-1 (we average over all tokens instead of the last one: more stable on short windows); and the
direct cost of swapping layer l alone: increase of next-token NLL and KL vs the 16-bit model.

Token positions: windows are slices of running text that start with the tokenizer's own special prefix
(a BOS for Gemma; nothing for SmolLM2, whose first position is then a text token). The first position
of every window (which has no context and acts as the attention sink, with an outsized hidden-state
norm) is excluded from every cosine average (``skip_first=True``). The hooks read each decoder layer's
input and output whatever the family (Llama, Gemma-3 with its extra norms, Qwen2, Mistral, Phi-3...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from morphlib.eval.metrics import Reference, score
from morphlib.morph import Morpher
from morphlib.structure import decoder_layers

LIS_WEIGHTS = {"lts": 0.25, "lrs": 0.25, "mds": 0.5}


def _cos(a: torch.Tensor, b: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """Mean cosine over tokens, per window: [B, T, H] x [B, T, H] -> [B]."""
    c = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return (c[:, 1:] if skip_first else c).mean(dim=1)


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final norm, [B, T, H] (what the LM head reads)."""
    dev = next(model.parameters()).device
    return model.get_decoder()(ids.to(dev), use_cache=False).last_hidden_state


@torch.no_grad()
def layer_passes(model: nn.Module, morpher: Morpher, ids: torch.Tensor, batch_size: int = 8,
                 skip_first: bool = True) -> dict[str, np.ndarray]:
    """One 16-bit pass with hooks: LTS [W, L], LRS [W, L] and angular distances [W, L+1, L+1]."""
    layers = decoder_layers(model)
    n = len(layers)
    dev = next(model.parameters()).device
    lts, lrs, ang = [], [], []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(dev)
        reps: list[torch.Tensor] = []
        lts_b = torch.zeros(batch.shape[0], n)
        lrs_b = torch.zeros(batch.shape[0], n)
        busy = {"flag": False}

        def hook(mod, args, kwargs, out, li):
            if busy["flag"]:
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = _layer_output(out)
            if li == 0:
                reps.append(x)
            reps.append(y)
            lts_b[:, li] = _cos(x, y, skip_first).cpu()
            busy["flag"] = True
            try:
                with morpher.morphed([li]):  # the layer's own INT4 twin, same input, same kwargs
                    y_q = _layer_output(mod(*args, **kwargs))
            finally:
                busy["flag"] = False
            lrs_b[:, li] = _cos(y, y_q, skip_first).cpu()

        handles = [layer.register_forward_hook(lambda m, a, k, o, li=li: hook(m, a, k, o, li), with_kwargs=True)
                   for li, layer in enumerate(layers)]
        try:
            model.get_decoder()(batch, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        unit = [torch.nn.functional.normalize(r.float(), dim=-1) for r in reps]
        stack = torch.stack(unit, dim=1)  # [B, L+1, T, H]
        if skip_first:
            stack = stack[:, :, 1:]
        cos = torch.einsum("bitd,bjtd->bijt", stack, stack).clamp(-1, 1)
        ang.append((torch.arccos(cos) / torch.pi).mean(dim=-1).cpu())
        lts.append(lts_b)
        lrs.append(lrs_b)
    return {"lts": torch.cat(lts).double().numpy(), "lrs": torch.cat(lrs).double().numpy(),
            "angular": torch.cat(ang).double().numpy()}


@torch.no_grad()
def mds_given(model: nn.Module, morpher: Morpher, ids: torch.Tensor, swapped, candidates,
              batch_size: int = 8, skip_first: bool = True, base: torch.Tensor | None = None,
              progress: bool = False) -> dict[int, np.ndarray]:
    """MDS_l|Q per window for each candidate l (Q = ``swapped``): {l: [W]}."""
    swapped = sorted(set(swapped))
    out = {}
    with morpher.morphed(swapped):  # Q stays swapped: each candidate then toggles only its own layer
        if base is None:
            base = torch.cat([final_hidden(model, ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)])
        for li in tqdm(list(candidates), desc="MDS", disable=not progress, leave=False):
            with morpher.morphed(swapped + [li]):
                vals = [_cos(base[s:s + batch_size], final_hidden(model, ids[s:s + batch_size]), skip_first)
                        for s in range(0, len(ids), batch_size)]
            out[li] = torch.cat(vals).double().cpu().numpy()
    return out


@torch.no_grad()
def single_layer_costs(model: nn.Module, morpher: Morpher, reference: Reference, batch_size: int = 8,
                       skip_first: bool = True, progress: bool = True) -> dict[str, np.ndarray]:
    """Swap each layer alone: MDS [W, L], NLL increase [W, L], KL vs 16-bit [W, L] (one pass per layer)."""
    n = morpher.num_layers
    ids = reference.ids
    base = torch.cat([final_hidden(model, ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)])
    mds, dnll, kl = [], [], []
    for li in tqdm(range(n), desc="single-layer swaps", disable=not progress, leave=False):
        hidden: list[torch.Tensor] = []
        with morpher.morphed([li]):
            sc = score(model, reference, batch_size, hidden=hidden)
        vals = [_cos(base[s:s + batch_size], h, skip_first) for s, h in zip(range(0, len(ids), batch_size), hidden)]
        mds.append(torch.cat(vals).double().cpu().numpy())
        dnll.append(sc.nll - reference.nll)
        kl.append(sc.kl)
    return {"mds": np.stack(mds, 1), "dnll": np.stack(dnll, 1), "kl": np.stack(kl, 1)}


def lis(lts: np.ndarray, lrs: np.ndarray, mds: np.ndarray) -> np.ndarray:
    return LIS_WEIGHTS["lts"] * lts + LIS_WEIGHTS["lrs"] * lrs + LIS_WEIGHTS["mds"] * mds


def minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = np.min(x), np.max(x)
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def lis_normalised(lts: np.ndarray, lrs: np.ndarray, mds: np.ndarray) -> np.ndarray:
    """LIS with each component min-max scaled across layers first, so that no term dominates by range."""
    return lis(minmax(lts), minmax(lrs), minmax(mds))


def lis_term_shares(lts: np.ndarray, lrs: np.ndarray, mds: np.ndarray) -> dict[str, float]:
    """Share of LIS's across-layer variance carried by each weighted term (covariance decomposition)."""
    total = lis(lts, lrs, mds)
    var = np.var(total)
    shares = {}
    for name, x in (("lts", lts), ("lrs", lrs), ("mds", mds)):
        term = LIS_WEIGHTS[name] * x
        shares[name] = float(np.cov(term, total, bias=True)[0, 1] / var) if var > 0 else float("nan")
    return shares


@dataclass
class Profile:
    """Layer measures on calibration windows; arrays are [windows, layers] unless noted."""

    lts: np.ndarray
    lrs: np.ndarray
    mds: np.ndarray
    dnll: np.ndarray
    kl: np.ndarray
    angular: np.ndarray  # [windows, L+1, L+1]

    @property
    def num_layers(self) -> int:
        return self.lts.shape[1]

    def means(self) -> dict[str, np.ndarray]:
        m = {k: getattr(self, k).mean(0) for k in ("lts", "lrs", "mds", "dnll", "kl")}
        m["bi"] = 1 - m["lts"]
        m["lis"] = lis(m["lts"], m["lrs"], m["mds"])
        m["lis_norm"] = lis_normalised(m["lts"], m["lrs"], m["mds"])
        m["angular_next"] = np.array([self.angular.mean(0)[i, i + 1] for i in range(self.num_layers)])
        return m


def profile_layers(model: nn.Module, morpher: Morpher, reference: Reference, batch_size: int = 8,
                   skip_first: bool = True, progress: bool = True) -> Profile:
    """All per-layer measures on the reference's (calibration) windows."""
    passes = layer_passes(model, morpher, reference.ids, batch_size, skip_first)
    single = single_layer_costs(model, morpher, reference, batch_size, skip_first, progress)
    return Profile(passes["lts"], passes["lrs"], single["mds"], single["dnll"], single["kl"], passes["angular"])
