"""Which k layers to swap: every strategy chooses on calibration data only; scoring is held out.

Strategies are registered functions (``STRATEGIES``, in registration order); chapter 2 runs them all:

* ``block`` — contiguous block whose start minimises calibration NLL;
* ``greedy_lis`` — MorphServe's Algorithm 1: add the layer with the highest LIS given the swapped
  set Q (MDS recomputed against Q at every step; LTS and LRS are static);
* ``static_lis`` / ``static_lis_norm`` — top-k by LIS computed once with Q empty (raw, and with each
  component min-max normalised);
* ``greedy_dppl`` — scattered greedy on the selection objective itself: add the layer whose swap
  raises calibration NLL least, given Q;
* ``front_to_back`` (the paper's fallback), ``back_to_front`` (the released code's order),
  ``middle_block`` (centred), ``gromov_block`` (min angular distance d(l, l+k), Gromov et al.);
* ``middle_third_block`` — like ``block``, but only among the blocks inside the middle third of the depth
  (covering it when k is larger than a third): is the middle as safe as the best-calibrated block?
* ``random`` (not registered: many seeds per k) — uniform k-subsets, :func:`random_sets`.

A new strategy is one function ``(selector, ks) -> {k: layers}`` (or ``(selector, k) -> layers``
with ``per_k=True``) under ``@register(name, contiguous=..., summary=...)``.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from morphlib.errors import MorphError
from morphlib.eval.metrics import Reference, greedy_tokens, score, token_match, window_nll
from morphlib.morph import Morpher
from morphlib.select.layersets import is_contiguous, middle_block, middle_third_starts
from morphlib.select.sensitivity import lis, lis_normalised, mds_given


@dataclass(frozen=True)
class Strategy:
    name: str
    contiguous: bool  # every set it returns is one block of adjacent layers
    choose: Callable  # (selector, ks) -> {k: sorted layers}
    summary: str


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, contiguous: bool, summary: str, per_k: bool = False):
    """Decorator: add a layer-set strategy to ``STRATEGIES`` (see the module doc)."""
    def deco(fn):
        if name in STRATEGIES:
            raise MorphError(f"strategy {name!r} is already registered")
        choose = (lambda sel, ks: {k: sorted(fn(sel, k)) for k in ks}) if per_k else fn
        STRATEGIES[name] = Strategy(name, contiguous, choose, summary)
        return fn
    return deco


def scattered_names() -> tuple[str, ...]:
    return tuple(name for name, s in STRATEGIES.items() if not s.contiguous)


def random_sets(num_layers: int, ks, n_random: int, seed: int = 0) -> dict[int, list[list[int]]]:
    """{k: [sorted uniform k-subset per seed r]}, reproducible from (seed, k, r)."""
    return {k: [sorted(_random.Random(f"{seed}/{k}/{r}").sample(range(num_layers), k)) for r in range(n_random)]
            for k in ks}


class Selector:
    """Chooses layer sets from calibration data (``calib``: a Reference over calibration windows)."""

    def __init__(self, model, morpher: Morpher, calib: Reference, lts: np.ndarray | None = None,
                 lrs: np.ndarray | None = None, angular: np.ndarray | None = None,
                 mds0: dict[int, np.ndarray] | None = None, batch_size: int = 8, progress: bool = True):
        """``lts``, ``lrs``: per-layer means; ``angular``: [L+1, L+1] mean angular distances; ``mds0``:
        {layer: per-window MDS with nothing else swapped} (greedy LIS's first step, static LIS). The
        loss-based strategies (block, greedy dPPL) need none of them."""
        self.model, self.morpher, self.calib = model, morpher, calib
        self.lts, self.lrs, self.angular, self.mds0 = lts, lrs, angular, mds0
        self.n = morpher.num_layers
        self.batch_size, self.progress = batch_size, progress
        self._nll: dict[frozenset, float] = {}
        self.log: dict[str, list] = {"greedy_lis": [], "greedy_dppl": []}

    def calib_nll(self, layers) -> float:
        key = frozenset(layers)
        if key not in self._nll:
            with self.morpher.morphed(sorted(key)):
                self._nll[key] = float(window_nll(self.model, self.calib.ids, self.batch_size).mean())
        return self._nll[key]

    # -------------------------------------------------------------- contiguous
    def best_block(self, k: int, starts=None) -> list[int]:
        """The block of ``k`` layers with the lowest calibration NLL, among those starting at ``starts`` (all)."""
        starts = range(self.n - k + 1) if starts is None else starts
        best = min(starts, key=lambda s: self.calib_nll(range(s, s + k)))
        return list(range(best, best + k))

    def middle_block(self, k: int) -> list[int]:
        return middle_block(self.n, k)

    def gromov_block(self, k: int) -> list[int]:
        d = self.angular  # [L+1, L+1] mean angular distance between representations h_i and h_j
        s = min(range(self.n - k + 1), key=lambda s: d[s, s + k])
        return list(range(s, s + k))

    def front_to_back(self, k: int) -> list[int]:
        return list(range(k))

    def back_to_front(self, k: int) -> list[int]:
        return list(range(self.n - k, self.n))

    # -------------------------------------------------------------- scattered
    def static_lis_order(self, normalised: bool = False) -> list[int]:
        mds0 = np.array([self.mds0[i].mean() for i in range(self.n)])
        score_ = (lis_normalised if normalised else lis)(self.lts, self.lrs, mds0)
        return [int(i) for i in np.argsort(-score_, kind="stable")]

    def greedy_lis_order(self, k_max: int) -> list[int]:
        """Algorithm 1 of MorphServe: repeatedly add argmax_l LIS_l|Q (MDS recomputed against Q)."""
        order: list[int] = []
        ids = self.calib.ids
        for _ in tqdm(range(k_max), desc="greedy LIS", disable=not self.progress, leave=False):
            rest = [i for i in range(self.n) if i not in order]
            mds = self.mds0 if not order else mds_given(self.model, self.morpher, ids, order, rest, self.batch_size)
            values = {i: float(lis(self.lts[i], self.lrs[i], mds[i].mean())) for i in rest}
            pick = max(values, key=values.get)
            self.log["greedy_lis"].append({"step": len(order) + 1, "layer": pick, "lis": values})
            order.append(pick)
        return order

    def greedy_dppl_order(self, k_max: int) -> list[int]:
        order: list[int] = []
        for _ in tqdm(range(k_max), desc="greedy dPPL", disable=not self.progress, leave=False):
            rest = [i for i in range(self.n) if i not in order]
            with self.morpher.morphed(order):  # each candidate then toggles only its own layer
                values = {i: self.calib_nll(order + [i]) for i in rest}
            pick = min(values, key=values.get)
            self.log["greedy_dppl"].append({"step": len(order) + 1, "layer": pick, "nll": values[pick]})
            order.append(pick)
        return order

    # -------------------------------------------------------------- all
    def select_all(self, ks: list[int], n_random: int, seed: int = 0) -> dict:
        """{strategy: {k: layers}} for every registered strategy; random: {k: [layers per seed]}."""
        out = {name: s.choose(self, ks) for name, s in STRATEGIES.items()}
        out["random"] = random_sets(self.n, ks, n_random, seed)
        return out

    def best_scattered(self, sets: dict, k: int) -> str:
        """The scattered strategy with the lowest *calibration* NLL at k (chosen without held-out data)."""
        return min(scattered_names(), key=lambda name: self.calib_nll(sets[name][k]))


@register("block", contiguous=True, per_k=True, summary="contiguous block with the lowest calibration loss")
def _block(sel: Selector, k: int) -> list[int]:
    return sel.best_block(k)


@register("greedy_lis", contiguous=False, summary="MorphServe's Algorithm 1 (MDS recomputed against the swapped set)")
def _greedy_lis(sel: Selector, ks) -> dict:
    order = sel.greedy_lis_order(max(ks))
    return {k: sorted(order[:k]) for k in ks}


@register("static_lis", contiguous=False, summary="top-k LIS computed once")
def _static_lis(sel: Selector, ks) -> dict:
    order = sel.static_lis_order()
    return {k: sorted(order[:k]) for k in ks}


@register("static_lis_norm", contiguous=False, summary="top-k LIS with components min-max normalised")
def _static_lis_norm(sel: Selector, ks) -> dict:
    order = sel.static_lis_order(normalised=True)
    return {k: sorted(order[:k]) for k in ks}


@register("greedy_dppl", contiguous=False, summary="add the layer raising calibration loss least")
def _greedy_dppl(sel: Selector, ks) -> dict:
    order = sel.greedy_dppl_order(max(ks))
    return {k: sorted(order[:k]) for k in ks}


register("front_to_back", contiguous=True, per_k=True, summary="layers 0..k-1 (the paper's fallback)")(
    Selector.front_to_back)
register("back_to_front", contiguous=True, per_k=True, summary="last k layers (MorphServe's released code)")(
    Selector.back_to_front)
register("middle_block", contiguous=True, per_k=True, summary="centred block")(Selector.middle_block)
register("gromov_block", contiguous=True, per_k=True, summary="smallest angular distance d(l, l+k)")(
    Selector.gromov_block)


@register("middle_third_block", contiguous=True, per_k=True,
          summary="contiguous block with the lowest calibration loss inside the middle third of the depth")
def _middle_third_block(sel: Selector, k: int) -> list[int]:
    return sel.best_block(k, middle_third_starts(sel.n, k))


class HeldoutScorer:
    """Scores layer sets on held-out windows, each set once (cached by its set of layers).

    ``nll(layers)``: per-window NLL only; ``full(layers)``: NLL, KL and top-1 vs the 16-bit reference
    and greedy token match on ``prompts`` (``ref_tokens`` = the 16-bit model's continuation)."""

    def __init__(self, model, morpher: Morpher, ref: Reference, prompts: torch.Tensor, ref_tokens: torch.Tensor,
                 batch_size: int = 8):
        self.model, self.morpher, self.ref = model, morpher, ref
        self.prompts, self.ref_tokens, self.batch_size = prompts, ref_tokens, batch_size
        self._nll: dict[frozenset, np.ndarray] = {}
        self._full: dict[frozenset, dict] = {}

    def nll(self, layers) -> np.ndarray:
        key = frozenset(layers)
        if key not in self._nll:
            with self.morpher.morphed(sorted(key)):
                self._nll[key] = window_nll(self.model, self.ref.ids, self.batch_size)
        return self._nll[key]

    def full(self, layers) -> dict:
        key = frozenset(layers)
        if key not in self._full:
            with self.morpher.morphed(sorted(key)):
                sc = score(self.model, self.ref, self.batch_size)
                toks = greedy_tokens(self.model, self.prompts, self.ref_tokens.shape[1])
            m = token_match(self.ref_tokens, toks)
            self._full[key] = {"nll": sc.nll, "kl": sc.kl, "top1": sc.top1, "ppl": sc.ppl,
                               "token_match": m["match"], "prefix": m["prefix"]}
            self._nll.setdefault(key, sc.nll)
        return self._full[key]


def evaluate_sets(sets: dict, held: HeldoutScorer, selector: Selector,
                  progress: bool = True) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Score every chosen set on held-out windows. Returns (one record per set, per-window NLL by key).

    Keys are ``strategy/k`` (``random/k/r`` for random seeds). Random sets get held-out NLL only (no
    KL, top-1, generation or calibration loss: nothing reads them)."""
    jobs = []
    for name, by_k in sets.items():
        for k, layers in by_k.items():
            if name == "random":
                jobs += [(f"random/{k}/{r}", name, k, r, lay) for r, lay in enumerate(layers)]
            else:
                jobs.append((f"{name}/{k}", name, k, None, layers))
    records, nll = [], {}
    for key, name, k, r, layers in tqdm(jobs, desc="held-out scoring", disable=not progress, leave=False):
        rec = {"key": key, "strategy": name, "k": k, "seed": r, "layers": list(layers),
               "contiguous": is_contiguous(layers), "freed_mib": held.morpher.freed_bytes(layers) / 2**20}
        if name == "random":
            nll[key] = held.nll(layers)
            rec["heldout_ppl"] = float(np.exp(nll[key].mean()))
        else:
            hit = held.full(layers)
            nll[key] = hit["nll"]
            rec.update(calib_nll=selector.calib_nll(layers), kl=float(hit["kl"].mean()),
                       top1=float(hit["top1"].mean()), token_match=float(hit["token_match"].mean()),
                       prefix=float(hit["prefix"].mean()), heldout_ppl=hit["ppl"])
        records.append(rec)
    return records, nll


def block_nll_table(held: HeldoutScorer, k: int) -> np.ndarray:
    """Per-window held-out NLL of every block position for k layers: [W, n - k + 1]."""
    return np.stack([held.nll(range(s, s + k)) for s in range(held.morpher.num_layers - k + 1)], axis=1)


def seed_protocol(held: HeldoutScorer, lis_sets: dict[int, list[int]], ks: list[int], progress: bool = True) -> dict:
    """The seed project's comparison, reproduced: per window, the best block chosen *on that window*
    (an oracle) vs one LIS set, ties counted as block wins; next to the count selection alone predicts."""
    from morphlib.eval.stats import selection_expected_wins

    wins, trials, candidates, per_k = 0, 0, [], {}
    for k in tqdm(ks, desc="seed protocol", disable=not progress, leave=False):
        table = block_nll_table(held, k)  # [W, positions]
        lis_nll = held.nll(lis_sets[k])
        oracle = table.min(axis=1)
        w = int((oracle <= lis_nll).sum())
        per_k[k] = {"wins": w, "trials": len(oracle), "positions": table.shape[1],
                    "expected": selection_expected_wins([table.shape[1]] * len(oracle)),
                    "best_fixed_block_start_heldout": int(table.mean(axis=0).argmin())}
        wins, trials = wins + w, trials + len(oracle)
        candidates += [table.shape[1]] * len(oracle)
    return {"wins": wins, "trials": trials, "selection_expected": selection_expected_wins(candidates), "per_k": per_k}
