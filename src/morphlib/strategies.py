"""Which k layers to swap: every strategy chooses on calibration data only; scoring is held out.

Strategies (``select_all``):

* ``block`` — contiguous block whose start minimises calibration NLL;
* ``greedy_lis`` — MorphServe's Algorithm 1: add the layer with the highest LIS given the swapped
  set Q (MDS recomputed against Q at every step; LTS and LRS are static);
* ``static_lis`` / ``static_lis_norm`` — top-k by LIS computed once with Q empty (raw, and with each
  component min-max normalised);
* ``greedy_dppl`` — scattered greedy on the selection objective itself: add the layer whose swap
  raises calibration NLL least, given Q;
* ``front_to_back`` (the paper's fallback), ``back_to_front`` (the released code's order),
  ``middle_block`` (centred), ``gromov_block`` (min angular distance d(l, l+k), Gromov et al.);
* ``random`` — uniform k-subsets, one per seed.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from morphlib.metrics import Reference, greedy_tokens, score, token_match, window_nll
from morphlib.morph import Morpher
from morphlib.sensitivity import lis, lis_normalised, mds_given

SCATTERED = ("greedy_lis", "static_lis", "static_lis_norm", "greedy_dppl")
CONTIGUOUS = ("block", "front_to_back", "back_to_front", "middle_block", "gromov_block")


def is_contiguous(layers) -> bool:
    layers = sorted(layers)
    return layers == list(range(layers[0], layers[0] + len(layers))) if layers else True


class Selector:
    """Chooses layer sets from calibration data (``calib``: a Reference over calibration windows)."""

    def __init__(self, model, morpher: Morpher, calib: Reference, lts: np.ndarray, lrs: np.ndarray,
                 angular: np.ndarray, batch_size: int = 8, progress: bool = True):
        self.model, self.morpher, self.calib = model, morpher, calib
        self.lts, self.lrs, self.angular = np.asarray(lts), np.asarray(lrs), np.asarray(angular)
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
    def best_block(self, k: int) -> list[int]:
        starts = range(self.n - k + 1)
        best = min(starts, key=lambda s: self.calib_nll(range(s, s + k)))
        return list(range(best, best + k))

    def middle_block(self, k: int) -> list[int]:
        s = (self.n - k) // 2
        return list(range(s, s + k))

    def gromov_block(self, k: int) -> list[int]:
        d = self.angular  # [L+1, L+1] mean angular distance between representations h_i and h_j
        s = min(range(self.n - k + 1), key=lambda s: d[s, s + k])
        return list(range(s, s + k))

    def front_to_back(self, k: int) -> list[int]:
        return list(range(k))

    def back_to_front(self, k: int) -> list[int]:
        return list(range(self.n - k, self.n))

    # -------------------------------------------------------------- scattered
    def static_lis_order(self, mds0: np.ndarray, normalised: bool = False) -> list[int]:
        score_ = (lis_normalised if normalised else lis)(self.lts, self.lrs, mds0)
        return [int(i) for i in np.argsort(-score_, kind="stable")]

    def greedy_lis_order(self, k_max: int) -> list[int]:
        """Algorithm 1 of MorphServe: repeatedly add argmax_l LIS_l|Q (MDS recomputed against Q)."""
        order: list[int] = []
        ids = self.calib.ids
        for _ in tqdm(range(k_max), desc="greedy LIS", disable=not self.progress, leave=False):
            rest = [i for i in range(self.n) if i not in order]
            mds = mds_given(self.model, self.morpher, ids, order, rest, self.batch_size)  # base: final hidden with Q
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
    def select_all(self, ks: list[int], mds0: np.ndarray, n_random: int, seed: int = 0) -> dict:
        """{strategy: {k: layers}}; random: {k: [layers per seed]}."""
        k_max = max(ks)
        lis_order = self.greedy_lis_order(k_max)
        dppl_order = self.greedy_dppl_order(k_max)
        static = self.static_lis_order(mds0)
        static_norm = self.static_lis_order(mds0, normalised=True)
        out: dict[str, dict] = {name: {} for name in ("block",) + SCATTERED + CONTIGUOUS[1:] + ("random",)}
        for k in tqdm(ks, desc="blocks", disable=not self.progress, leave=False):
            out["block"][k] = self.best_block(k)
            out["greedy_lis"][k] = sorted(lis_order[:k])
            out["static_lis"][k] = sorted(static[:k])
            out["static_lis_norm"][k] = sorted(static_norm[:k])
            out["greedy_dppl"][k] = sorted(dppl_order[:k])
            out["front_to_back"][k] = self.front_to_back(k)
            out["back_to_front"][k] = self.back_to_front(k)
            out["middle_block"][k] = self.middle_block(k)
            out["gromov_block"][k] = self.gromov_block(k)
            out["random"][k] = [sorted(_random.Random(f"{seed}/{k}/{r}").sample(range(self.n), k))
                                for r in range(n_random)]
        return out

    def best_scattered(self, sets: dict, k: int) -> str:
        """The scattered strategy with the lowest *calibration* NLL at k (chosen without held-out data)."""
        return min(SCATTERED, key=lambda name: self.calib_nll(sets[name][k]))


@dataclass
class HeldoutEval:
    ref: Reference  # held-out 16-bit reference
    prompts: torch.Tensor  # [P, prompt_len]
    ref_tokens: torch.Tensor  # [P, new_tokens] greedy continuation of the 16-bit model
    batch_size: int = 8

    def run(self, model, morpher: Morpher, layers, with_tokens: bool = True) -> dict:
        with morpher.morphed(layers):
            sc = score(model, self.ref, self.batch_size)
            toks = greedy_tokens(model, self.prompts, self.ref_tokens.shape[1]) if with_tokens else None
        out = {"nll": sc.nll, "kl": sc.kl, "top1": sc.top1, "ppl": sc.ppl}
        if toks is not None:
            m = token_match(self.ref_tokens, toks)
            out["token_match"], out["prefix"] = m["match"], m["prefix"]
        return out


def block_nll_table(model, morpher: Morpher, ref: Reference, k: int, batch_size: int = 8) -> np.ndarray:
    """Per-window held-out NLL of every block position for k layers: [W, n - k + 1]."""
    cols = []
    for s in range(morpher.num_layers - k + 1):
        with morpher.morphed(range(s, s + k)):
            cols.append(window_nll(model, ref.ids, batch_size))
    return np.stack(cols, axis=1)


def evaluate_sets(model, morpher: Morpher, sets: dict, held: HeldoutEval, selector: Selector,
                  progress: bool = True) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Score every chosen set on held-out windows. Returns (one record per set, per-window NLL by key).

    Keys are ``strategy/k`` (``random/k/r`` for random seeds). Random sets get held-out NLL only.
    """
    jobs = []
    for name, by_k in sets.items():
        for k, layers in by_k.items():
            if name == "random":
                jobs += [(f"random/{k}/{r}", name, k, r, lay) for r, lay in enumerate(layers)]
            else:
                jobs.append((f"{name}/{k}", name, k, None, layers))
    records, nll = [], {}
    cache: dict[frozenset, dict] = {}
    for key, name, k, r, layers in tqdm(jobs, desc="held-out scoring", disable=not progress, leave=False):
        full = name != "random"  # random sets: held-out NLL only (no KL, top-1 or generation): 20 x cheaper
        hit = cache.get(frozenset(layers))
        if hit is None or (full and "token_match" not in hit):
            if full:
                hit = held.run(model, morpher, layers, with_tokens=True)
            else:
                with morpher.morphed(layers):
                    nll_w = window_nll(model, held.ref.ids, held.batch_size)
                hit = {"nll": nll_w, "ppl": float(np.exp(nll_w.mean()))}
            cache[frozenset(layers)] = hit
        freed = sum(morpher.layer_bytes(i)["fp16"] - morpher.layer_bytes(i)["int4"] for i in layers)
        rec = {"key": key, "strategy": name, "k": k, "seed": r, "layers": list(layers),
               "contiguous": is_contiguous(layers), "calib_nll": selector.calib_nll(layers),
               "heldout_ppl": hit["ppl"], "freed_mib": freed / 2**20}
        if "kl" in hit:
            rec.update(kl=float(hit["kl"].mean()), top1=float(hit["top1"].mean()))
        if "token_match" in hit:
            rec.update(token_match=float(hit["token_match"].mean()), prefix=float(hit["prefix"].mean()))
        records.append(rec)
        nll[key] = hit["nll"]
    return records, nll


def seed_protocol(model, morpher: Morpher, ref: Reference, lis_sets: dict[int, list[int]], ks: list[int],
                  batch_size: int = 8, progress: bool = True) -> dict:
    """The seed project's comparison, reproduced: per window, the best block chosen *on that window*
    (an oracle) vs one LIS set, ties counted as block wins; next to the count selection alone predicts."""
    from morphlib.metrics import window_nll
    from morphlib.stats import selection_expected_wins

    wins, trials, candidates, per_k = 0, 0, [], {}
    for k in tqdm(ks, desc="seed protocol", disable=not progress, leave=False):
        table = block_nll_table(model, morpher, ref, k, batch_size)  # [W, positions]
        with morpher.morphed(lis_sets[k]):
            lis_nll = window_nll(model, ref.ids, batch_size)
        oracle = table.min(axis=1)
        w = int((oracle <= lis_nll).sum())
        per_k[k] = {"wins": w, "trials": len(oracle), "positions": table.shape[1],
                    "expected": selection_expected_wins([table.shape[1]] * len(oracle)),
                    "best_fixed_block_start_heldout": int(table.mean(axis=0).argmin())}
        wins, trials = wins + w, trials + len(oracle)
        candidates += [table.shape[1]] * len(oracle)
    return {"wins": wins, "trials": trials, "selection_expected": selection_expected_wins(candidates), "per_k": per_k}
