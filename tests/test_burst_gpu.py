"""GPU checks of chapter 5's slices (skipped without CUDA): a small calibration and replay on the CUDA engine
(CUDA graphs, paced side copies, device-timed copy bandwidth, the memory report recorded), the simulator's
replay of it on the micro-benchmark's model, and the wall time a 7B slice's pieces take on this GPU."""

import time

import numpy as np
import pytest
import torch

from morphbook.experiments.burst_merge import validation_row
from morphbook.experiments.burst_plan import load_plan
from morphlib.engine import LLM, EngineConfig
from morphlib.engine.microbench import BenchPlan, copy_bandwidth, run_microbench, unloaded_latency
from morphlib.engine.steptime import fit_step_time
from morphlib.engine.sweep import serve, simulate, trace_dict
from morphlib.workloads.traces import Trace

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _window(n=120, seed=4):
    rng = np.random.default_rng(seed)
    t = np.cumsum(np.where(rng.random(n) < 0.5, rng.exponential(0.005, n), rng.exponential(0.05, n)))
    return Trace("gpu-burst", "azure", t - t[0], rng.integers(100, 700, n), rng.integers(8, 64, n), "t0")


@pytest.mark.gpu
@needs_cuda
def test_cuda_slice_pieces_and_the_simulator_against_them():
    fields = dict(memory_budget=3 << 30, kv_blocks=160, dtype="bfloat16", max_num_seqs=32, max_num_batched_tokens=512,
                  max_model_len=1024)
    llm = LLM("shape:smollm2-135m", EngineConfig(**fields))
    try:
        t0 = time.perf_counter()
        bench = run_microbench(llm, BenchPlan(int4_counts=(0, 8, 16), batches=(1, 2, 4, 8, 16, 32), contexts=(64, 400),
                                              prefills=(16, 128, 512), mixed=(4,), copy_batches=(1, 8)))
        bench_s = time.perf_counter() - t0
        assert any(r["path"] == "graph" for r in bench["steps"]) and any(r["copy_bytes"] for r in bench["steps"])
        bw = copy_bandwidth(bench["ops"])
        assert bw is not None and 1e9 < bw < 2e11  # PCIe, measured from the copy stream's events
        lat = unloaded_latency(llm, [64, 512], reps=3)
        assert 0 < lat["ttft_s"][64] <= lat["ttft_s"][512] and 0 < lat["tpot_bs1_s"] < 0.05
        fit = fit_step_time(bench["steps"], buckets=llm.config.buckets())
        assert fit.report["fit"]["median_abs_pct"] < 15, fit.report
        w = _window()
        spec = {"name": "reactive", "order": list(range(8, 24)),
                "marks": {"high": 0.85, "low": 0.6, "persist_s": 0.02, "restore_after_s": 0.3, "dwell_s": 0.5, "step": 4}}
        t1 = time.perf_counter()
        eng = serve(llm, w, [True] * len(w), controller=spec, warmup=4, idle_tick_s=0.05, precapture=spec["order"])
        replay_s = time.perf_counter() - t1
        assert eng["ops"] and any(op["copy_device_ms"] for op in eng["ops"])
        mem = llm.memory_report()
        assert mem["peak_over_budget_bytes"] <= 0
    finally:
        llm.close()
    sim = simulate({"model": "shape:smollm2-135m", "engine": {**{k: v for k, v in fields.items() if k != "memory_budget"},
                                                               "copy_bandwidth": bw},
                    "step_time": fit.to_dict(), "trace": trace_dict(w), "measured": [True] * len(w), "controller": spec,
                    "warmup": 4, "idle_tick_s": 0.05})
    row = validation_row(eng, sim, slo_ttft_s=5 * lat["ttft_s"][512], slo_tpot_s=5 * lat["tpot_bs1_s"], length_s=w.span_s)
    print(f"bench {bench_s:.0f} s, replay {replay_s:.1f} s, validation {row}")
    # a smoke bound here (the chapter reports the real errors): the simulator is in the engine's range
    assert abs(row["ttft_p50_s_error_pct"]) < 50 and abs(row["tpot_mean_ms_error_pct"]) < 50


@pytest.mark.gpu
@needs_cuda
def test_llama7b_in_an_l4_budget_builds_and_serves_in_slice_time():
    """The 7B setting's engine (L4 budget, bf16) builds, holds the KV blocks the arithmetic says (within 2 %), and
    serves a warm-up: the fixed costs a slice pays before its replays."""
    plan = load_plan()
    s = plan.setting("llama7b-l4")
    t0 = time.perf_counter()
    llm = LLM(s.model, EngineConfig(**s.engine))
    build_s = time.perf_counter() - t0
    try:
        assert abs(llm.layout.main_blocks - 856) / 856 < 0.05 and llm.layout.tail_blocks >= 30
        t1 = time.perf_counter()
        llm.precapture(list(range(16)))
        capture_s = time.perf_counter() - t1
        print(f"7B build {build_s:.0f} s, 17-state graph capture {capture_s:.0f} s, {llm.layout.main_blocks} blocks")
        assert build_s + capture_s < 180
    finally:
        llm.close()
