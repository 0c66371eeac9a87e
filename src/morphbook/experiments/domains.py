"""Chapter 2, continued: do its verdicts travel to other domains and genres?

Reads chapter 2's results (its layer sets, per-window held-out NLL and windows) and asks:

* **per domain** — the block's pooled win rates over k against greedy LIS and against the best
  scattered set, with the held-out perplexity effect (pooled over k and per k, with CIs), on each
  held-out domain's windows alone: *Moby-Dick*, addresses 2001–2021 (whose genre the calibration text
  shares), and four domains far from both (``EXTRA_HELDOUT``: 2002 mailing-list email, software
  licences, the npm manual, Python source), scored here on chapter 2's sets; the block chosen inside
  the middle third of the depth is set beside the calibrated block on each;
* **cross-calibration** — the two loss-fitted strategies (the calibrated block and the greedy ΔPPL
  set) chosen again on calibration windows of each genre (the documents of held-out windows
  excluded) and compared on every held-out domain: how much of an edge is fit to its calibration text.

The genres, their sources and window counts were fixed before any of their results was seen
(``book/corpus.md``). The INT4 weights are chapter 2's (same quantizer, same AWQ calibration); only
the choice of layers moves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params
from morphbook.experiments.verdicts import (paired_by_k, pooled, pooled_versus, verdict_contiguous,
                                             verdict_middle_third)
from morphlib.errors import MorphError
from morphlib.eval.corpus import DEFAULT_SPLIT, DOMAINS, GENRES, domain_windows, make_windows
from morphlib.eval.metrics import Reference, window_nll
from morphlib.eval.stats import paired_comparison
from morphlib.models import load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.runtime import make_deterministic
from morphlib.select.strategies import HeldoutScorer, Selector

PRIMARY_CALIBRATION = "sotu-1790-1999"
# held-out domains beyond chapter 2's two, and the calibration genres (fixed before their results were seen;
# sotu-2001-2021 calibrates nothing: its genre is the primary calibration's)
EXTRA_HELDOUT = ("email-2002", "spdx-licences", "npm-docs", "networkx-source")
CROSS_CALIBRATION = (PRIMARY_CALIBRATION, "moby-dick") + EXTRA_HELDOUT
MIDDLE_THIRD = "middle_third_block"
# the CPU profile (CI) cross-calibrates on two genres, the primary and one other: every code path, a third of
# the time (six genres took 367 of the chapter's 430 s on 2 cores)
DEFAULTS = {"gpu": dict(extra_heldout_windows=32, cross_calib_windows=16),
            "cpu": dict(extra_heldout_windows=4, cross_calib_windows=2, cross_calibration=(PRIMARY_CALIBRATION, "email-2002"))}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    extra_heldout: tuple[str, ...] = EXTRA_HELDOUT  # held-out domains beyond chapter 2's two
    extra_heldout_windows: int = 32  # windows per extra domain
    cross_calibration: tuple[str, ...] = CROSS_CALIBRATION  # () turns it off
    cross_calib_windows: int = 16  # calibration windows per non-primary calibration domain

    def __post_init__(self):
        object.__setattr__(self, "extra_heldout", tuple(self.extra_heldout))
        object.__setattr__(self, "cross_calibration", tuple(self.cross_calibration))
        self.check_counts("extra_heldout_windows", "cross_calib_windows")
        unknown = [d for d in self.extra_heldout + self.cross_calibration if d not in DOMAINS]
        if unknown:
            raise MorphError(f"unknown domain(s) {', '.join(map(repr, unknown))}: choose from {', '.join(DOMAINS)}")
        taken = [d for d in self.extra_heldout if d in DEFAULT_SPLIT["heldout"] + DEFAULT_SPLIT["calibration"]]
        if taken or len(set(self.extra_heldout)) < len(self.extra_heldout):
            raise MorphError(f"extra_heldout {list(self.extra_heldout)}: each domain once, none of chapter 2's own "
                             f"({', '.join(DEFAULT_SPLIT['calibration'] + DEFAULT_SPLIT['heldout'])})")


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
    if MIDDLE_THIRD not in sets:
        raise MorphError(f"chapter 2's results in {ch2.results_root} predate the {MIDDLE_THIRD} strategy: run chapter 2 again")
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
        domains, docs = list(windows["domain"]), list(windows["doc"])  # of every held-out window, chapter 2's first
        extra = []
        for dom in cfg.extra_heldout:
            win = domain_windows(tok, dom, cfg.extra_heldout_windows, p["window_len"], seed=p["seed"], role="heldout")
            ref = Reference(win.ids, None, window_nll(lm, win.ids, p["batch_size"]))  # NLL only: no logits kept
            extra.append((dom, HeldoutScorer(lm, morpher, ref, win.ids[:0], torch.empty(0, 0, dtype=torch.long),
                                             p["batch_size"])))
            domains += [dom] * len(win)
            docs += win.doc
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
        ppl16 = {**summary["headline"].get("heldout_ppl_16bit_by_domain", {}), **{dom: s.ref.ppl for dom, s in extra}}
        by_domain = _per_domain(nll, domains, ks, best_scattered, ppl16, p["n_boot"], p["seed"])
        sw.lap("extra_domains")
        cross = None
        if cfg.cross_calibration:
            cross = _cross_calibration(cfg, p, lm, tok, morpher, set(docs), ks, sets, domains, all_nll)
            sw.lap("cross_calibration")
    rate = lambda key: {dom: {"win_rate": v[key]["win_rate"], "ci95": v[key]["ci95"],  # noqa: E731
                              "sign_test_p": v[key]["sign_test_p"], "windows": v["windows"]} for dom, v in by_domain.items()}
    effect = lambda key: {dom: {"effect_ppl_pct": v[key]["effect_ppl_pct"], "effect_ci95": v[key]["effect_ci95"]}  # noqa: E731
                          for dom, v in by_domain.items()}
    headline = {
        "genre_by_domain": {dom: GENRES[dom] for dom in by_domain},
        "heldout_win_rate_block_vs_greedy_lis_by_domain": rate("vs_greedy_lis"),
        "heldout_win_rate_block_vs_best_scattered_by_domain": rate("vs_best_scattered"),
        # held-out perplexity of the block relative to the other, pooled over k (%, negative: block better)
        "heldout_ppl_effect_block_vs_greedy_lis_by_domain": effect("vs_greedy_lis"),
        "heldout_ppl_effect_block_vs_best_scattered_by_domain": effect("vs_best_scattered"),
        "heldout_win_rate_middle_third_vs_block_by_domain": rate("middle_third_vs_block"),
        "heldout_ppl_effect_middle_third_vs_block_by_domain": effect("middle_third_vs_block"),
        "verdict_contiguous_vs_lis_by_domain": {d: verdict_contiguous(v["vs_greedy_lis"], v["per_k"], "greedy LIS")
                                                for d, v in by_domain.items()},
        "verdict_contiguous_vs_best_scattered_by_domain": {
            d: verdict_contiguous(v["vs_best_scattered"], v["per_k"], "best scattered") for d, v in by_domain.items()},
        "verdict_middle_third_vs_block_by_domain": {d: verdict_middle_third(v["middle_third_vs_block"])
                                                    for d, v in by_domain.items()},
        "heldout_ppl_16bit_by_domain": ppl16,
        "phase_seconds": sw.phases,
    }
    files = {"by_domain.json": by_domain, "windows.json": {"domain": domains, "doc": docs},
             "extra_nll.json": {key: v[len(windows["domain"]):].tolist() for key, v in nll.items()}}
    if cross is not None:
        headline["cross_calibration_win_rate_block_vs_greedy_dppl"] = {
            c: {d: cell["win_rate"] for d, cell in row.items()} for c, row in cross["matrix"].items()}
        headline["cross_calibration_ppl_effect_block_vs_greedy_dppl"] = {
            c: {d: cell["effect_ppl_pct"] for d, cell in row.items()} for c, row in cross["matrix"].items()}
        files["cross_calibration.json"] = cross
    used = hashlib.sha256(json.dumps(sets_json, sort_keys=True).encode()).hexdigest()[:16]
    params = as_params(cfg, chapter2={"commit": (summary["provenance"].get("git") or {}).get("commit"),
                                      "code_hash": summary["provenance"].get("code_hash"), "sets_sha256_16": used,
                                      **{k: p[k] for k in ("model", "ks", "window_len", "batch_size", "seed")}},
                       device=str(next(lm.parameters()).device))
    return Result(params, headline, files, sw.seconds)


def _per_domain(nll: dict[str, np.ndarray], domains: list[str], ks, best_scattered, ppl16: dict, n_boot, seed) -> dict:
    """Per domain, on its windows alone: the block vs greedy LIS and vs best scattered (pooled win rates and
    perplexity effects, and per k), the middle-third block vs the calibrated block, each one's perplexity."""
    labels = np.asarray(domains)
    out = {}
    for dom in dict.fromkeys(domains):
        idx = np.flatnonzero(labels == dom)
        sub = {key: v[idx] for key, v in nll.items()}
        ppl = lambda name, k: float(np.exp(sub[f"{name}/{k}"].mean()))  # noqa: E731
        out[dom] = {"genre": GENRES[dom], "windows": int(len(idx)), "ppl_16bit": ppl16.get(dom),
                    "vs_greedy_lis": pooled_versus(sub, ks, "greedy_lis", n_boot, seed),
                    "vs_best_scattered": pooled_versus(sub, ks, best_scattered, n_boot, seed),
                    "per_k": paired_by_k(sub, ks, best_scattered, n_boot, seed),
                    "middle_third_vs_block": pooled_versus(sub, ks, "block", n_boot, seed, first=MIDDLE_THIRD),
                    "middle_third_per_k": [{"k": k, **paired_comparison(sub[f"{MIDDLE_THIRD}/{k}"], sub[f"block/{k}"],
                                                                        n_boot, seed),
                                            "win_rate_ci95": pooled(sub, [k], "block", n_boot, seed,
                                                                    first=MIDDLE_THIRD)["ci95"]} for k in ks],
                    "heldout_ppl": {str(k): {"block": ppl("block", k), "greedy_lis": ppl("greedy_lis", k),
                                             "best_scattered": ppl(best_scattered[k], k),
                                             MIDDLE_THIRD: ppl(MIDDLE_THIRD, k)} for k in ks}}
    return out


def _cross_calibration(cfg: Config, p: dict, lm, tok, morpher, heldout_docs: set, ks, sets: dict, domains: list[str],
                       all_nll) -> dict:
    """Block and greedy-ΔPPL sets chosen on each calibration domain, compared on every held-out domain."""
    labels = np.asarray(domains)
    matrix, chosen, calib_docs = {}, {}, {}
    for cal in cfg.cross_calibration:
        if cal == PRIMARY_CALIBRATION:
            chosen[cal] = {"block": {k: sets["block"][k] for k in ks}, "greedy_dppl": {k: sets["greedy_dppl"][k] for k in ks}}
        else:
            win = domain_windows(tok, cal, cfg.cross_calib_windows, p["window_len"], seed=p["seed"], role="calibration",
                                 exclude_docs=heldout_docs)
            calib_docs[cal] = win.doc
            sel = Selector(lm, morpher, Reference.compute(lm, win.ids, p["batch_size"]), batch_size=p["batch_size"])
            order = sel.greedy_dppl_order(max(ks))
            chosen[cal] = {"block": {k: sel.best_block(k) for k in ks}, "greedy_dppl": {k: sorted(order[:k]) for k in ks}}
        nll = {f"{name}/{k}": all_nll(by_k[k]) for name, by_k in chosen[cal].items() for k in ks}
        matrix[cal] = {dom: pooled_versus({key: v[labels == dom] for key, v in nll.items()}, ks, "greedy_dppl",
                                          p["n_boot"], p["seed"]) for dom in dict.fromkeys(domains)}
    return {"matrix": matrix, "calibration_docs": calib_docs,
            "sets": {c: {s: {str(k): v for k, v in by_k.items()} for s, by_k in d.items()} for c, d in chosen.items()}}
