"""Paired held-out comparisons between strategies, and verdicts on the seed project's claims.

Decision rules (fixed before looking at the data, applied the same way to every run):

* **"contiguous >= LIS"** — pooled over all k, block vs greedy LIS on held-out windows:
  *supported (block better)* when the 95 % CI of the win rate lies above 0.5 and the sign test
  gives p < 0.05; *not supported (LIS better)* when the CI lies below 0.5 and p < 0.05; otherwise
  *no detectable difference* (which still supports "matches", the weaker half of the claim, only
  if at no single k the block is significantly worse, paired bootstrap CI of the perplexity
  effect entirely above 0).
* **"middle layers are safest"** — a centred block is compared with both end blocks at each k on
  held-out perplexity; *supported* when it beats both at every k, *partly* at some, *not* at none;
  plus where the calibrated best block sits (its centre as a fraction of depth).
"""

from __future__ import annotations

import numpy as np

from morphlib.eval.stats import paired_comparison, pooled_win_rate


def paired_by_k(nll: dict[str, np.ndarray], ks: list[int], best_scattered: dict[int, str],
                n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per k: calibrated block vs greedy LIS, and vs the best scattered strategy (chosen on calibration), with
    the win rate's bootstrap CI over windows."""
    rows = []
    for k in ks:
        for role, other in (("greedy LIS", "greedy_lis"), ("best scattered", best_scattered[k])):
            cmp = paired_comparison(nll[f"block/{k}"], nll[f"{other}/{k}"], n_boot, seed)
            rows.append({"k": k, "versus": role, "other": other, **cmp,
                         "win_rate_ci95": pooled(nll, [k], other, n_boot, seed)["ci95"]})
    return rows


def _at(strategy: str | dict[int, str], k: int) -> str:
    return strategy[k] if isinstance(strategy, dict) else strategy


def pooled(nll: dict[str, np.ndarray], ks: list[int], other: str | dict[int, str], n_boot: int = 2000,
           seed: int = 0, first: str = "block") -> dict:
    """Pooled win rate of ``first`` (default: the calibrated block) over ``other`` (a strategy, or one per k)."""
    diffs = np.stack([nll[f"{first}/{k}"] - nll[f"{_at(other, k)}/{k}"] for k in ks], axis=1)
    return pooled_win_rate(diffs, n_boot, seed)


def pooled_effect(nll: dict[str, np.ndarray], ks: list[int], other: str | dict[int, str], n_boot: int = 2000,
                  seed: int = 0, first: str = "block") -> dict:
    """Held-out perplexity of ``first`` relative to ``other`` pooled over k, in percent (the geometric mean of
    the per-k perplexity ratios, minus 1; negative: ``first`` is better), with its paired bootstrap CI over windows."""
    mean_over_k = lambda strategy: np.mean([nll[f"{_at(strategy, k)}/{k}"] for k in ks], axis=0)  # noqa: E731
    cmp = paired_comparison(mean_over_k(first), mean_over_k(other), n_boot, seed)
    return {"effect_ppl_pct": cmp["effect_ppl_pct"], "effect_ci95": cmp["effect_ci95"], "windows": cmp["n"]}


def pooled_versus(nll: dict[str, np.ndarray], ks: list[int], other: str | dict[int, str], n_boot: int = 2000,
           seed: int = 0, first: str = "block") -> dict:
    """``pooled`` and ``pooled_effect`` in one dict: win rate, its CI and sign test; perplexity effect and its CI."""
    return {**pooled(nll, ks, other, n_boot, seed, first), **pooled_effect(nll, ks, other, n_boot, seed, first)}


def verdict_middle_third(cmp: dict) -> str:
    """The block chosen inside the middle third vs the calibrated block (``pooled_versus(..., first=middle third)``),
    by the rule of "contiguous >= LIS": a side wins when the win rate's CI excludes 0.5 and p < 0.05."""
    (lo, hi), p = cmp["ci95"], cmp["sign_test_p"]
    size = (f"win rate {cmp['win_rate']:.2f}, p={p:.2g}; held-out perplexity {cmp['effect_ppl_pct']:+.2f} % "
            f"[{cmp['effect_ci95'][0]:+.2f}, {cmp['effect_ci95'][1]:+.2f}]")
    if lo > 0.5 and p < 0.05:
        return f"the middle-third block beats the calibrated block ({size})"
    if hi < 0.5 and p < 0.05:
        return f"the calibrated block beats the middle-third block ({size})"
    return f"no detectable difference between the middle-third and the calibrated block ({size})"


def verdict_contiguous(pool: dict, rows: list[dict], versus: str) -> str:
    """``versus``: "greedy LIS" or "best scattered" (the role in ``paired_by_k`` rows)."""
    lo, hi = pool["ci95"]
    p = pool["sign_test_p"]
    worse_at = [r["k"] for r in rows if r["versus"] == versus and r["effect_ci95"][0] > 0]
    if lo > 0.5 and p < 0.05:
        return f"supported: the contiguous block beats {versus} on held-out text (win rate {pool['win_rate']:.2f}, p={p:.2g})"
    if hi < 0.5 and p < 0.05:
        return f"not supported: {versus} beats the contiguous block on held-out text (win rate {pool['win_rate']:.2f}, p={p:.2g})"
    if worse_at:
        return (f"not supported: no overall difference (win rate {pool['win_rate']:.2f}, p={p:.2g}), "
                f"but the block is significantly worse at k = {', '.join(map(str, worse_at))}")
    return (f"'matches' supported, 'beats' not: no detectable difference from {versus} "
            f"(win rate {pool['win_rate']:.2f}, 95 % CI {lo:.2f}-{hi:.2f}, p={p:.2g})")


def verdict_middle(records: list[dict], ks: list[int], num_layers: int, best_blocks: dict[int, list[int]]) -> dict:
    ppl = {(r["strategy"], r["k"]): r["heldout_ppl"] for r in records if r["seed"] is None}
    wins = [k for k in ks if ppl[("middle_block", k)] < min(ppl[("front_to_back", k)], ppl[("back_to_front", k)])]
    centres = {k: (best_blocks[k][0] + best_blocks[k][-1] + 1) / 2 / num_layers for k in ks}
    if len(wins) == len(ks):
        text = "supported"
    elif wins:
        text = "partly supported"
    else:
        text = "not supported"
    text += (f": the centred block beats both end blocks at {len(wins)}/{len(ks)} swap counts; "
             f"the calibrated best block's centre sits at {min(centres.values()):.2f}-{max(centres.values()):.2f} of depth")
    return {"verdict": text, "middle_wins_at_k": wins, "best_block_centre": centres}
