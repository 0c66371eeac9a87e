"""Trace windows and rate scaling for the serving chapters (replays on identical arrivals)."""

import numpy as np
import pytest

from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace, load_named


def toy():
    return Trace("toy", "azure", np.array([0.0, 1.0, 2.5, 4.0, 9.0]), np.arange(10, 15), np.arange(1, 6), "t0")


def test_window_keeps_its_requests_and_counts_from_its_start():
    w = toy().window(2.0, 3.0)
    assert w.arrival_s.tolist() == [0.5, 2.0] and w.context_tokens.tolist() == [12, 13]
    assert w.generated_tokens.tolist() == [3, 4] and w.name == "toy [2, 5) s" and len(toy()) == 5
    assert toy().window(0, 100).arrival_s.tolist() == toy().arrival_s.tolist()
    for bad in ((5.0, 3.0), (-1, 2), (0, 0), (float("nan"), 1), (True, 1)):
        with pytest.raises(MorphError, match="Trace.window"):
            toy().window(*bad)


def test_scaled_reaches_the_target_rate():
    t = toy()
    assert t.mean_rate == pytest.approx(4 / 9)
    s = t.scaled(2.0)
    assert s.mean_rate == pytest.approx(2.0) and s.name == "toy @ 2 req/s"
    assert np.allclose(s.arrival_s, t.arrival_s * (4 / 9) / 2) and s.context_tokens is t.context_tokens
    assert t.scaled(0.1).span_s == pytest.approx(40.0)
    with pytest.raises(MorphError, match="positive"):
        t.scaled(0)
    with pytest.raises(MorphError, match="no mean rate"):
        Trace("one", "azure", np.array([0.0]), np.array([5]), np.array([5]), "t0").scaled(1.0)


def test_window_of_a_shipped_trace_then_scaled():
    conv = load_named("azure-conv")
    w = conv.window(600.0, 120.0)
    assert 0 < len(w) < len(conv) and w.arrival_s.min() >= 0 and w.arrival_s.max() < 120
    assert w.scaled(3.0).mean_rate == pytest.approx(3.0)
