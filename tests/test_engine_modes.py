"""Ablation switches (grow the pool or not; INT4 compute or the 16-bit oracle), swap modes (side / sync), the
per-step, per-op and per-request records and the replay summary, on a CPU engine and by hand."""

import numpy as np
import pytest

from morphlib.engine import LLM, EngineConfig, SamplingParams, Simulator, TableStepTime, VirtualClock
from morphlib.engine.morphing import MorphOp
from morphlib.engine.records import ReplayResult, StepRecord, chatter
from morphlib.engine.sequence import RequestOutput
from morphlib.errors import MorphError
from test_engine_units import tiny  # noqa: F401  (the tiny random Llama fixture)

TABLE = TableStepTime({1: 0.004, 8: 0.008}, prefill_token_s=5e-5, h2d_bytes_per_s=1e9)
BASE = dict(kv_blocks=12, max_model_len=128, max_num_batched_tokens=64, max_num_seqs=6, cuda_graphs=False)


@pytest.mark.parametrize("grows,compute", [(True, "int4"), (False, "int4"), (True, "fp16"), (False, "fp16")])
def test_ablation_switches(tiny, grows, compute):
    llm = LLM(tiny, EngineConfig(**BASE, swap_grows_pool=grows, swap_compute=compute))
    cap, tail = llm.kv_capacity, llm.layout.tail_blocks
    digest = llm.weight_digest()
    ops = llm.swap([1, 2], wait=True)
    assert llm.int4_layers == [1, 2] and llm.morph_state[1] == "int4"
    assert llm.kv_capacity == cap + (2 * tail if grows else 0)
    assert llm.morph.compute == (frozenset({1, 2}) if compute == "int4" else frozenset())
    assert all(op.oracle == (compute == "fp16") and op.grows_pool == grows for op in ops)
    assert [op.copy_bytes for op in ops] == [llm.layout.head_bytes] * 2  # the same traffic in every mode
    assert llm.memory_report()["oracle_reserve_bytes"] == (4 * llm.layout.region_bytes if compute == "fp16" else 0)
    if compute == "fp16":  # the live 16-bit bytes were never touched
        assert llm.weight_digest() == digest
    out = llm.generate([list(range(5, 60))] * 3, SamplingParams(max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in out)
    back = llm.restore(wait=True)
    assert [op.copy_bytes for op in back] == [llm.layout.region_bytes] * 2
    assert llm.kv_capacity == cap and llm.int4_layers == [] and llm.weight_digest() == digest


def test_sync_mode_commits_at_the_boundary_and_costs_the_step(tiny):
    """A sync swap copies on the compute stream at the boundary and commits there; its bytes are the step's
    (a step-time model charges them): the control that stalls decode."""
    runs = {}
    for mode in ("side", "sync"):
        sim = Simulator(tiny, EngineConfig(**BASE, swap_mode=mode, copy_chunk_bytes=1 << 13, copy_bandwidth=5e6), TABLE)
        seqs = [sim.add_request(list(range(3, 40)), SamplingParams(max_tokens=30, ignore_eos=True)) for _ in range(3)]
        for _ in range(3):
            sim.step()
        (op,) = sim.swap([2])
        while op.phase != "done":
            sim.step()
        while any(s.finished is None for s in seqs):
            sim.step()
        runs[mode] = (op, sim.steps)
    (side_op, side_steps), (sync_op, sync_steps) = runs["side"], runs["sync"]
    assert sync_op.issue_step == sync_op.commit_step and side_op.commit_step > side_op.issue_step + 1
    stall = sync_steps[sync_op.issue_step]
    assert stall.sync_copy_bytes == sync_op.copy_bytes and stall.committed == [sync_op]
    assert stall.seconds == pytest.approx(TABLE.step_seconds(stall))  # a record carries what the table reads
    assert stall.seconds > sync_steps[sync_op.issue_step - 1].seconds + 0.8 * sync_op.copy_bytes / 1e9
    paced = [r for r in side_steps[side_op.issue_step:side_op.commit_step]]
    assert all(r.copy_in_flight for r in paced) and sum(r.copy_bytes for r in paced) == side_op.copy_bytes
    assert max(r.copy_bytes for r in paced) < side_op.copy_bytes  # spread over several steps
    assert side_op.latency_s > sync_op.latency_s


def test_step_and_request_records(tiny):
    llm = LLM(tiny, EngineConfig(**BASE), clock=VirtualClock(TABLE))
    a = llm.add_request(list(range(1, 41)), SamplingParams(max_tokens=5, ignore_eos=True))
    b = llm.add_request(list(range(1, 31)), SamplingParams(max_tokens=3, ignore_eos=True))
    r0 = llm.step()  # 64-token budget: a's 40-token prompt, b's first 24
    assert (r0.prefill_tokens, r0.decode_seqs, r0.num_sampled, r0.context_sum) == (64, 0, 1, 40 + 24)
    assert r0.batch == ((a.id, 40), (b.id, 24)) and r0.admitted == 2 and r0.bucket is None
    r1 = llm.step()  # a decodes, b finishes its prompt (6 tokens) and samples
    assert (r1.prefill_tokens, r1.decode_seqs, r1.num_tokens, r1.context_sum) == (6, 1, 7, 41 + 30)
    assert set(r0.host_ms) == {"schedule", "prepare", "launch", "sync", "bookkeeping"}
    while not llm.core.idle:
        llm.step()
    assert sum(r.finished for r in llm.steps) == 2
    oa = llm._output(a)
    assert oa.queueing_s == 0.0 and len(oa.inter_token_s) == 4
    assert oa.inter_token_s == pytest.approx(np.diff(oa.token_times).tolist())
    assert oa.tpot == pytest.approx(np.mean(oa.inter_token_s))


def _out(rid, arrival, times):
    return RequestOutput(rid, [1], [7] * len(times), arrival, arrival, times[0], list(times), times[-1], 0, "length")


def test_summary_by_hand():
    """Request 0 has one long stall between tokens (its TPOT mean hides it, its inter-token P99 does not)."""
    outs = [_out(0, 0.0, [0.5, 0.6, 0.7, 3.0]), _out(1, 1.0, [1.2, 1.3, 1.4, 1.5]),
            _out(2, 2.0, [4.5, 4.6]), _out(3, 2.5, [2.9])]
    steps = [StepRecord(i, t, t + 0.1, "graph" if i % 2 else "eager", 1, 1, 1, (3,) if i >= 2 else (), 5, 10, 0, 1)
             for i, t in enumerate([0.0, 1.0, 2.0, 3.0])]
    op_swap = MorphOp(3, "int4", 1.5, committed=1.9)
    op_back = MorphOp(3, "fp16", 2.5, committed=2.8)
    res = ReplayResult(outs, steps, 0, 5.0, [op_swap, op_back], "toy")
    s = res.summary(slo_ttft_s=1.0, slo_tpot_s=0.5, dwell_s=1.0)
    assert s["ttft_p50_s"] == pytest.approx(np.percentile([0.5, 0.2, 2.5, 0.4], 50))
    assert s["tpot_request_mean_p99_s"] == pytest.approx(np.percentile([2.5 / 3, 0.1, 0.1], 99))
    gaps = [0.1, 0.1, 2.3, 0.1, 0.1, 0.1, 0.1]
    assert s["itl_p99_s"] == pytest.approx(np.percentile(gaps, 99)) and s["itl_max_s"] == pytest.approx(2.3)
    # TTFT <= 1: requests 0, 1, 3; TPOT <= 0.5: 1, 2, 3 (a one-token request meets it); both: 1 and 3
    assert (s["ttft_attainment"], s["tpot_attainment"], s["slo_attainment"]) == (0.75, 0.75, 0.5)
    assert s["goodput_rps"] == pytest.approx(2 / 5.0) and s["output_tokens"] == 11
    assert (s["swaps"], s["restores"], s["chatter"]) == (1, 1, 1)  # restored 0.6 s after the swap committed
    assert res.summary(dwell_s=0.5)["chatter"] == 0
    assert s["int4_layers_time_weighted"] == pytest.approx((0 + 0 + 1 * 1.0 + 1 * 0.1) / 3.1)
    assert s["kv_use_p50"] == 0.5 and s["graph_step_fraction"] == 0.5
    assert chatter([op_swap, op_back, MorphOp(3, "int4", 3.0, committed=3.2)], 1.0) == 2
    with pytest.raises(MorphError, match="slo_tpot_s"):
        res.summary(slo_tpot_s=0)
