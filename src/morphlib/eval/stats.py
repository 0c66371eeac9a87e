"""Small, explicit statistics: bootstrap intervals over windows, paired comparisons, sign tests."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile CI of the mean over axis 0 (windows); works for [W] or [W, ...] arrays."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    means = values[idx].mean(axis=1)
    a = (1 - level) / 2
    return np.quantile(means, a, axis=0), np.quantile(means, 1 - a, axis=0)


def sign_test(diff: np.ndarray) -> dict:
    """Two-sided exact sign test on paired differences (ties dropped). Negative diff = first wins."""
    diff = np.asarray(diff, dtype=float)
    wins, losses = int((diff < 0).sum()), int((diff > 0).sum())
    n = wins + losses
    p = float(sps.binomtest(wins, n, 0.5).pvalue) if n else 1.0
    return {"wins": wins, "losses": losses, "ties": int(len(diff) - n), "p": p}


def ppl_effect_pct(nll_a: np.ndarray, nll_b: np.ndarray) -> float:
    """Perplexity of A relative to B in percent (negative: A is better)."""
    return 100.0 * (math.exp(float(np.mean(nll_a)) - float(np.mean(nll_b))) - 1.0)


def paired_comparison(nll_a: np.ndarray, nll_b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """A vs B on the same windows: effect in perplexity %, its paired bootstrap CI, win rate, sign test."""
    nll_a, nll_b = np.asarray(nll_a, float), np.asarray(nll_b, float)
    diff = nll_a - nll_b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boot = 100.0 * (np.exp(diff[idx].mean(axis=1)) - 1.0)
    st = sign_test(diff)
    return {
        "effect_ppl_pct": ppl_effect_pct(nll_a, nll_b),
        "effect_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "win_rate": (st["wins"] + 0.5 * st["ties"]) / len(diff),
        "sign_test_p": st["p"], "wins": st["wins"], "losses": st["losses"], "ties": st["ties"], "n": len(diff),
    }


def pooled_win_rate(diffs: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Win rate of A over B pooled over [windows, k] differences (negative = A wins; ties count half).

    The CI resamples whole windows (the k-results of one window are not independent); the sign test
    runs on each window's mean difference over k, which are independent across windows.
    """
    diffs = np.asarray(diffs, float)
    score = (diffs < 0) + 0.5 * (diffs == 0)
    rate = float(score.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diffs.shape[0], size=(n_boot, diffs.shape[0]))
    boot = score[idx].mean(axis=(1, 2))
    st = sign_test(diffs.mean(axis=1))
    return {"win_rate": rate, "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "sign_test_p": st["p"], "windows_won": st["wins"], "windows_lost": st["losses"],
            "windows": int(diffs.shape[0]), "pairs": int(diffs.size)}


def spearman_matrix(measures: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    names = list(measures)
    out = {a: {} for a in names}
    for a in names:
        for b in names:
            out[a][b] = float(sps.spearmanr(measures[a], measures[b]).statistic)
    return out


def selection_expected_wins(candidates_per_trial: list[int]) -> float:
    """Expected wins of 'best of m candidates' over one independent candidate, from selection alone.

    With exchangeable, continuous scores the minimum of m draws beats one more draw with
    probability m / (m + 1); summed over trials this is what the seed protocol's win count would be
    even if block and LIS sets were equally good.
    """
    return float(sum(m / (m + 1) for m in candidates_per_trial))
