"""Chapter 2 across genres: the middle-third block, pooled perplexity effects, the domain checks' config."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from morphbook.experiments import domains
from morphbook.experiments.verdicts import paired_by_k, pooled, pooled_effect, pooled_versus, verdict_middle_third
from morphlib.errors import MorphError
from morphlib.select.layersets import middle_third, middle_third_starts
from morphlib.select.strategies import STRATEGIES, Selector


@pytest.mark.parametrize("num_layers", [3, 18, 22, 30, 31, 32])
def test_middle_third_blocks_overlap_it_as_far_as_k_allows(num_layers):
    lo, hi = middle_third(num_layers)
    assert lo == num_layers - hi and hi - lo >= num_layers / 3
    for k in range(1, num_layers + 1):
        overlap = {s: len(set(range(s, s + k)) & set(range(lo, hi))) for s in range(num_layers - k + 1)}
        best = max(overlap.values())
        assert best == min(k, hi - lo)
        assert middle_third_starts(num_layers, k) == [s for s, o in overlap.items() if o == best]
    with pytest.raises(MorphError, match="cannot pick 31 of 30"):
        middle_third_starts(30, 31)


def test_middle_third_starts_for_smollm2_depth():
    assert middle_third(30) == (10, 20)
    assert middle_third_starts(30, 2) == list(range(10, 19))
    assert middle_third_starts(30, 10) == [10]  # the middle third itself
    assert middle_third_starts(30, 12) == [8, 9, 10]  # blocks covering it
    assert middle_third_starts(30, 24) == list(range(7))  # every 24-block covers layers 10-19


class _ToySelector(Selector):
    """A Selector whose calibration loss is a given function of the layer set (no model)."""

    def __init__(self, num_layers, loss):
        super().__init__(None, SimpleNamespace(num_layers=num_layers), calib=None, progress=False)
        self.loss = loss

    def calib_nll(self, layers) -> float:
        return self.loss(sorted(layers))


def test_middle_third_block_is_the_calibrated_choice_inside_the_middle_third():
    front = _ToySelector(30, lambda layers: float(np.mean(layers)))  # the front is cheapest
    choose = STRATEGIES["middle_third_block"].choose
    assert STRATEGIES["middle_third_block"].contiguous
    assert STRATEGIES["block"].choose(front, [2, 12]) == {2: [0, 1], 12: list(range(12))}
    assert choose(front, [2, 10, 12]) == {2: [10, 11], 10: list(range(10, 20)), 12: list(range(8, 20))}
    centred = _ToySelector(30, lambda layers: abs(float(np.mean(layers)) - 14.5))  # the centre is cheapest
    assert choose(centred, [4]) == STRATEGIES["block"].choose(centred, [4]) == {4: [13, 14, 15, 16]}


def _nll(windows=40, seed=0, shift=0.01):
    rng = np.random.default_rng(seed)
    other = {f"greedy_lis/{k}": rng.normal(3.0, 0.2, windows) for k in (2, 4)}
    block = {f"block/{k}": other[f"greedy_lis/{k}"] + shift * (1 + (k == 4)) for k in (2, 4)}
    return {**other, **block}


def test_pooled_effect_is_the_geometric_mean_perplexity_ratio_over_k():
    nll = _nll(shift=0.01)  # the block is worse by 0.01 nats at k=2 and 0.02 at k=4, on every window
    eff = pooled_effect(nll, [2, 4], "greedy_lis")
    assert eff["effect_ppl_pct"] == pytest.approx(100 * (math.exp(0.015) - 1))
    assert eff["effect_ci95"] == pytest.approx([100 * (math.exp(0.015) - 1)] * 2)  # a constant shift: no spread
    both = pooled_versus(nll, [2, 4], "greedy_lis")
    assert both["win_rate"] == 0.0 and both["effect_ppl_pct"] == eff["effect_ppl_pct"] and both["windows"] == 40
    flipped = pooled(nll, [2, 4], "block", first="greedy_lis")
    assert flipped["win_rate"] == 1.0 and flipped["sign_test_p"] < 1e-6


def test_per_k_rows_carry_the_win_rate_ci():
    nll = _nll(shift=0.0)
    rng = np.random.default_rng(1)
    nll = {**nll, **{f"block/{k}": nll[f"greedy_lis/{k}"] + rng.normal(0.0, 0.05, 40) for k in (2, 4)}}
    for row in paired_by_k(nll, [2, 4], {2: "greedy_lis", 4: "greedy_lis"}):
        lo, hi = row["win_rate_ci95"]
        assert lo <= row["win_rate"] <= hi and 0.0 < lo < hi < 1.0
        assert row["win_rate"] == pooled(nll, [row["k"]], "greedy_lis")["win_rate"]


def test_verdict_middle_third_follows_the_contiguous_rule():
    cell = {"effect_ppl_pct": 1.2, "effect_ci95": [0.5, 1.9]}
    assert verdict_middle_third({**cell, "win_rate": 0.2, "ci95": [0.1, 0.3], "sign_test_p": 0.001}).startswith(
        "the calibrated block beats the middle-third block (win rate 0.20, p=0.001; held-out perplexity +1.20 %")
    assert verdict_middle_third({**cell, "win_rate": 0.8, "ci95": [0.7, 0.9], "sign_test_p": 0.001}).startswith(
        "the middle-third block beats")
    assert verdict_middle_third({**cell, "win_rate": 0.45, "ci95": [0.3, 0.6], "sign_test_p": 0.4}).startswith(
        "no detectable difference")
    assert verdict_middle_third({**cell, "win_rate": 0.3, "ci95": [0.2, 0.45], "sign_test_p": 0.06}).startswith(
        "no detectable difference")  # both conditions are needed


def test_domains_config_defaults_and_refusals():
    gpu = domains.Config.for_profile("gpu")
    assert gpu.extra_heldout == ("email-2002", "spdx-licences", "npm-docs", "networkx-source")
    assert gpu.extra_heldout_windows == 32 and gpu.cross_calib_windows == 16
    assert set(gpu.extra_heldout) <= set(gpu.cross_calibration) and "sotu-2001-2021" not in gpu.cross_calibration
    with pytest.raises(MorphError, match="unknown domain.*'dialogue'"):
        domains.Config.for_profile("cpu", extra_heldout=["dialogue"])
    with pytest.raises(MorphError, match="none of chapter 2's own"):
        domains.Config.for_profile("cpu", extra_heldout=["moby-dick"])
    with pytest.raises(MorphError, match="each domain once"):
        domains.Config.for_profile("cpu", extra_heldout=["npm-docs", "npm-docs"])
    with pytest.raises(MorphError, match="extra_heldout_windows must be an integer >= 1, got 0"):
        domains.Config.for_profile("cpu", extra_heldout_windows=0)


def test_domains_refuse_chapter2_results_without_the_middle_third_block(tmp_path):
    from morphbook.experiments.base import Result
    from morphbook.publish.inputs import load_inputs
    from morphbook.publish.store import save_result
    from morphlib import fingerprint

    params = {"profile": "cpu", "texts": "default", "ks": [2]}
    files = {"sets.json": {"block": {"2": [0, 1]}, "greedy_lis": {"2": [3, 7]}}, "window_nll.json": {}, "windows.json": {}}
    save_result("strategies", Result(params, {"per_k": {}}, files), tmp_path, recording=fingerprint.Recording())
    with pytest.raises(MorphError, match="predate the middle_third_block strategy: run chapter 2 again"):
        domains.run(domains.Config.for_profile("cpu"), load_inputs("domains", tmp_path))
