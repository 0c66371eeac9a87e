"""One way to serve a window: the CPU engine on a virtual clock and the simulator give the same payload for a
policy; a simulator task repeats bitwise, in worker processes too; metrics by hand."""

import numpy as np
import pytest

from morphlib.engine import LLM, EngineConfig, VirtualClock
from morphlib.engine.steptime import StepTimeFit
from morphlib.engine.sweep import digest, metrics, run_sweep, serve, simulate, trace_dict
from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace
from test_engine_units import tiny  # noqa: F401  (the tiny random Llama fixture)

KNOTS = (1, 16, 64, 128)
MODEL = StepTimeFit((), KNOTS, (), (), tuple(0.002 + 3e-5 * k for k in KNOTS), tuple(5e-5 for _ in KNOTS),
                    (0.0, 2e-7), (0.0, 1e-5), copy_factor=1.1, idle_s=1e-4)
ENGINE = dict(kv_blocks=14, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, copy_bandwidth=5e7,
              copy_chunk_bytes=1 << 16, cuda_graphs=False)
CONTROLLER = {"name": "reactive", "order": [1, 2, 0], "marks": {"high": 0.8, "low": 0.4, "persist_s": 0.01,
                                                              "restore_after_s": 0.1, "dwell_s": 0.2, "step": 1}}


def window():
    rng = np.random.default_rng(2)
    t = np.cumsum(np.where(rng.random(40) < 0.6, rng.exponential(0.003, 40), rng.exponential(0.05, 40)))
    return Trace("w", "azure", t - t[0], rng.integers(10, 50, 40), rng.integers(3, 25, 40), "t0")


def task(tiny, **kw):
    return {"model": tiny.config.to_dict(), "engine": ENGINE, "step_time": MODEL.to_dict(), "trace": trace_dict(window()),
            "measured": [i >= 5 for i in range(40)], "controller": CONTROLLER, "warmup": 3, "idle_tick_s": 0.02,
            "seed": 7, "key": "k", **kw}


def test_engine_on_virtual_clock_serves_as_the_simulator_does(tiny):
    sim = simulate(task(tiny))
    llm = LLM(tiny, EngineConfig(**ENGINE), clock=VirtualClock(MODEL))
    eng = serve(llm, window(), [i >= 5 for i in range(40)], controller=CONTROLLER, warmup=3, idle_tick_s=0.02, seed=7)
    assert digest(sim) == digest(eng) and digest(sim) != digest({**sim, "clipped": 1})
    assert sim["ops"] and sim["controller"]["events"] and max(sim["steps"]["int4"]) > 0
    assert sum(sim["steps"]["preempted"]) >= 0 and len(sim["requests"]["arrival"]) == 40
    # the warm-up is not in the payload: request times start at the replay's start
    assert min(sim["requests"]["arrival"]) == 0.0 and sim["warmup"] == 3


def test_sweep_workers_repeat_bitwise_and_static_sets(tiny):
    tasks = [task(tiny), task(tiny, controller=None, static=[0, 1, 2, 3], key="static")]
    here = run_sweep(tasks, workers=1)
    there = run_sweep(tasks, workers=2)
    assert [digest(p) for p in here] == [digest(p) for p in there] and [p["key"] for p in there] == ["k", "static"]
    static = here[1]
    assert set(static["steps"]["int4"]) == {4} and static["ops"] == [] and static["controller"] is None
    with pytest.raises(MorphError):
        run_sweep(tasks, workers=0)


def test_metrics_by_hand():
    payload = {"requests": {"arrival": [0.0, 0.0, 1.0, 2.0], "first_scheduled": [0.0] * 4,
                            "first_token": [0.5, 3.0, 1.2, 2.1], "finished": [1.5, 3.0, 2.2, 4.1],
                            "prompt": [5] * 4, "output": [11, 1, 11, 3], "preemptions": [0, 1, 0, 2],
                            "recomputed": [0, 7, 0, 3]},
               "measured": [False, True, True, True],
               "steps": {"start": [0.0, 1.0, 3.0], "end": [1.0, 3.0, 4.1], "int4": [0, 2, 4]},
               "ops": [{"to": "int4"}, {"to": "int4"}, {"to": "fp16"}], "clipped": 1, "duration_s": 4.1}
    m = metrics(payload, slo_ttft_s=1.0, slo_tpot_s=0.5, length_s=2.0)
    # measured: ttft 3.0 (bad), 0.2, 0.1; tpot 0 (one token), 0.1, 1.0 (bad): joint bad 2 of 3
    assert m["requests"] == 3 and m["ttft_violation_pct"] == pytest.approx(100 / 3)
    assert m["tpot_violation_pct"] == pytest.approx(100 / 3) and m["slo_violation_pct"] == pytest.approx(200 / 3)
    assert m["goodput_rps"] == 0.5 and m["preemptions"] == 3 and m["recomputed_tokens"] == 10
    assert (m["swaps"], m["restores"]) == (2, 1) and m["tpot_mean_ms"] == pytest.approx(550)
    assert m["int4_layers_time_weighted"] == pytest.approx((0 * 1 + 2 * 2 + 4 * 1.1) / 4.1)
