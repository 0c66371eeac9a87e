"""Statistics and verdict rules on synthetic data where the right answer is known."""

import numpy as np
import pytest

from morphlib.eval.stats import bootstrap_ci, paired_comparison, pooled_win_rate, selection_expected_wins, sign_test
from morphbook.experiments.verdicts import paired_by_k, pooled, verdict_contiguous


def test_selection_alone_predicts_the_seed_count():
    # seed: 10 texts x swap counts 2, 4, 8, 11 on 22 layers -> 21, 19, 15, 12 block positions
    expected = selection_expected_wins([21, 19, 15, 12] * 10)
    assert expected == pytest.approx(37.65, abs=0.01)


def test_sign_test_exact_values():
    assert sign_test(np.array([-1.0] * 10))["p"] == pytest.approx(2 / 1024)
    st = sign_test(np.array([-1.0, 1.0, 0.0, -2.0]))
    assert (st["wins"], st["losses"], st["ties"]) == (2, 1, 1) and st["p"] == pytest.approx(1.0)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1, 1, 20), rng.normal(1, 1, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5


def test_paired_comparison_direction():
    a = np.full(30, 3.0)
    b = a + 0.01  # a is better on every window
    r = paired_comparison(a, b)
    assert r["effect_ppl_pct"] < 0 and r["effect_ci95"][1] < 0
    assert r["win_rate"] == 1.0 and r["sign_test_p"] < 1e-6


def _nll(block_delta, n=40, ks=(2, 4), seed=0):
    rng = np.random.default_rng(seed)
    nll = {}
    for k in ks:
        base = rng.normal(3, 0.3, n)
        nll[f"greedy_lis/{k}"] = base
        nll[f"greedy_dppl/{k}"] = base + 0.001
        nll[f"block/{k}"] = base + block_delta + rng.normal(0, 0.002, n)
    return nll


@pytest.mark.parametrize("delta,expect", [(-0.02, "supported: the contiguous block beats"),
                                          (0.0, "'matches' supported"),
                                          (0.02, "not supported: greedy_lis beats")])
def test_verdict_rules(delta, expect):
    nll = _nll(delta)
    ks = [2, 4]
    rows = paired_by_k(nll, ks, {2: "greedy_dppl", 4: "greedy_dppl"})
    pool = pooled(nll, ks, "greedy_lis")
    text = verdict_contiguous(pool, rows, "greedy LIS").replace("greedy LIS beats", "greedy_lis beats")
    assert text.startswith(expect), text


def test_pooled_win_rate_resamples_windows():
    diffs = np.array([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    r = pooled_win_rate(diffs)
    assert r["win_rate"] == pytest.approx(0.5) and r["windows"] == 3 and r["pairs"] == 6
