"""Sensitivity measures and strategy selection on the real default model (tiny windows)."""

import numpy as np
import pytest
import torch

from morphlib.eval.corpus import make_windows
from morphlib.eval.metrics import Reference, window_nll
from morphlib.select.sensitivity import layer_passes, lis, lis_normalised, lis_term_shares, mds_given, single_layer_costs
from morphlib.select.layersets import is_contiguous
from morphlib.select.strategies import Selector


@pytest.fixture(scope="module")
def tiny(tok):
    return make_windows(tok, "calibration", 2, 48, seed=1)


@pytest.fixture(scope="module")
def passes(model, rtn_morpher, tiny):
    return layer_passes(model, rtn_morpher, tiny.ids)


def test_lts_matches_hidden_states_reference(model, tiny, passes):
    """LTS from the hooks equals cos(h_l, h_{l+1}) computed from HF's own hidden states."""
    with torch.no_grad():
        hs = model(tiny.ids, output_hidden_states=True, use_cache=False).hidden_states
    n = len(hs) - 1  # the last entry is after the final norm: compare layers 0..n-2
    ref = np.stack([torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)[:, 1:]
                    .mean(1).double().numpy() for i in range(n - 1)], axis=1)
    np.testing.assert_allclose(passes["lts"][:, : n - 1], ref, rtol=0, atol=1e-5)
    ang = passes["angular"].mean(0)
    assert np.allclose(np.diag(ang), 0, atol=2e-3) and np.allclose(ang, ang.T, atol=1e-5)


def test_lrs_is_high_but_below_one(passes, rtn_morpher):
    assert passes["lrs"].shape == (2, 30)
    assert (passes["lrs"] > 0.9).all() and (passes["lrs"] < 1.0).all()
    assert rtn_morpher.int4_layers() == [], "profiling must leave the model in 16 bit"


def test_single_layer_costs_and_mds(model, rtn_morpher, tiny):
    ref = Reference.compute(model, tiny.ids)
    costs = single_layer_costs(model, rtn_morpher, ref, progress=False)
    assert costs["mds"].shape == costs["dnll"].shape == costs["kl"].shape == (2, 30)
    assert (costs["kl"] > 0).all() and (costs["mds"] > 0.9).all()
    again = mds_given(model, rtn_morpher, tiny.ids, [], [3, 17])
    np.testing.assert_allclose(again[3], costs["mds"][:, 3], atol=1e-6)


def test_lis_arithmetic():
    lts, lrs, mds = np.array([0.5, 0.9]), np.array([0.99, 0.98]), np.array([0.999, 0.997])
    np.testing.assert_allclose(lis(lts, lrs, mds), 0.25 * lts + 0.25 * lrs + 0.5 * mds)
    norm = lis_normalised(lts, lrs, mds)
    assert norm.min() >= 0 and norm.max() <= 1
    shares = lis_term_shares(lts, lrs, mds)
    assert sum(shares.values()) == pytest.approx(1.0) and shares["lts"] > 0.9


def test_selector_choices(model, rtn_morpher, tiny, passes):
    ref = Reference.compute(model, tiny.ids)
    mds0 = mds_given(model, rtn_morpher, ref.ids, [], range(30))
    sel = Selector(model, rtn_morpher, ref, passes["lts"].mean(0), passes["lrs"].mean(0),
                   passes["angular"].mean(0), mds0, progress=False)
    block = sel.best_block(3)
    assert is_contiguous(block) and len(block) == 3
    singles = {i: sel.calib_nll([i]) for i in range(30)}
    assert sel.calib_nll(block) == min(sel.calib_nll(range(s, s + 3)) for s in range(28))
    order = sel.greedy_dppl_order(2)
    assert order[0] == min(singles, key=singles.get)
    with rtn_morpher.morphed(order):  # the cache returns what a fresh evaluation gives
        assert window_nll(model, ref.ids).mean() == pytest.approx(sel.calib_nll(order), abs=1e-9)
    assert sel.front_to_back(2) == [0, 1] and sel.back_to_front(2) == [28, 29] and sel.middle_block(4) == [13, 14, 15, 16]
    g = sel.gromov_block(4)
    assert is_contiguous(g) and len(g) == 4
    assert not is_contiguous([1, 3]) and is_contiguous([4, 5, 6])


def test_one_pass_gives_the_same_bits_as_two(model, rtn_morpher, tiny):
    """single_layer_costs takes MDS and loss from one forward pass: the numbers are bitwise those of two passes."""
    from morphlib.eval.metrics import score
    from morphlib.select.sensitivity import final_hidden

    ref = Reference.compute(model, tiny.ids)
    with rtn_morpher.morphed([5]):
        two = score(model, ref)
        hidden_two = final_hidden(model, tiny.ids)
        hidden: list = []
        one = score(model, ref, hidden=hidden)
    assert np.array_equal(two.nll, one.nll) and np.array_equal(two.kl, one.kl) and np.array_equal(two.top1, one.top1)
    assert torch.equal(torch.cat(hidden), hidden_two)
