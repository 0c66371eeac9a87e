"""The engine benchmark on CPU: the correctness measure's rules (decisive positions, scores filled in any
order, the comparison), the fp32 engine against the fp32 reference on real SmolLM2 weights (agreement
exact), the headline's keys and targets from a run's records, and the GPU profile's time plan."""

import math

import pytest
import torch

from morphlib.bench import agreement as A
from morphlib.bench import engine as E
from morphlib.errors import MorphError


def _reference(logits: torch.Tensor) -> A.Reference:
    ref = A.Reference(torch.zeros(logits.shape[:2], dtype=torch.int64), logits.shape[-1], "cpu")
    ref.fill(0, logits)
    return ref


def test_bf16_ulp_and_the_decisive_rule():
    assert A.bf16_ulp(torch.tensor([1.0, 20.0, -20.0, 40.0, 0.3])).tolist() == [2 ** -7, 2 ** -3, 2 ** -3, 2 ** -2, 2 ** -9]
    # top logit 20: 4 ulps = 0.5, so a top-2 gap of 0.6 is decisive and one of 0.4 is not
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1], logits[0, 0, 2] = 20.0, 19.4
    logits[0, 1, 3], logits[0, 1, 0] = 20.0, 19.6
    logits[0, 2, 4], logits[0, 2, 2] = 20.0, 19.5  # exactly the tolerance: not decisive ("above" it)
    ref = _reference(logits)
    assert ref.decisive.tolist() == [[True, False, False]] and ref.top1.tolist() == [[1, 3, 4]]
    assert torch.allclose(ref.tolerance, torch.full((1, 3), 0.5))
    with pytest.raises(MorphError, match="float32"):
        ref.fill(0, logits.to(torch.bfloat16))
    with pytest.raises(MorphError, match="do not fit"):
        ref.fill(1, logits)
    empty = A.Reference(torch.zeros(2, 3, dtype=torch.int64), 5, "cpu")
    empty.fill(0, logits)
    with pytest.raises(MorphError, match="never filled: \\[1\\]"):
        A.Scores(empty, "x")


def test_scores_filled_in_any_order_and_compared():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen) * 4
    ref = _reference(logits)
    engine, hf = A.Scores(ref, "engine"), A.Scores(ref, "hf")
    order = torch.randperm(12, generator=gen).tolist()
    for i in order:  # the engine's steps mix prompts and positions
        r, c = divmod(i, 4)
        engine.add([r], [c], logits[r, c][None])
    for c in range(4):
        wrong = logits[:, c].clone()
        if c == 2:  # HF swaps its top two at one position of prompt 1
            top2 = wrong[1].topk(2).indices
            wrong[1, top2[0]], wrong[1, top2[1]] = wrong[1, top2[1]], wrong[1, top2[0]]
        hf.add(torch.arange(3), torch.full((3,), c), wrong)
    e = engine.summary()
    assert e["agreement"] == 1.0 and e["decisive_agreement"] == 1.0 and abs(e["kl_mean"]) < 1e-6
    h = hf.summary()
    assert h["disagreements"] == 1 and h["agreement"] == pytest.approx(11 / 12) and h["kl_mean"] > 0
    out = A.compare(engine, hf)
    assert out["top1_gap_vs_hf_incremental_pts"] == pytest.approx(-100 / 12, abs=1e-4)  # the engine is the better one
    assert out["kl_ratio_vs_hf"] == pytest.approx(A.KL_FLOOR / h["kl_mean"])  # the engine's KL is rounding: floored
    assert out["positions"] == 12 and out["decisive_excluded_share"] == pytest.approx(1 - ref.decisive.float().mean().item())
    partial = A.Scores(ref, "partial")
    partial.add([0], [0], logits[0, 0][None])
    with pytest.raises(MorphError, match="partial: 11 of 12 positions were never scored"):
        partial.summary()
    with pytest.raises(MorphError, match="do not match"):
        partial.add([0, 1], [0], logits[0, :2])
    with pytest.raises(MorphError, match="different references"):
        A.compare(engine, A.Scores(_reference(logits), "other"))


def test_fp32_engine_agrees_exactly_with_the_fp32_reference(model32):
    """The CPU profile's claim: an fp32 engine fed the forced continuation (eager steps, paged KV, chunked
    prefill) picks the fp32 reference's top-1 on every position, and its KL is fp32 rounding."""
    from morphlib.engine import LLM, EngineConfig

    model, tok = model32
    llm = LLM(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=48, max_model_len=256))
    prompts = E.text_prompts(tok, 3, 24)
    out = E.correctness(llm, model, model, prompts, 40, log=lambda *a: None)
    assert out["positions"] == 120 and out["dtype"] == "float32" and set(out["engine_paths"]) == {"eager"}
    assert out["top1_decisive_agreement"] == 1.0 and out["top1_agreement_engine"] == 1.0
    assert out["top1_agreement_hf_incremental"] == 1.0 and out["top1_gap_vs_hf_incremental_pts"] == 0.0
    assert abs(out["kl_engine"]) < A.KL_FLOOR and out["kl_ratio_vs_hf"] == 1.0
    assert 0 < out["engine"]["decisive_positions"] <= 120


def _row(model, state, batch, step_ms, **kw):
    return {"model": model, "state": state, "batch": batch, "step_ms": step_ms, "gpu_ms": step_ms, "roofline_ms": 1.0,
            "paths": ["graph"], "ctx": 140, **kw}


def test_headline_from_a_runs_records():
    rows = []
    for b, (f, i) in {1: (5.0, 2.5), 8: (6.0, 4.0), 64: (12.0, 13.0)}.items():
        rows += [_row("llama-2-7b", "fp16", b, f), _row("llama-2-7b", "int4", b, i)]
    rows += [_row("smollm2-135m", "fp16", 1, 1.3, hf_eager_ms=26.0), _row("smollm2-135m", "int4", 1, 1.4)]
    mem = {"budget": 100, "kv_main_blocks": 850, "peak_over_budget_bytes": -5, "allocated_peak": 90, "reserved_peak": 95}
    out = {"rows": rows, "big": "llama-2-7b", "big_card": "L4", "big_arithmetic_blocks": 856,
           "swap": {"swap_copy_bw_vs_isolated": 0.97, "decode_slowdown_during_swap": 0.08},
           "big_memory": {"after_construction": mem, "after_serving": {**mem, "peak_over_budget_bytes": 7}},
           "hf_compiled_ms_bs1": 2.6}
    h = E.headline(out)
    assert h["int4_vs_fp16_step_speedup_7b_bs1"] == {"value": 2.0, "target": ">= 1.8", "met": True}
    assert h["int4_vs_fp16_step_speedup_7b_bs8"]["value"] == 1.5 and h["int4_vs_fp16_step_speedup_7b_bs8"]["met"]
    worst = h["int4_vs_fp16_worst_step_speedup"]
    assert worst["value"] == pytest.approx(12 / 13) and not worst["met"] and worst["at"] == "llama-2-7b batch 64"
    assert worst["per_batch"]["smollm2-135m"] == {"1": round(1.3 / 1.4, 3)}
    assert h["kv_blocks_l4_vs_arithmetic"]["target"] == "in [0.98, 1.02]" and h["kv_blocks_l4_vs_arithmetic"]["met"]
    assert h["peak_over_budget_bytes"]["value"] == 7 and not h["peak_over_budget_bytes"]["met"]  # the worse report
    used = h["budget_used_at_peak"]
    assert used["value"] == pytest.approx(1.07) and used["target"] == "in [0.95, 1]" and not used["met"]
    assert not h["decode_slowdown_during_swap"]["met"] and h["smollm2_speedup_vs_hf_eager_bs1"]["value"] == 20.0
    assert h["smollm2_speedup_vs_hf_compiled_bs1"]["reference"] == "measured in this run"
    assert h["decode_step_vs_roofline_7b_bs1"]["value"] == 5.0
    assert all(set(e) >= {"value", "target", "met"} for e in h.values()) and set(h) <= set(E.TARGETS)
    assert "top1_decisive_agreement" not in h  # no correctness record: no correctness keys


def test_every_headline_key_has_a_readers_label_on_the_benchmarks_page():
    from morphbook.publish import benchmarks
    from morphlib.bench import kernels

    assert set(E.TARGETS) <= set(benchmarks.ENGINE_LABELS)
    assert {k.removeprefix("worst_time_ratio_") for k in kernels.TARGETS} | set(kernels.YARDSTICKS) <= set(benchmarks.BANDS)
    head = {"positions": E._entry("positions", 16384), "peak_over_budget_bytes": E._entry("peak_over_budget_bytes", -3 << 20),
            "budget_used_at_peak": E._entry("budget_used_at_peak", 0.994)}
    rows = {r["what"]: r for r in benchmarks.engine_rows(head, [], {})}
    text = [(r["value"], r["target"], r["met"]) for r in rows.values()]
    assert text == [("16,384", "≥\u00a016,384", "met"), ("−3\u00a0MiB", "≤\u00a00\u00a0MiB", "met"),
                    ("0.994", "in [0.95, 1]", "met")]
    krows = benchmarks.kernel_rows({"worst_ratio_vs_gemlite": {"value": 1.2, "target": 1.1, "met": False, "at": "a"}},
                                   [{"model": "llama-2-7b", "m": 4, "n": 1, "k": 1, "int4_ms": 2.0, "gemlite_ms": 1.0}])
    assert krows[0]["band"] == "1–2,048 rows: INT4 over GemLite's time" and krows[0]["spread"].startswith("2.00–2.00")


def test_the_gpu_profiles_plan_fits_its_time_and_is_printed_first():
    from morphbook.experiments.engine import Config

    cfg = Config.for_profile("gpu")
    plan = E.plan_seconds(batch_sizes=cfg.batch_sizes, hf=True, hf_compiled=cfg.hf_compiled, prompts=cfg.prompts,
                          new_tokens=cfg.new_tokens)
    assert plan["total"] <= 240 and "hf_compiled" in plan and cfg.prompts * cfg.new_tokens >= 16384
    assert math.isclose(plan["total"], sum(v for k, v in plan.items() if k != "total"), abs_tol=0.5)
    cpu = Config.for_profile("cpu")
    small = E.plan_seconds(batch_sizes=cpu.batch_sizes, hf=True, hf_compiled=False, prompts=cpu.prompts,
                           new_tokens=cpu.new_tokens, device_type="cpu")
    assert set(small) == {"correctness", "total"}


def test_bad_bench_input_is_a_one_line_error_before_any_work():
    lines = []
    for kw, match in ((dict(batch_sizes=(2, 4)), "batch sizes must include 1"), (dict(prompts=0), "prompts must be"),
                      (dict(new_tokens=True), "new_tokens must be"),
                      (dict(big_card="H200"), "capacity arithmetic has no card 'H200'"),
                      (dict(big="gpt-5"), "gpt-5")):
        with pytest.raises(MorphError, match=match):
            E.run_bench(device="cpu", log=lines.append, **kw)
    assert lines == []
