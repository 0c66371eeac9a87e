"""One engine core, two executors: ``LLM`` on CPU (real forward passes) on a virtual clock fed by a fixed
step-time table makes exactly the scheduling decisions, block tables and morph commits that ``Simulator``
makes with the same table; both repeat bitwise after ``reset``. Plus the replay driver on virtual time."""

import numpy as np
import pytest
import torch

from morphlib.engine import LLM, EngineConfig, SamplingParams, Simulator, TableStepTime, VirtualClock
from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace
from test_engine_units import tiny  # noqa: F401  (the tiny random Llama fixture)

TABLE = TableStepTime({1: 0.004, 2: 0.005, 4: 0.006, 8: 0.008}, prefill_token_s=4e-5, context_token_s=2e-6)
# KV pressure (12 main blocks of 16 tokens), small copy chunks at 20 MB/s: a swap takes a few paced steps
CFG = dict(kv_blocks=12, max_model_len=128, max_num_batched_tokens=48, max_num_seqs=6, copy_chunk_bytes=1 << 16,
           copy_bandwidth=2e7, cuda_graphs=False)


def bursty_trace(n=28, seed=3):
    rng = np.random.default_rng(seed)
    gaps = np.where(rng.random(n) < 0.7, rng.exponential(0.004, n), rng.exponential(0.08, n))
    return Trace("bursty", "azure", np.cumsum(gaps) - gaps[0], rng.integers(8, 60, n), rng.integers(4, 40, n), "t0")


def controller(engine, info):
    """Deterministic: swaps and restores at fixed step indices (no clock, no randomness)."""
    if info.step == 3:
        engine.swap([1, 2])
    elif info.step == 40:
        engine.restore([2])
    elif info.step == 60:
        engine.swap([3])
    elif info.step == 90 and engine.can_restore():
        engine.restore()


def observe(engine):
    """Everything the two executors must agree on, step by step."""
    seen = []

    def hook(rec):
        tables = tuple(sorted((s.id, tuple(s.block_table)) for s in engine.scheduler.running))
        seen.append((rec.index, rec.start, rec.end, rec.batch, rec.state, rec.kv_used, rec.kv_capacity,
                     rec.preempted, rec.admitted, rec.finished, rec.copy_bytes, rec.sync_copy_bytes,
                     tuple((op.layer, op.to) for op in rec.committed), tables))

    engine.on_step.append(hook)
    return seen


def run(engine, **kw):
    engine.controller = controller
    seen = observe(engine)
    res = engine.replay(bursty_trace(), **kw)
    engine.on_step.clear()
    ops = [(op.layer, op.to, op.request_step, op.issue_step, op.commit_step, op.requested, op.committed,
            op.copy_bytes, op.migrated, op.preempted) for op in res.morph_ops]
    outs = [(o.request_id, o.arrival, o.first_scheduled, o.first_token, o.finished, o.token_times, o.preemptions,
             o.recomputed_tokens) for o in res.outputs]
    return seen, ops, outs, res


@pytest.mark.parametrize("mode", ["side", "sync"])
def test_llm_on_cpu_and_simulator_decide_alike(tiny, mode):
    cfg = EngineConfig(**CFG, swap_mode=mode)
    llm = LLM(tiny, cfg, clock=VirtualClock(TABLE))
    sim = Simulator(tiny, cfg, TABLE)
    assert sim.layout.main_blocks == llm.layout.main_blocks and sim.layout.tail_blocks == llm.layout.tail_blocks
    a = run(llm)
    b = run(sim)
    assert a[:3] == b[:3]
    seen, ops, _, res = a
    # the stream is one that exercises the core: preemptions, swaps, restores (with migration), paced copies
    assert sum(r[7] for r in seen) > 0 and {o[1] for o in ops} == {"int4", "fp16"}
    assert any(o[8] for o in ops), "a restore should have migrated live tail blocks"
    if mode == "side":
        assert all(o[4] > o[3] for o in ops)  # paced: committed at a later boundary than issued
    else:
        assert all(o[4] == o[3] for o in ops) and any(r[11] for r in seen)
    assert res.summary()["requests"] == 28
    llm.reset()
    sim.reset()
    assert run(llm)[:3] == a[:3]  # bitwise repeatable on identical arrivals
    assert run(sim)[:3] == b[:3]


def test_simulator_replays_on_virtual_time_with_idle_ticks(tiny):
    """The controller is called while nothing runs (a restore can start between bursts), the clock jumps."""
    sim = Simulator(tiny, EngineConfig(**CFG), TABLE)
    calls = []

    def ctl(engine, info):
        calls.append((info.now, info.running + info.waiting))
        if info.running + info.waiting == 0 and engine.int4_layers and engine.can_restore():
            engine.restore()
        elif info.waiting > 2 and engine.can_swap([0, 1]) and not engine.int4_layers:
            engine.swap([0, 1])

    sim.controller = ctl
    trace = Trace("two bursts", "azure", np.array([0.0, 0.001, 0.002, 0.003, 5.0, 5.001]),
                  np.array([50] * 6), np.array([30] * 6), "t0")
    res = sim.replay(trace, idle_tick_s=0.5)
    idle_calls = [t for t, busy in calls if busy == 0 and 0.5 < t < 5.0]
    assert len(idle_calls) >= 5  # ticks between the bursts
    restores = [op for op in res.morph_ops if op.to == "fp16"]
    assert restores and restores[0].requested < 5.0  # started while idle
    assert res.duration_s >= 5.0 and len(res.outputs) == 6
    s = res.summary(slo_ttft_s=1.0, slo_tpot_s=0.05)
    assert s["swaps"] >= 1 and s["restores"] >= 1 and 0 < s["int4_layers_time_weighted"] < 2


def test_reset_serves_policies_on_identical_arrivals(tiny):
    llm = LLM(tiny, EngineConfig(**CFG), clock=VirtualClock(TABLE))
    first = llm.replay(bursty_trace(12))
    llm.swap([0, 1, 2, 3], wait=True)
    assert llm.int4_layers == [0, 1, 2, 3]
    llm.reset()
    assert llm.int4_layers == [] and llm.steps == [] and llm.clock.now() == 0.0
    again = llm.replay(bursty_trace(12))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    assert [o.request_id for o in again.outputs] == list(range(12))
    assert [(r.start, r.batch) for r in again.steps] == [(r.start, r.batch) for r in first.steps]


def test_simulator_needs_a_size_and_a_model(tiny):
    with pytest.raises(MorphError, match="step-time model"):
        Simulator(tiny, EngineConfig(**CFG))
    with pytest.raises(MorphError, match="budget, a card or kv_blocks"):
        Simulator(tiny, EngineConfig(), TABLE)
    with pytest.raises(MorphError, match="model shape"):
        Simulator("gpt-5", EngineConfig(kv_blocks=64), TABLE)
    with pytest.raises(MorphError, match="TableStepTime"):
        TableStepTime({0: 0.1})
    sim = Simulator("shape:llama-2-7b", EngineConfig(card="L4", dtype="bfloat16"), TABLE, workspace_bytes=1 << 30)
    assert sim.layout.main_blocks > 800


def test_replay_warmup_and_scaled_window(tiny):
    sim = Simulator(tiny, EngineConfig(**CFG), TABLE)
    trace = bursty_trace(40).window(0.05, 0.5).scaled(50.0)
    res = sim.replay(trace, warmup=3, precapture=[1, 2])
    assert res.warmup == 3 and len(res.outputs) == len(trace) and trace.name in res.trace
    assert [o.request_id for o in res.outputs] == list(range(3, 3 + len(trace)))  # the warm-up requests came first
    assert res.steps[0].index > 0 and all(o.arrival >= res.steps[0].start for o in res.outputs)
    for bad in (dict(warmup=-1), dict(idle_tick_s=0), dict(time_scale=0)):
        with pytest.raises(MorphError):
            sim.replay(trace, **bad)
