"""Replay windows fixed from arrivals alone: busiest / median / tiled by hand, pre-roll, rate and token scaling."""

import numpy as np
import pytest

from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace, load_named
from morphlib.workloads.windows import at_rate, replay_window, tokens_scaled, window_starts, window_tokens


def trace():
    t = np.array([0.0, 1.0, 2.5, 3.0, 3.2, 3.9, 6.0, 9.0, 10.0])
    ctx = np.array([10, 10, 10, 100, 100, 100, 10, 50, 10])
    gen = np.full(9, 5)
    return Trace("hand", "azure", t, ctx, gen, "t0")


def test_windows_by_hand():
    tr = trace()
    starts, tokens = window_tokens(tr, 2.0)
    assert list(starts) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # [0, 2): 0.0, 1.0; [1, 3): 1.0, 2.5; [2, 4): 2.5, 3.0, 3.2, 3.9; ... [7, 9): none; [8, 10): 9.0
    assert list(tokens) == [30, 30, 15 + 315, 315, 0, 15, 15, 0, 55]
    assert window_starts(tr, 2.0, "busiest") == [2.0]
    # the median of those is 30: the earliest window holding it starts at 0
    assert window_starts(tr, 2.0, "median") == [0.0]
    assert window_starts(tr, 4.0, "tiled") == [0.0, 4.0]
    for bad in ((20.0, "busiest"), (2.0, "quietest"), (0, "busiest")):
        with pytest.raises(MorphError):
            window_starts(tr, *bad)


def test_preroll_measure_mask_and_rate():
    w = replay_window(trace(), 3.0, 3.0, preroll_s=1.0)  # [2, 6): 2.5, 3.0, 3.2, 3.9 (2.5 in the pre-roll)
    assert list(w.trace.arrival_s) == pytest.approx([0.5, 1.0, 1.2, 1.9])
    assert list(w.measured) == [False, True, True, True] and w.requests == 3 and w.median_prompt() == 100
    early = replay_window(trace(), 0.5, 2.0, preroll_s=5.0)  # the pre-roll cannot start before the trace
    assert early.preroll_s == 0.5 and list(early.trace.arrival_s) == [0.0, 1.0]
    fast = at_rate(w, rate=4.0, natural=1.0)
    assert list(fast.trace.arrival_s) == pytest.approx([0.125, 0.25, 0.3, 0.475])
    assert (fast.length_s, fast.preroll_s) == (0.75, 0.25) and "4 req/s" in fast.trace.name
    with pytest.raises(MorphError, match="no request"):
        replay_window(trace(), 4.0, 1.9, preroll_s=0.0)
    with pytest.raises(MorphError):
        at_rate(w, rate=0, natural=1.0)


def test_token_scaling_and_the_shipped_traces():
    t = tokens_scaled(trace(), 8)
    assert list(t.context_tokens[:4]) == [2, 2, 2, 13] and list(t.generated_tokens[:2]) == [1, 1]
    conv = load_named("azure-conv")
    (busy,), (median,) = window_starts(conv, 72, "busiest"), window_starts(conv, 72, "median")
    starts, tokens = window_tokens(conv, 72)
    assert tokens[int(busy)] == tokens.max() and tokens[int(median)] == pytest.approx(np.median(tokens), rel=0.01)
    assert len(window_starts(conv, 72, "tiled")) == int(conv.span_s // 72)
