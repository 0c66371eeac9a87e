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
    """Per k: calibrated block vs greedy LIS, and vs the best scattered strategy (chosen on calibration)."""
    rows = []
    for k in ks:
        for role, other in (("greedy LIS", "greedy_lis"), ("best scattered", best_scattered[k])):
            cmp = paired_comparison(nll[f"block/{k}"], nll[f"{other}/{k}"], n_boot, seed)
            rows.append({"k": k, "versus": role, "other": other, **cmp})
    return rows


def pooled(nll: dict[str, np.ndarray], ks: list[int], other: str | dict[int, str], n_boot: int = 2000,
           seed: int = 0) -> dict:
    """Pooled win rate of the calibrated block over ``other`` (a strategy, or one per k)."""
    name = (lambda k: other[k]) if isinstance(other, dict) else (lambda k: other)
    diffs = np.stack([nll[f"block/{k}"] - nll[f"{name(k)}/{k}"] for k in ks], axis=1)
    return pooled_win_rate(diffs, n_boot, seed)


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
