"""Copy settings changed on a built engine (``configure_copies``: chunk size, pacing or unpaced, side / sync),
and the timing every op carries on CPU too (host timestamps in place of CUDA events; host time of sending)."""

import pytest

from morphlib.engine import LLM, EngineConfig, SamplingParams, Simulator, TableStepTime
from morphlib.engine.copies import HostEvent
from morphlib.errors import MorphError
from test_engine_units import tiny  # noqa: F401  (the tiny random Llama fixture)

TABLE = TableStepTime({1: 0.004, 8: 0.008})
BASE = dict(kv_blocks=12, max_model_len=128, max_num_batched_tokens=64, max_num_seqs=6, cuda_graphs=False,
            copy_bandwidth=5e6)


def _decode(engine, n=3):
    return [engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(n)]


def _swap_during_decode(engine, layer):
    (op,) = engine.swap([layer])
    sent = []
    while op.phase != "done":
        sent.append(engine.step().copy_bytes)
    return op, sent


def test_chunk_size_pace_and_mode_change_on_a_built_engine(tiny):
    sim = Simulator(tiny, EngineConfig(**BASE, copy_chunk_bytes=1 << 13, copy_pace=0.5), TABLE)
    _decode(sim)
    for _ in range(3):
        sim.step()
    paced, sent_paced = _swap_during_decode(sim, 1)
    head = sim.layout.head_bytes
    budget = 0.5 * 5e6 * TABLE.decode_s[8]  # pace x bandwidth x the last step's time (3 sequences: 8's row)
    assert max(sent_paced) <= budget + (1 << 13) and sum(sent_paced) == head and len(sent_paced) > 2

    sim.configure_copies(copy_chunk_bytes=1 << 12, copy_pace=None)  # unpaced: every chunk after one launch
    assert sim.config.copy_pace is None and sim.copies.chunk_bytes == 1 << 12
    unpaced, sent = _swap_during_decode(sim, 2)
    assert sent[0] == head and len(unpaced.chunks) == 0
    assert unpaced.commit_step - unpaced.issue_step < paced.commit_step - paced.issue_step

    sim.configure_copies(swap_mode="sync")
    (op,) = sim.swap([3])
    rec = sim.step()
    assert op.issue_step == op.commit_step == rec.index and rec.sync_copy_bytes == head


def test_configure_copies_is_checked_and_refused_while_busy(tiny):
    sim = Simulator(tiny, EngineConfig(**BASE), TABLE)
    for bad in (dict(copy_pace=2.0), dict(copy_chunk_bytes=0), dict(swap_mode="async"), dict(block_size=32)):
        with pytest.raises(MorphError) as exc:
            sim.configure_copies(**bad)
        assert "\n" not in str(exc.value)
    assert sim.config.copy_pace == 0.8 and sim.config.swap_mode == "side"  # a refused change changes nothing
    _decode(sim, 1)
    sim.swap([1])
    with pytest.raises(MorphError, match="pending"):
        sim.configure_copies(copy_pace=0.5)
    sim.wait_morph()
    sim.configure_copies(copy_pace=0.5)
    assert sim.core.pace == 0.5


def test_cpu_ops_carry_copy_and_commit_times(tiny):
    """On CPU every chunk and the commit are timed by host timestamps: copy_ms, span_ms, commit_ms exist, and
    an op's host time covers sending its chunks (a CPU copy is host work)."""
    llm = LLM(tiny, EngineConfig(**BASE, copy_chunk_bytes=1 << 13))
    ops = llm.swap([1, 2], wait=True) + llm.restore(wait=True)
    for op in ops:
        chunks = -(-op.copy_bytes // (1 << 13)) if op.to == "int4" else len(op.events)
        assert len(op.events) == chunks and all(isinstance(e, HostEvent) for pair in op.events for e in pair)
        assert 0 < op.copy_ms() <= op.span_ms() and op.commit_ms() >= 0
        assert op.host_ms >= op.copy_ms()
        rec = op.record()
        assert rec["copy_device_ms"] == op.copy_ms() and rec["commit_device_ms"] == op.commit_ms()
    a, b = HostEvent(), HostEvent()
    assert a.query() and a.elapsed_time(b) >= 0
