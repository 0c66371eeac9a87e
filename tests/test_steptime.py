"""The step-time model: fitted on the micro-benchmark of a simulator whose true step times are a known model,
it recovers them (on scenarios it was not fitted on); the benchmark runs on the CPU engine too; the unloaded
latencies are the model's own arithmetic."""

import pytest

from morphlib.engine import LLM, EngineConfig, Simulator
from morphlib.engine.microbench import BenchPlan, copy_bandwidth, run_microbench, unloaded_latency
from morphlib.engine.steptime import StepTimeFit, fit_step_time
from morphlib.errors import MorphError
from test_engine_units import tiny  # noqa: F401  (the tiny random Llama fixture)

KNOTS = (1, 8, 32, 128, 256)
BUCKETS = (1, 2, 4, 8)
TRUTH = StepTimeFit(BUCKETS, KNOTS, graph=(0.0020, 0.0021, 0.0023, 0.0027), graph_int4=(1e-5, 1e-5, 2e-5, 4e-5),
                    eager=tuple(0.003 + 2e-5 * k for k in KNOTS), eager_int4=tuple(3e-5 + 1e-7 * k for k in KNOTS),
                    context_s=(2e-7, 3e-7), seq_s=(1e-5, 2e-5), copy_factor=1.15, idle_s=1e-4)
CFG = dict(kv_blocks=48, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, copy_bandwidth=2e8,
           copy_chunk_bytes=1 << 16)
PLAN = BenchPlan(int4_counts=(0, 2, 4), batches=(1, 2, 3, 4, 6, 8), contexts=(16, 120), prefills=(8, 40, 100, 256),
                 mixed=(2,), decode_steps=6, copy_batches=(1, 4), copy_layers=2, idle_steps=5)


def test_fit_recovers_a_known_model_on_unseen_scenarios():
    sim = Simulator("shape:smollm2-135m", EngineConfig(**CFG, graph_buckets=BUCKETS), TRUTH)
    bench = run_microbench(sim, PLAN)
    assert sim.int4_layers == [] and sim.core.idle
    names = bench["scenarios"]
    assert any("mixed" in n for n in names) and any("copies" in n for n in names) and "idle" in names
    rows = bench["steps"]
    assert any(r["path"] == "graph" for r in rows) and any(r["copy_bytes"] for r in rows)
    held = set(names[1::4])  # every fourth scenario kept out of the fit
    fit = fit_step_time([r for r in rows if r["scenario"] not in held], buckets=BUCKETS, knots=KNOTS,
                        holdout=[r for r in rows if r["scenario"] in held])
    assert fit.report["holdout"]["steps"] > 20 and fit.report["holdout"]["median_abs_pct"] < 1.0
    assert fit.report["holdout"]["p90_abs_pct"] < 3.0 and fit.report["fit"]["median_abs_pct"] < 1.0
    assert fit.copy_factor == pytest.approx(1.15, rel=0.02) and fit.idle_s == pytest.approx(1e-4)
    for r in rows:
        assert fit.row_seconds(r) == pytest.approx(TRUTH.row_seconds(r), rel=0.03)
    again = StepTimeFit.from_dict(fit.to_dict())
    assert again == fit and again.report == fit.report


def test_unloaded_latency_is_the_models_arithmetic():
    sim = Simulator("shape:smollm2-135m", EngineConfig(**CFG, cuda_graphs=False), TRUTH)
    lat = unloaded_latency(sim, [40, 100], reps=2, tpot_tokens=8)
    for n in (40, 100):  # one prefill step of n tokens, context n
        assert lat["ttft_s"][n] == pytest.approx(TRUTH.seconds(bucket=None, tokens=n, int4=0, context=n, seqs=1))
    # a decode step at context 64 + i; the mean over 7 gaps
    gaps = [TRUTH.seconds(bucket=None, tokens=1, int4=0, context=65 + i, seqs=1) for i in range(7)]
    assert lat["tpot_bs1_s"] == pytest.approx(sum(gaps) / 7)


def test_benchmark_runs_on_the_cpu_engine_and_fits(tiny):
    llm = LLM(tiny, EngineConfig(kv_blocks=40, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128,
                                 cuda_graphs=False, copy_bandwidth=5e8))
    plan = BenchPlan(int4_counts=(0, 4), batches=(1, 4, 8), contexts=(16, 100), prefills=(16, 128), mixed=(2,),
                     decode_steps=4, copy_batches=(2,), copy_layers=2, idle_steps=3)
    bench = run_microbench(llm, plan)
    fit = fit_step_time(bench["steps"])
    assert all(c >= 0 for c in fit.eager + fit.eager_int4 + fit.context_s + fit.seq_s)
    assert fit.report["fit"]["steps"] > 20 and fit.report["copy_steps"] > 0
    assert copy_bandwidth(bench["ops"]) > 0  # CPU copies are timed by host timestamps
    with pytest.raises(MorphError, match="too few"):
        fit_step_time(bench["steps"][:3])
    llm.swap([0], wait=True)
    with pytest.raises(MorphError, match="idle engine with no layer swapped"):
        run_microbench(llm, plan)
