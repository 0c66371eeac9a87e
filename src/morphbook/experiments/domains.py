"""Chapter 2, continued: do its verdicts travel to other domains?

Reads chapter 2's results (its layer sets, per-window held-out NLL and windows) and asks:

* **per domain** — the block's pooled win rates over k against greedy LIS and against the best
  scattered set, on each held-out domain's windows alone: *Moby-Dick*, addresses 2001–2021 (whose
  genre the calibration text shares), and a third domain far from both, 2002 mailing-list email
  (``email-2002``), scored here on chapter 2's sets;
* **cross-calibration** — the two loss-fitted strategies (the calibrated block and the greedy ΔPPL
  set) chosen again on calibration windows of each domain (the documents of held-out windows
  excluded) and compared on every held-out domain: how much of an edge is fit to its calibration text.

The INT4 weights are chapter 2's (same quantizer, same AWQ calibration); only the choice of layers moves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params
from morphbook.experiments.verdicts import paired_by_k, pooled, verdict_contiguous
from morphlib.errors import MorphError
from morphlib.eval.corpus import domain_windows, make_windows
from morphlib.eval.metrics import Reference, window_nll
from morphlib.eval.stats import pooled_win_rate
from morphlib.models import load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.runtime import make_deterministic
from morphlib.select.strategies import HeldoutScorer, Selector

PRIMARY_CALIBRATION = "sotu-1790-1999"
DEFAULTS = {"gpu": dict(extra_heldout_windows=32, cross_calib_windows=16),
            "cpu": dict(extra_heldout_windows=4, cross_calib_windows=2)}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    extra_heldout: tuple[str, ...] = ("email-2002",)  # held-out domains beyond chapter 2's two
    extra_heldout_windows: int = 32  # windows per extra domain
    cross_calibration: tuple[str, ...] = (PRIMARY_CALIBRATION, "moby-dick", "email-2002")  # () turns it off
    cross_calib_windows: int = 16  # calibration windows per non-primary calibration domain

    def __post_init__(self):
        object.__setattr__(self, "extra_heldout", tuple(self.extra_heldout))
        object.__setattr__(self, "cross_calibration", tuple(self.cross_calibration))
        self.check_counts("extra_heldout_windows", "cross_calib_windows")


def run(cfg: Config, inputs: dict) -> Result:
    """``inputs["strategies"]``: chapter 2's results (``morphbook.publish.inputs``: summary, sets,
    per-window NLL and windows, their manifest checked)."""
    ch2 = inputs["strategies"]
    summary, p = ch2.summary, ch2.params
    sets_json, nll_json, windows = (ch2.json(name) for name in ("sets.json", "window_nll.json", "windows.json"))
    if p["profile"] != cfg.profile:
        raise MorphError(f"chapter 2's results in {ch2.results_root} are from the {p['profile']!r} profile, "
                         f"not {cfg.profile!r}: run chapter 2 with the same profile first")
    if p.get("texts", "default") != "default" or p.get("calibration_texts") or p.get("heldout_texts"):
        raise MorphError("the per-domain checks need the book's own corpus (chapter 2 ran on other texts)")
    ks = [int(k) for k in p["ks"]]
    sets = {name: {int(k): v for k, v in by_k.items()} for name, by_k in sets_json.items() if name != "random"}
    best_scattered = {int(k): v["best_scattered_strategy"] for k, v in summary["headline"]["per_k"].items()}
    if torch.cuda.is_available():
        make_deterministic()  # before any CUDA work: two identical bf16 runs must give identical tokens and bits
    with Stopwatch() as sw:
        torch.manual_seed(p["seed"])
        lm, tok = load_model(p["model"])
        calib = make_windows(tok, "calibration", p["calib_windows"], p["window_len"], seed=p["seed"])
        quant = QuantConfig(group_size=p["group_size"], method=p["quant_method"], awq_tokens=p["awq_tokens"],
                            awq_grid=p["awq_grid"])
        morpher = prepare_morphing(lm, quant, calibration=calib.ids)
        sw.lap("setup")
        domains = list(windows["domain"])
        heldout_docs = set(windows["doc"])
        extra = []
        for dom in cfg.extra_heldout:
            win = domain_windows(tok, dom, cfg.extra_heldout_windows, p["window_len"], seed=p["seed"], role="heldout")
            ref = Reference(win.ids, None, window_nll(lm, win.ids, p["batch_size"]))  # NLL only: no logits kept
            extra.append((dom, HeldoutScorer(lm, morpher, ref, win.ids[:0], torch.empty(0, 0, dtype=torch.long),
                                             p["batch_size"])))
            domains += [dom] * len(win)
            heldout_docs |= set(win.doc)
        primary_nll = {}  # chapter 2's per-window NLL of a set on its own windows (no recompute)
        for name, by_k in sets.items():
            for k in ks:
                primary_nll.setdefault(frozenset(by_k[k]), np.asarray(nll_json.get(f"{name}/{k}", []), dtype=float))

        primary = None  # chapter 2's held-out windows, rebuilt only for sets chapter 2 did not score

        def all_nll(layers) -> np.ndarray:  # per-window held-out NLL on every domain, chapter 2's windows first
            nonlocal primary
            own = primary_nll.get(frozenset(layers))
            if own is None or own.size != len(windows["domain"]):
                if primary is None:
                    held = make_windows(tok, "heldout", len(windows["domain"]), p["window_len"], seed=p["seed"])
                    if list(held.doc) != list(windows["doc"]):
                        raise MorphError("chapter 2's held-out windows cannot be rebuilt here (other corpus or tokenizer)")
                    primary = HeldoutScorer(lm, morpher, Reference(held.ids, None, None), held.ids[:0],
                                            torch.empty(0, 0, dtype=torch.long), p["batch_size"])
                own = primary.nll(layers)
            return np.concatenate([own] + [s.nll(layers) for _, s in extra])

        nll = {f"{name}/{k}": all_nll(by_k[k]) for name, by_k in sets.items() for k in ks}
        by_domain = _per_domain(nll, domains, ks, best_scattered, p["n_boot"], p["seed"])
        sw.lap("extra_domains")
        cross = None
        if cfg.cross_calibration:
            cross = _cross_calibration(cfg, p, lm, tok, morpher, heldout_docs, ks, sets, domains, all_nll)
            sw.lap("cross_calibration")
    rate = lambda key: {dom: {"win_rate": v[key]["win_rate"], "ci95": v[key]["ci95"],  # noqa: E731
                              "sign_test_p": v[key]["sign_test_p"], "windows": v["windows"]} for dom, v in by_domain.items()}
    headline = {
        "heldout_win_rate_block_vs_greedy_lis_by_domain": rate("vs_greedy_lis"),
        "heldout_win_rate_block_vs_best_scattered_by_domain": rate("vs_best_scattered"),
        "verdict_contiguous_vs_lis_by_domain": {d: verdict_contiguous(v["vs_greedy_lis"], v["per_k"], "greedy LIS")
                                                for d, v in by_domain.items()},
        "verdict_contiguous_vs_best_scattered_by_domain": {
            d: verdict_contiguous(v["vs_best_scattered"], v["per_k"], "best scattered") for d, v in by_domain.items()},
        "heldout_ppl_16bit_by_domain": {**summary["headline"].get("heldout_ppl_16bit_by_domain", {}),
                                        **{dom: s.ref.ppl for dom, s in extra}},
        "phase_seconds": sw.phases,
    }
    files = {"by_domain.json": by_domain, "windows.json": {"domain": domains},
             "extra_nll.json": {key: v[len(windows["domain"]):].tolist() for key, v in nll.items()}}
    if cross is not None:
        headline["cross_calibration_win_rate_block_vs_greedy_dppl"] = {
            c: {d: cell["win_rate"] for d, cell in row.items()} for c, row in cross["matrix"].items()}
        files["cross_calibration.json"] = cross
    used = hashlib.sha256(json.dumps(sets_json, sort_keys=True).encode()).hexdigest()[:16]
    params = as_params(cfg, chapter2={"commit": (summary["provenance"].get("git") or {}).get("commit"),
                                      "code_hash": summary["provenance"].get("code_hash"), "sets_sha256_16": used,
                                      **{k: p[k] for k in ("model", "ks", "window_len", "batch_size", "seed")}},
                       device=str(next(lm.parameters()).device))
    return Result(params, headline, files, sw.seconds)


def _per_domain(nll: dict[str, np.ndarray], domains: list[str], ks, best_scattered, n_boot, seed) -> dict:
    """The block's pooled win rates vs greedy LIS and vs best scattered, on each domain's windows alone."""
    labels = np.asarray(domains)
    out = {}
    for dom in dict.fromkeys(domains):
        idx = np.flatnonzero(labels == dom)
        sub = {key: v[idx] for key, v in nll.items()}
        out[dom] = {"windows": int(len(idx)),
                    "vs_greedy_lis": pooled(sub, ks, "greedy_lis", n_boot, seed),
                    "vs_best_scattered": pooled(sub, ks, best_scattered, n_boot, seed),
                    "per_k": paired_by_k(sub, ks, best_scattered, n_boot, seed)}
    return out


def _cross_calibration(cfg: Config, p: dict, lm, tok, morpher, heldout_docs: set, ks, sets: dict, domains: list[str],
                       all_nll) -> dict:
    """Block and greedy-ΔPPL sets chosen on each calibration domain, compared on every held-out domain."""
    labels = np.asarray(domains)
    matrix, chosen = {}, {}
    for cal in cfg.cross_calibration:
        if cal == PRIMARY_CALIBRATION:
            chosen[cal] = {"block": {k: sets["block"][k] for k in ks}, "greedy_dppl": {k: sets["greedy_dppl"][k] for k in ks}}
        else:
            win = domain_windows(tok, cal, cfg.cross_calib_windows, p["window_len"], seed=p["seed"], role="calibration",
                                 exclude_docs=heldout_docs)
            sel = Selector(lm, morpher, Reference.compute(lm, win.ids, p["batch_size"]), batch_size=p["batch_size"])
            order = sel.greedy_dppl_order(max(ks))
            chosen[cal] = {"block": {k: sel.best_block(k) for k in ks}, "greedy_dppl": {k: sorted(order[:k]) for k in ks}}
        diffs = np.stack([all_nll(chosen[cal]["block"][k]) - all_nll(chosen[cal]["greedy_dppl"][k]) for k in ks], axis=1)
        matrix[cal] = {dom: pooled_win_rate(diffs[labels == dom], p["n_boot"], p["seed"]) for dom in dict.fromkeys(domains)}
    return {"matrix": matrix,
            "sets": {c: {s: {str(k): v for k, v in by_k.items()} for s, by_k in d.items()} for c, d in chosen.items()}}
