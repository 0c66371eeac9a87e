"""Chapter 5: the pre-registration and what follows from it by hand; the resumable records (written by slices,
merged from disk, stale ones listed and left out); the merge on records whose 'engine' is a simulator with a
known step-time model (so the simulator's validation errors must be zero); the CPU engine's deterministic
virtual-clock replay, checked twice; the trace statistics and capacity arithmetic kept from the first version."""

import gzip
import json
import shutil

import numpy as np
import pytest

from morphbook.experiments import burst, burst_slices
from morphbook.experiments.burst_files import read_records, replays_root
from morphbook.experiments.burst_plan import (load_plan, make_window, orders, parse_key, pick_rate, quality_at,
                                              quality_curve, replay_key, slo)
from morphbook.publish.inputs import load_input
from morphbook.replays import run_slice, states
from morphlib.engine import Simulator
from morphlib.engine.steptime import StepTimeFit
from morphlib.engine.sweep import engine_config
from morphlib.errors import MorphError
from morphlib.workloads.traces import load_named

PLAN = load_plan()
SETS = json.load(open("results/strategies/sets.json"))
KNOTS = (1, 16, 64, 256)
TRUTH = StepTimeFit((), KNOTS, (), (), tuple(0.003 + 4e-5 * k for k in KNOTS), tuple(2e-4 + 1e-6 * k for k in KNOTS),
                    (0.0, 1e-6), (0.0, 3e-4), copy_factor=1.2, idle_s=1e-4)


# --------------------------------------------------------------------------- the pre-registration
def test_preregistration_slices_and_keys():
    names = [s.name for s in PLAN.slices()]
    assert names[:4] == ["llama7b-l4.calibrate", "llama7b-l4.azure-conv-busiest.a", "llama7b-l4.azure-code-busiest.a",
                         "llama7b-l4.azure-conv-busiest.b"]
    assert names.index("smollm2-kvcap.calibrate") > names.index("llama7b-l4.azure-code-median.e")
    reps = PLAN.registered_replays("llama7b-l4")
    # 2 traces x 2 windows x (8 policies + 2 more repeats of fp16-static and of morph-middle)
    assert len(reps) == 2 * 2 * 12 and len(set(reps)) == len(reps)
    assert {p for *_, p, _ in reps} == set(PLAN.policies) and {r for *_, r in reps} == {0, 1, 2}
    assert all(PLAN.repeats(p) == sum(1 for x in reps if x[:3] == ("azure-conv", "busiest", p)) for p in PLAN.policies)
    key = replay_key("llama7b-l4", "azure-conv", "busiest", "morph-middle", 2)
    assert parse_key(key) == {"setting": "llama7b-l4", "trace": "azure-conv", "kind": "busiest", "policy": "morph-middle",
                              "repeat": 2}
    assert PLAN.slice("cpu-micro.calibrate").window is None and len(PLAN.registered_replays("cpu-micro")) == 15
    for bad in ("gpu.everything", "llama7b-l4.azure-conv-busiest.z"):
        with pytest.raises(MorphError, match="unknown slice"):
            PLAN.slice(bad)
    with pytest.raises(MorphError):
        parse_key("not-a-key")


def test_orders_from_chapter_2():
    o = orders(SETS, 30, 15)
    assert o["front"] == list(range(15)) and len(set(o["middle"])) == 15 and len(set(o["greedy_lis"])) == 15
    # the middle order: the 15 layers nearest the centre of chapter 2's calibrated block at 16, centre-out
    block = SETS["block"]["16"]
    assert sorted(o["middle"]) == sorted(sorted(range(30), key=lambda li: abs(li - np.mean(block)))[:15])
    assert abs(o["middle"][0] - np.mean(block)) <= abs(o["middle"][-1] - np.mean(block))
    # greedy LIS keeps chapter 2's growth: its 2-layer set first
    assert set(o["greedy_lis"][:2]) == set(SETS["greedy_lis"]["2"])
    deep = orders(SETS, 32, 16)  # the 7B shape: same fraction of depth
    assert all(0 <= li < 32 for v in deep.values() for li in v) and all(len(set(v)) == 16 for v in deep.values())
    assert orders(SETS, 4, 2) == {"middle": [1, 2], "greedy_lis": [1, 2], "front": [0, 1]}
    with pytest.raises(MorphError):
        orders({"random": {}}, 30, 4)


def test_rate_rule_slo_and_quality_by_hand():
    rows = [{"rate": r, "ttft_violation_pct": v} for r, v in ((1, 2.0), (2, 12.0), (3, 35.0), (4, 55.0))]
    assert pick_rate(rows, 10, 50, 30)["rate"] == 3 and pick_rate(rows, 10, 50, 30)["in_band"]
    assert pick_rate(rows[:1] + rows[3:], 10, 50, 30) == {"rate": 4, "ttft_violation_pct": 55.0, "in_band": False}
    with pytest.raises(MorphError):
        pick_rate([], 10, 50, 30)
    lat = {"ttft_s": {"100": 0.1, "300": 0.3}, "tpot_bs1_s": 0.02}
    assert slo(lat, 200, 5.0) == pytest.approx((1.0, 0.1)) and slo(lat, 50, 2.0) == pytest.approx((0.2, 0.04))
    recs = [{"strategy": "block", "k": 2, "heldout_ppl": 11.0, "seed": None},
            {"strategy": "block", "k": 4, "heldout_ppl": 13.0, "seed": None},
            {"strategy": "random", "k": 2, "heldout_ppl": 99.0, "seed": 1}]
    curve = quality_curve(recs, "block", 10.0)
    assert curve == ([0, 2, 4], [0.0, pytest.approx(10.0), pytest.approx(30.0)])
    assert quality_at(curve, 3) == (pytest.approx(20.0), False) and quality_at(curve, 6) == (pytest.approx(50.0), True)


def test_windows_are_72_s_of_replay_time_at_any_rate():
    setting = PLAN.setting("llama7b-l4")
    conv = load_named("azure-conv")
    for rate in (1.0, 4.0):
        w = make_window(conv, setting, "busiest", rate)
        assert w.length_s == pytest.approx(72.0) and w.preroll_s == pytest.approx(10.0)
        arrivals = w.trace.arrival_s[w.measured]
        assert arrivals.min() >= w.preroll_s - 1e-9 and arrivals.max() < w.preroll_s + w.length_s
    assert make_window(conv, setting, "busiest", 4.0).requests > make_window(conv, setting, "busiest", 1.0).requests


# --------------------------------------------------------------------------- records on disk and the merge
@pytest.fixture(scope="module")
def sim_records(tmp_path_factory):
    """Calibration and one replay slice of the CPU instrument written by morphbook.replays, with the real engine
    replaced by a simulator whose step times are TRUTH."""
    root = tmp_path_factory.mktemp("results")
    shutil.copytree("results/strategies", root / "strategies")
    mp = pytest.MonkeyPatch()
    mp.setattr(burst_slices, "build_llm", lambda setting, fields, seed=0, clock=None:
               Simulator(setting.sim_model | {"model_type": "llama"}, engine_config(fields), TRUTH))
    try:
        run_slice("cpu-micro.calibrate", root, workers=1)
        paths = run_slice("cpu-micro.azure-conv-busiest.a", root)
    finally:
        mp.undo()
    return root, paths


def merged(root, **kw):
    cfg = burst.Config.for_profile("cpu", **{"replays_dir": str(replays_root(root)), "sweep": "none", "workers": 1, **kw})
    return burst.run(cfg, {"strategies": load_input("strategies", root, "burst")})


def test_slices_write_records_with_provenance(sim_records):
    root, paths = sim_records
    assert [p.name for p in paths] == ["fp16-static.r0.json.gz", "int4-static.r0.json.gz", "morph-middle.r0.json.gz"] or \
        sorted(p.name for p in paths) == ["fp16-static.r0.json.gz", "int4-static.r0.json.gz", "morph-middle.r0.json.gz"]
    data = json.loads(gzip.decompress(paths[0].read_bytes()))
    prov, rec = data["provenance"], data["record"]
    assert prov["chapter"] == "burst" and prov["fingerprint"] and prov["params"]["prereg"] == PLAN.digest
    assert rec["prereg"] == PLAN.digest and rec["kind"] == "replay" and rec["payload"]["measured"]
    assert all(x.state == "ok" for x in read_records(replays_root(root), PLAN.digest))
    assert run_slice("cpu-micro.azure-conv-busiest.a", root) == []  # resumable: nothing left to do
    st = states(root)
    assert st["llama7b-l4.calibrate"] == ("to run", "")


def test_merge_of_simulated_engine_replays_validates_exactly(sim_records):
    root, _ = sim_records
    res = merged(root)
    h = res.headline
    assert h["engine_replays"] == 3 and h["engine_replays_stale"] == 0 and h["engine_replays_registered"] == 15
    # the 'engine' was the simulator with TRUTH, the fitted model recovers TRUTH: the validation errors vanish
    for k in ("simulator_ttft_p95_error_pct", "simulator_tpot_error_pct", "simulator_slo_rate_error_pts"):
        assert h[k] == pytest.approx(0.0, abs=1e-6), k
    assert h["simulator_within_bounds"] is True and h["engine_repeat_spread_pct"] is None
    cells = h["per_policy"]["cpu-micro:azure-conv-busiest"]
    assert set(cells) == {"fp16-static", "morph-middle", "int4-static"}
    mm = cells["morph-middle"]
    lo, hi = mm["slo_violation_pct_ci95"]
    assert lo <= mm["slo_violation_pct"] <= hi and mm["replays"] == 1 and "p95_ttft_speedup_vs_fp16_ci95" in mm
    rows = {r["policy"]: r for r in res.files["policies.json"]}
    assert {"ttft_violation_pct_ci95", "tpot_violation_pct_ci95", "p99_ttft_s", "p50_tpot_ms"} <= set(rows["fp16-static"])
    assert rows["int4-static"]["swaps"] == 0 and rows["int4-static"]["int4_layers_time_weighted"] == 4  # swapped first
    assert cells["fp16-static"]["quality_cost"] == 0 and cells["int4-static"]["quality_cost"] > 0
    assert h["verdict"]["state"] == "not tested on this profile"
    todo = [t["slice"] for t in res.files["replays.json"]["todo"]]
    assert todo[0] == "cpu-micro.azure-conv-busiest.b" and "cpu-micro.azure-conv-busiest.a" not in todo
    assert {r["policy"] for r in res.files["simulated.json"]} == set(PLAN.policies)
    tl = {t["policy"]: t for t in res.files["timelines.json"]}
    assert set(tl["int4-static"]["int4"]) == {4.0} and set(tl["fp16-static"]["int4"]) == {0.0}
    assert min(tl["int4-static"]["kv_capacity"]) == 80 + 4 * 20 and max(tl["fp16-static"]["kv_capacity"]) == 80
    rate = res.files["calibration.json"]["cpu-micro"]["rates"]["azure-conv:busiest"]["rate"]
    window = make_window(burst_slices._traces(PLAN.setting("cpu-micro"))["azure-conv"], PLAN.setting("cpu-micro"),
                         "busiest", rate)
    assert sum(tl["fp16-static"]["arrivals_per_s"]) * 0.5 == len(window.trace)  # every arrival, in 0.5-s bins
    assert res.files["preregistration.json"]["digest"] == PLAN.digest


def test_a_replay_of_changed_code_is_stale_and_left_out(sim_records, tmp_path):
    root, paths = sim_records
    copy = tmp_path / "results"
    shutil.copytree(root, copy)
    target = copy / paths[0].relative_to(root)
    data = json.loads(gzip.decompress(target.read_bytes()))
    unit = next(iter(data["provenance"]["fingerprint"]))
    data["provenance"]["fingerprint"][unit] = "0" * 16  # as if that unit had been different when it ran
    target.write_bytes(gzip.compress(json.dumps(data).encode()))
    (copy / "burst-replays" / "cpu-micro" / "junk.json.gz").write_bytes(b"not gzip")
    res = merged(copy)
    assert res.headline["engine_replays"] == 2 and res.headline["engine_replays_stale"] == 1
    index = {i["file"].rsplit("/", 1)[-1]: i for i in res.files["replays.json"]["index"]}
    assert index[target.name]["state"] == "stale" and unit in index[target.name]["why"]
    assert index["junk.json.gz"]["state"] == "unreadable"
    todo = {t["slice"]: t for t in res.files["replays.json"]["todo"]}
    assert todo["cpu-micro.azure-conv-busiest.a"]["stale"] == [data["record"]["key"]]
    assert merged(copy, include_stale=True).headline["engine_replays"] == 3


def test_short_sweep_in_worker_processes(sim_records):
    """CI's short sweep: the first tiled windows, every other grid rate, the high mark, the three orders."""
    rows = merged(sim_records[0], sweep="short", workers=2).files["sweep.json"]
    assert {r["what"] for r in rows} == {"tiled", "rate", "threshold", "order"}
    for trace in ("azure-conv", "azure-code"):  # the first three windows of the hour that hold a request
        assert len({r["window"] for r in rows if r["what"] == "tiled" and r["trace"] == trace}) == 3
    grid = PLAN.setting("cpu-micro").rate_grid
    assert {r["rate"] for r in rows if r["what"] == "rate"} == set(grid[::2])
    for trace in ("azure-conv", "azure-code"):  # identical layer shapes: the order changes which layers, not when
        orders_ = [r for r in rows if r["what"] == "order" and r["trace"] == trace]
        assert len(orders_) == 3 and len({(r["slo_violation_pct"], r["ttft_p95_s"], r["swaps"]) for r in orders_}) == 1


def test_zero_replays_render_as_untested(tmp_path):
    shutil.copytree("results/strategies", tmp_path / "strategies")
    res = burst.run(burst.Config.for_profile("gpu", replays_dir=str(tmp_path / "burst-replays"), workers=1),
                    {"strategies": load_input("strategies", tmp_path, "burst")})
    h = res.headline
    assert h["engine_replays"] == 0 and h["per_policy"] == {} and h["verdict"]["state"] == "not yet tested"
    assert h["simulator_ttft_p95_error_pct"] is None and h["engine_replays_registered"] == 96
    assert res.files["replays.json"]["todo"][0]["slice"] == "llama7b-l4.calibrate"
    assert "no engine replay yet" in res.files["comparison.json"][0]["here"]
    # the kept arithmetic: Llama-2-7B on an L4 (856 blocks of 16 tokens, +34 per INT4 layer)
    assert h["l4_kv_tokens_no_swap"]["value"] == 856 * 16
    assert h["l4_kv_gain_pct_16_layers"]["value"] == pytest.approx(100 * 16 * 34 / 856)
    assert [t["requests"] for t in res.files["traces.json"]] == [8819, 19366, 383]


# --------------------------------------------------------------------------- the CI replay: bitwise, twice
def test_virtual_clock_replay_on_the_cpu_engine_is_bitwise_repeatable(sim_records):
    root, _ = sim_records
    cal = json.loads(gzip.decompress((replays_root(root) / "cpu-micro" / "calibration.json.gz").read_bytes()))["record"]
    setting = PLAN.setting("cpu-micro")
    trace = burst_slices._traces(setting)["azure-conv"]
    w = make_window(trace, setting, "busiest", burst.VIRTUAL_RATE * max(setting.rate_grid))  # as the chapter does
    out = burst_slices.virtual_replay(PLAN, setting, cal, TRUTH.to_dict(), w, orders(SETS, 4, 2))
    assert out["repeatable"] and out["matches_simulator"] and out["digests"][0] == out["digests"][1]
    assert out["steps"] > 50 and out["requests"] == len(w.trace) and out["swaps"] > 0


def test_config_profiles_and_one_line_errors():
    cpu, gpu = burst.Config.for_profile("cpu"), burst.Config.for_profile("gpu")
    assert cpu.replays_dir is None and cpu.settings == ("cpu-micro",) and cpu.sweep == "short"
    assert gpu.replays_dir == "results/burst-replays" and gpu.settings == ("llama7b-l4", "smollm2-kvcap")
    for bad in (dict(model="gpt-9"), dict(swap_counts=[4, 8]), dict(settings=["tpu-v9"]), dict(sweep="all"),
                dict(workers=0), dict(include_stale="yes"), dict(block_size=0)):
        with pytest.raises(MorphError) as exc:
            burst.Config.for_profile("cpu", **bad)
        assert "\n" not in str(exc.value)


def test_each_setting_builds_its_engine_model(monkeypatch):
    """What ``build_llm`` hands the engine per setting (the engine itself replaced by a recorder)."""
    import morphlib.engine
    import morphlib.bench.engine as bench

    seen = []

    class Recorder:
        def __init__(self, model, cfg, clock=None):
            seen.append((model, cfg))

    monkeypatch.setattr(morphlib.engine, "LLM", Recorder)
    for cached in (True, False):
        monkeypatch.setattr(bench, "smollm2_cached", lambda cached=cached: cached)
        llm = burst_slices.build_llm(PLAN.setting("smollm2-kvcap"), burst_slices.engine_fields(PLAN.setting("smollm2-kvcap")))
        assert llm.morphbook_weights == ("real" if cached else "random")
    assert [m for m, _ in seen] == ["smollm2-135m", "shape:smollm2-135m"] and seen[0][1].kv_blocks == 327
    burst_slices.build_llm(PLAN.setting("llama7b-l4"), burst_slices.engine_fields(PLAN.setting("llama7b-l4")))
    assert seen[-1][0] == "shape:llama-2-7b" and seen[-1][1].card == "L4" and seen[-1][1].kv_blocks is None
    burst_slices.build_llm(PLAN.setting("cpu-micro"), burst_slices.engine_fields(PLAN.setting("cpu-micro")))
    assert seen[-1][0].config.num_hidden_layers == 4 and seen[-1][1].kv_blocks == 80


def test_rate_rule_leaves_out_rates_at_which_a_trace_holds_no_window():
    """The first GPU calibration (H200, 2026-12-03) stopped at BurstGPT's head: at 5.6 req/s a 72-s replay
    window is 39,337 s of a 37,269-s trace. Those grid rates are left out of the sweep and recorded."""
    setting = PLAN.setting("llama7b-l4")
    traces = burst_slices._traces(setting)
    assert burst_slices.rates_without_window(setting, traces) == {"burstgpt-head": [5.6, 8.0]}
    latency = {"ttft_s": {"16": 0.05, "4096": 0.5}, "tpot_bs1_s": 0.02}
    tasks = burst_slices.rate_tasks(PLAN, setting, traces, fit={}, latency=latency, kv={"main_blocks": 856})
    burst = {t["key"][2] for t in tasks if t["key"][0] == "burstgpt-head"}
    assert burst == set(setting.rate_grid) - {5.6, 8.0}
    assert {t["key"][2] for t in tasks if t["key"][0] == "azure-conv"} == set(setting.rate_grid)
