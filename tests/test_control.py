"""Chapter 5's controllers: each rule on hand-made signals (a fake engine that commits at once), then on
the simulator serving a burst (swaps follow the demand, restores come back LIFO, no chatter)."""

from types import SimpleNamespace

import numpy as np
import pytest

from morphlib.engine import EngineConfig, Simulator, TableStepTime
from morphlib.engine.control import (Forecast, Marks, PredictiveController, ReactiveController, StaticController,
                                     lead_times, make_controller, surge_onsets)
from morphlib.engine.records import StepInfo, chatter
from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace

TAIL = 10  # KV blocks one swapped layer adds (the fake engine's)


class FakeEngine:
    """Swaps and restores commit at once; capacity = base + TAIL per swapped layer (when the pool grows)."""

    def __init__(self, base=100, grows=True):
        self.base, self.order = base, []
        self.layout = SimpleNamespace(tail_blocks=TAIL)
        self.config = SimpleNamespace(swap_grows_pool=grows)
        self.core = SimpleNamespace(morph=SimpleNamespace(order=self.order))
        self.calls = []

    def capacity(self):
        return self.base + (TAIL * len(self.order) if self.config.swap_grows_pool else 0)

    def swap(self, layers):
        self.calls.append(("swap", list(layers)))
        self.order.extend(layers)

    def restore(self, layers):
        self.calls.append(("restore", list(layers)))
        for li in layers:
            self.order.remove(li)

    def can_swap(self, layers):
        return not set(layers) & set(self.order)

    def can_restore(self, layers):
        return set(layers) <= set(self.order)

    def info(self, t, used, waiting=0, arrived=0, step=0):
        cap = self.capacity()
        return StepInfo(step, t, used, cap, cap - used, 1 if waiting else 0, 1, 0.0, tuple(sorted(self.order)), (),
                        0, waiting, 0, arrived)


def drive(ctrl, eng, points):
    """points: [(t, used blocks, waiting blocks[, arrived blocks])]."""
    for i, p in enumerate(points):
        t, used, waiting, *arr = p
        ctrl(eng, eng.info(t, used, waiting, arr[0] if arr else 0, i))


def test_reactive_swaps_after_persistence_only():
    eng, ctrl = FakeEngine(), ReactiveController(range(8), Marks(high=0.85, low=0.6, persist_s=0.1, step=2))
    drive(ctrl, eng, [(0.0, 80, 10), (0.05, 80, 10)])  # demand 0.9 for 50 ms: not yet
    assert eng.calls == []
    drive(ctrl, eng, [(0.1, 80, 10)])
    assert eng.calls == [("swap", [0, 1])]  # capacity 120 now: demand 0.75, below the high mark
    drive(ctrl, eng, [(0.2, 80, 10), (0.3, 100, 10)])  # 110/120 = 0.92 from 0.3 s: a new persistence period
    assert len(eng.calls) == 1
    drive(ctrl, eng, [(0.41, 100, 10)])
    assert eng.calls[-1] == ("swap", [2, 3]) and ctrl.events[-1]["t"] == 0.41


def test_a_dip_resets_persistence_and_usage_ignores_the_queue():
    eng, ctrl = FakeEngine(), ReactiveController(range(4), Marks(persist_s=0.1, step=1))
    drive(ctrl, eng, [(0.0, 90, 0), (0.08, 50, 0), (0.12, 90, 0), (0.2, 90, 0)])  # the dip at 0.08 restarts the clock
    assert eng.calls == []
    usage = ReactiveController(range(4), Marks(persist_s=0.0, step=1, signal="usage"))
    drive(usage, eng, [(0.0, 50, 60)])  # the queue needs 60 more blocks, but only 50 % of the pool is in use
    assert eng.calls == []


def test_restore_is_lifo_waits_out_the_dwell_and_needs_room():
    marks = Marks(high=0.85, low=0.6, persist_s=0.0, restore_after_s=1.0, dwell_s=5.0, step=2)
    eng, ctrl = FakeEngine(), ReactiveController([5, 6, 1, 2], marks)
    drive(ctrl, eng, [(0.0, 90, 0)])
    drive(ctrl, eng, [(0.5, 110, 0)])  # 110 / 120
    assert eng.calls == [("swap", [5, 6]), ("swap", [1, 2])] and eng.capacity() == 140
    drive(ctrl, eng, [(1.0, 20, 0), (2.5, 20, 0), (5.4, 20, 0)])  # low for long, but within 5 s of the last swap
    assert len(eng.calls) == 2
    drive(ctrl, eng, [(5.6, 20, 0)])
    assert eng.calls[-1] == ("restore", [2, 1])  # newest first
    drive(ctrl, eng, [(7.0, 60, 0), (12.0, 60, 0)])  # 60 / 120 low for 5 s, and 60 < 0.85 * 100 after: allowed...
    assert eng.calls[-1] == ("restore", [6, 5])
    # ...whereas a restore that would leave the demand above the high mark waits
    eng2, ctrl2 = FakeEngine(), ReactiveController([0, 1], Marks(persist_s=0.0, restore_after_s=0.0, dwell_s=0.0,
                                                                  step=2, low=0.75))
    drive(ctrl2, eng2, [(0.0, 95, 0)])
    drive(ctrl2, eng2, [(1.0, 86, 0)])  # 86 / 120 = 0.72 < low, but 86 >= 0.85 * 100: the tail cannot be vacated
    assert eng2.calls == [("swap", [0, 1])]
    drive(ctrl2, eng2, [(2.0, 70, 0)])  # 70 < 85: now it can
    assert eng2.calls[-1] == ("restore", [1, 0])


def test_no_action_while_pending_and_order_exhausted():
    eng, ctrl = FakeEngine(), ReactiveController([3], Marks(persist_s=0.0, step=4))
    info = eng.info(0.0, 99, 0)
    ctrl(eng, StepInfo(*[getattr(info, f) for f in ("step", "now", "kv_used", "kv_capacity", "kv_free", "waiting",
                                                     "running", "oldest_wait_s", "int4_layers")], ((3, "int4", "copying"),)))
    assert eng.calls == []
    drive(ctrl, eng, [(0.1, 99, 0), (0.2, 109, 0), (0.3, 109, 0)])
    assert eng.calls == [("swap", [3])]  # one layer in the order: nothing more to swap


def test_static_controller_swaps_once():
    eng, ctrl = FakeEngine(), StaticController([4, 2])
    drive(ctrl, eng, [(0.0, 10, 0), (1.0, 99, 50)])
    assert eng.calls == [("swap", [4, 2])] and ctrl.record()["series"]["t"] == [0.0, 1.0]
    base = StaticController()
    drive(base, eng, [(0.0, 10, 0)])
    assert len(eng.calls) == 1 and base.record()["params"]["layers"] == []


def test_predictive_swaps_ahead_of_a_ramp_sized_to_its_forecast():
    """A ramp of arrivals: demand grows 40 blocks/s from 40 % of the pool. The reactive controller acts when it
    reaches 85 % (at ~1.1 s); the forecast 2 s ahead reaches it a second earlier, and asks for enough layers."""
    marks = Marks(high=0.85, low=0.6, persist_s=0.0, step=1)
    pts = [(t, 40 + 40 * t, 0, 40 * t) for t in np.arange(0.0, 2.0, 0.05)]
    eng_r, eng_p = FakeEngine(), FakeEngine()
    react, pred = ReactiveController(range(8), marks), PredictiveController(range(8), marks, Forecast(horizon_s=2.0))
    drive(react, eng_r, [(t, u, w) for t, u, w, _ in pts])
    drive(pred, eng_p, pts)
    t_react, t_pred = react.events[0]["t"], pred.events[0]["t"]
    assert t_react == pytest.approx(1.15, abs=0.051) and t_pred < t_react - 0.5
    onset = 1.15
    assert lead_times(pred.events, [onset])[0].lead_s > 0.5 and lead_times(react.events, [onset])[0].lead_s <= 0
    assert all(v is None or v >= 0 for v in pred.record()["series"]["forecast"])


def test_predictive_sizes_its_swap_to_a_surge_of_arrivals():
    """Ten steady seconds (10 blocks/s arrive and leave, 50 in use), then 60 blocks arrive in 0.3 s and the demand
    rises to 80 % only: the reactive controller waits, the predictive one asks for several steps of layers at once."""
    marks = Marks(high=0.85, low=0.6, persist_s=0.0, step=1)
    steady = [(t, 50, 0, 10 * t) for t in np.arange(0.0, 10.0, 0.1)]
    surge = [(10.0 + dt, 50 + 100 * dt, 0, 100 + 200 * dt) for dt in (0.1, 0.2, 0.3)]
    eng_r, eng_p = FakeEngine(), FakeEngine()
    react, pred = ReactiveController(range(8), marks), PredictiveController(range(8), marks)
    drive(react, eng_r, [(t, u, w) for t, u, w, _ in steady + surge])
    drive(pred, eng_p, steady + surge)
    assert react.events == [] and pred.events[0]["t"] == 10.1  # at the first sight of the surge
    assert len(pred.events[0]["layers"]) > 2 and pred.events[0]["forecast"] > 1


def test_surge_onsets_and_lead_times_by_hand():
    t = [0, 1, 2, 3, 4, 5, 6, 7]
    d = [0.5, 0.9, 0.95, 0.7, 0.88, 0.3, 0.86, 0.2]
    assert surge_onsets(t, d, 0.85, 0.6) == [1.0, 6.0]  # 4 s is not a new surge: never below 0.6 in between
    events = [{"t": 0.4, "action": "swap"}, {"t": 2.0, "action": "restore"}, {"t": 6.5, "action": "swap"}]
    leads = lead_times(events, [1.0, 6.0], lookback_s=3, lag_s=1)
    assert [(x.first_swap, x.lead_s) for x in leads] == [(0.4, pytest.approx(0.6)), (6.5, -0.5)]
    assert lead_times([], [1.0])[0].lead_s is None
    # one swap between two onsets answers the first only
    once = lead_times([{"t": 1.5, "action": "swap"}], [1.0, 6.0], lookback_s=10, lag_s=10)
    assert [x.first_swap for x in once] == [1.5, None]


def test_make_controller_and_one_line_errors():
    c = make_controller({"name": "predictive", "order": [1, 2], "marks": {"high": 0.9, "low": 0.5},
                         "forecast": {"horizon_s": 1.0}})
    assert isinstance(c, PredictiveController) and c.params()["high"] == 0.9 and c.params()["horizon_s"] == 1.0
    assert make_controller({"name": "static"}).layers == ()
    for bad in ({"name": "pid"}, {"name": "static", "order": [1]}, {"name": "reactive", "order": [1, 1]},
                {"name": "reactive", "order": []}, {"name": "reactive", "order": [0], "marks": {"high": 0.5, "low": 0.6}},
                {"name": "reactive", "order": [0], "marks": {"step": 0}}, {"name": "reactive", "order": [0], "marks": {"x": 1}},
                {"name": "reactive", "order": [0], "marks": {"signal": "queue"}},
                {"name": "predictive", "order": [0], "forecast": {"tau_short_s": 5, "tau_long_s": 1}},
                {"name": "static", "layers": "01"}, "reactive"):
        with pytest.raises(MorphError) as exc:
            make_controller(bad)
        assert "\n" not in str(exc.value)


def burst_trace():
    """A quiet second, a burst of 40 requests in 0.3 s, a quiet tail."""
    rng = np.random.default_rng(5)
    t = np.concatenate([np.sort(rng.uniform(0, 1.0, 6)), np.sort(rng.uniform(1.0, 1.3, 40)),
                        np.sort(rng.uniform(1.3, 6.0, 6))])
    n = len(t)
    return Trace("burst", "azure", t - t[0], rng.integers(20, 60, n), rng.integers(8, 30, n), "t0")


def test_reactive_on_the_simulator_grows_the_pool_then_restores_lifo():
    cfg = EngineConfig(kv_blocks=40, max_model_len=128, max_num_seqs=16, max_num_batched_tokens=128,
                       copy_bandwidth=1e9, cuda_graphs=False)
    table = TableStepTime({1: 0.004, 8: 0.006, 16: 0.008}, prefill_token_s=2e-5)
    sim = Simulator("shape:smollm2-135m", cfg, table)
    marks = Marks(high=0.85, low=0.5, persist_s=0.02, restore_after_s=0.3, dwell_s=0.5, step=2)
    order = [12, 13, 14, 15, 11, 16]
    ctrl = ReactiveController(order, marks, sample_s=0.01)
    sim.controller = ctrl
    res = sim.replay(burst_trace(), idle_tick_s=0.05)
    swaps = [e for e in ctrl.events if e["action"] == "swap"]
    restores = [e for e in ctrl.events if e["action"] == "restore"]
    assert swaps and restores and max(len(r.state) for r in res.steps) <= len(order)
    assert swaps[0]["layers"] == [12, 13] and all(e["demand"] >= 0.85 for e in swaps)
    # last in, first out: the restores undo the swaps in reverse
    assert [li for e in restores for li in e["layers"]] == [li for e in reversed(swaps) for li in reversed(e["layers"])][
        :sum(len(e["layers"]) for e in restores)]
    assert chatter(res.morph_ops, marks.dwell_s) == 0
    assert max(r.kv_capacity for r in res.steps) > 40 and res.steps[-1].state == ()
    assert ctrl.record()["series"]["capacity"][0] == 40
