"""Chapter 4 and the decode-run machinery it shares with chapter 3 (``swapruns``): the analysis rules by
hand, side-stream vs synchronous runs on a tiny CPU engine (same precision schedule, same tokens), the
config, one tiny CPU run of the experiment, and the GPU paths at tiny sizes (``gpu``)."""

import numpy as np
import pytest
import torch

from morphbook.experiments import overlap as ov
from morphbook.experiments import swapruns as sr
from morphlib.engine import LLM, EngineConfig
from morphlib.errors import MorphError


def _step(i, ms, state=(), copy=False, committed=(), sync=0, end=None):
    return {"index": i, "ms": ms, "state": list(state), "int4_layers": len(state), "copy_in_flight": copy,
            "committed": list(committed), "sync_copy_bytes": sync, "end_ms": end if end is not None else 10.0 * i,
            "path": "graph"}


# ----------------------------------------------------------------------------- analysis by hand
def test_baselines_nearest_quiet_same_state_then_interpolated_by_int4_layers():
    steps = [_step(0, 10.0), _step(1, 11.0), _step(2, 12.0), _step(3, 13.0), _step(4, 99.0),  # quiet fp16 (99: far)
             _step(5, 50.0, (1, 2), copy=True, committed=(1, 2)),  # an intermediate state, committing
             _step(6, 30.0, (1, 2, 3, 4), committed=(3, 4)),
             _step(7, 20.0, (1, 2, 3, 4)), _step(8, 22.0, (1, 2, 3, 4))]
    base = sr.baselines(steps)
    assert base[0] == np.median([10, 11, 12, 13])  # the 4 nearest quiet steps of its state
    assert base[4] == np.median([99, 13, 12, 11])
    assert base[7] == base[8] == 21.0 and base[6] == 21.0  # the 4-layer state's two quiet steps
    fp16_near5 = np.median([99, 13, 12, 11])  # quiet fp16 steps nearest to step 5
    assert base[5] == pytest.approx(fp16_near5 + (2 - 0) / (4 - 0) * (21.0 - fp16_near5))
    assert sr.baselines([_step(0, 5.0, copy=True)]) == [None]  # no quiet step at all
    stalls = sr.commit_stalls(steps, base)
    assert [s["index"] for s in stalls] == [5, 6] and stalls[1]["stall_ms"] == pytest.approx(9.0)
    assert sr.event_stall_ms({"commit_steps": [5, 6]}, stalls) == pytest.approx(stalls[0]["stall_ms"] + 9.0)
    assert sr.event_stall_ms({"commit_steps": [1]}, stalls) is None


def test_slowdown_counts_overlapped_steps_only_and_resamples_events():
    steps = [_step(i, 10.0) for i in range(4)] + [_step(4, 12.0, copy=True), _step(5, 13.0, copy=True),
                                                  _step(6, 10.0, (3,), committed=(3,)), _step(7, 10.0, (3,)),
                                                  _step(8, 11.0, (3,), copy=True), _step(9, 10.0, committed=(3,)),
                                                  _step(10, 10.0), _step(11, 10.0)]
    run = {"steps": steps, "ops": [{"issue_step": 4, "commit_step": 6, "event": 0},
                                   {"issue_step": 8, "commit_step": 9, "event": 1}]}
    d = sr.slowdown([run], 12)
    assert d["steps"] == 3 and d["value"] == pytest.approx((12 + 13 + 11) / (10 + 10 + 10) - 1)
    lo, hi = d["ci95"]
    assert lo <= d["value"] <= hi and lo >= 0.1 - 1e-9  # events: +25 % and +10 %: the interval spans them
    only_first = sr.slowdown([run], 12, lambda s, ev, r: ev == 0)
    assert only_first["value"] == pytest.approx(25 / 20 - 1) and only_first["ci95"] is None  # one event: no interval
    assert sr.slowdown([run], 5)["steps"] == 1  # timed steps 0..4 only


def test_inter_token_gaps_mean_interval_and_compact_records():
    steps = [_step(i, 1.0, end=e) for i, e in zip(range(-1, 4), [0.0, 1.0, 3.0, 4.0, 8.0])]
    assert sr.inter_token_ms(steps, 4) == [1.0, 2.0, 1.0, 4.0]
    ci = sr.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"][0] == pytest.approx(2 - 4.302653 * 1 / np.sqrt(3), rel=1e-5)
    assert sr.mean_ci([5.0])["ci95"] is None and sr.mean_ci([])["mean"] is None
    c = sr.compact({"steps": steps}, 4)
    assert c["step_ms"] == [1.0] * 4 and c["itl_ms"] == [1.0, 2.0, 1.0, 4.0] and c["kind"] == "qqqq"


def test_precision_factors_and_their_interpolation():
    none = [{"steps": [_step(i, 10.0) for i in range(6)]}]
    side = [{"steps": [_step(0, 10.0), _step(1, 20.0, (1,), copy=True), _step(2, 9.0, (1,)), _step(3, 9.0, (1,)),
                       _step(4, 8.0, (1, 2, 3, 4)), _step(5, 12.0, (1, 2, 3, 4), committed=(4,))]}]
    f = ov.precision_factors(side, none, 6)
    assert f == {0: 1.0, 1: 0.9, 4: 0.8}  # quiet steps only: the overlapped and the commit step do not count
    assert ov.factor_at(f, 2) == pytest.approx(0.9 + (2 - 1) / 3 * (0.8 - 0.9))
    assert ov.factor_at({16: 1.1}, 8) == pytest.approx(1.05) and ov.factor_at({}, 3) == 1.0
    assert ov.factor_at({1: 0.9}, 5) == 0.9  # beyond the last measured count: that count's factor


def test_schedule_replay_and_round_order():
    ev = ov.schedule([5, 6, 7], 48, 8)
    assert [(e.step, e.to, e.layers, e.label) for e in ev[:4]] == [
        (0, "int4", (5, 6, 7), "swap 3"), (8, "fp16", (7, 6, 5), "restore 3"), (16, "int4", (5,), "swap 1"),
        (24, "fp16", (5,), "restore 1")]
    assert len(ev) == 6 and [e.of for e in ev] == list(range(6))
    side = {"events": [{"event": 0, "label": "swap 3"}, {"event": 1, "label": "restore 3"}],
            "ops": [{"event": 0, "layer": 6, "to": "int4", "commit_step": 2, "committed_ms": 2.1},
                    {"event": 0, "layer": 5, "to": "int4", "commit_step": 2, "committed_ms": 2.0},
                    {"event": 0, "layer": 7, "to": "int4", "commit_step": 3, "committed_ms": 3.0},
                    {"event": 1, "layer": 7, "to": "fp16", "commit_step": 11, "committed_ms": 11.0}]}
    rep = ov.replay_events(side)
    assert [(e.step, e.to, e.layers, e.of) for e in rep] == [(2, "int4", (5, 6), 0), (3, "int4", (7,), 0),
                                                          (11, "fp16", (7,), 1)]
    for r in range(6):
        order = ov.round_order(r)
        assert sorted(order) == sorted(ov.MODES) and order.index("side") < order.index("sync")
    assert {ov.round_order(r).index("none") for r in range(3)} == {0, 1, 2}


# ----------------------------------------------------------------------------- runs on a tiny CPU engine
@pytest.fixture(scope="module")
def tiny_llm():
    model, depth, _ = sr.engine_source("tiny", 0)
    llm = LLM(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256, kv_blocks=64,
                                  swappable=(1, 2), restorable=(1, 2), copy_bandwidth=2e8, copy_chunk_bytes=32 << 10,
                                  cuda_graphs=False))
    assert depth == 4
    return llm


def test_side_run_and_its_synchronous_replay_share_the_schedule_and_the_tokens(tiny_llm):
    llm = tiny_llm
    prompts = sr.random_prompts(llm.spec.vocab, 3, 12, seed=1)
    events = ov.schedule([1, 2], 24, 6)
    llm.configure_copies(swap_mode="side")
    side = sr.decode_run(llm, prompts, 24, events, warmup=2)
    llm.configure_copies(swap_mode="sync")
    sync = sr.decode_run(llm, prompts, 24, ov.replay_events(side), warmup=2)
    none = sr.decode_run(llm, prompts, 24, (), warmup=2)
    llm.configure_copies(swap_mode="side")
    assert side["valid"] and sync["valid"] and none["valid"] and side["problems"] == []
    state = lambda run: [tuple(s["state"]) for s in run["steps"] if 0 <= s["index"] < 24]  # noqa: E731
    assert state(side) == state(sync) and any(state(side)) and not any(state(none))
    assert ov.tokens_match(side, sync) == 1.0 and len(side["tokens"]) == 3 and len(side["tokens"][0]) == 1 + 2 + 24
    assert [s["index"] for s in side["steps"][:3]] == [-2, -1, 0]
    assert {e["label"] for e in side["events"]} == {"swap 2", "restore 2", "swap 1", "restore 1"}
    for e in side["events"]:
        assert e["latency_ms"] > 0 and e["commit_steps"] and e["ops"] == len(e["layers"])
    assert all(o["commit_step"] >= o["issue_step"] >= o["request_step"] and o["copy_ms"] > 0 and o["chunks"]
               for o in side["ops"])
    assert all(o["issue_step"] == o["commit_step"] for o in sync["ops"])  # synchronous: issued and committed at once
    assert sum(s["sync_copy_bytes"] for s in sync["steps"]) == sum(o["bytes"] for o in sync["ops"])
    assert none["ops"] == [] and none["events"] == []
    ch = [c for o in side["ops"] for c in o["chunks"]]  # chunk times on the steps' time base (ms since the window)
    assert all(0 <= a <= b for a, b in ch) and max(b for _, b in ch) <= side["steps"][-1]["end_ms"]
    st = ov.event_stalls(sync, 24)
    assert set(st) <= {e["of"] for e in sync["events"]} and st


def test_idle_morphs_and_exactness(tiny_llm):
    ops, groups = sr.idle_morphs(tiny_llm, [1, 2], 2)
    assert len(ops) == 2 * 2 * 2 and len(groups) == 4 and {g["to"] for g in groups} == {"int4", "fp16"}
    assert all(o["copy_ms"] > 0 and o["span_ms"] >= o["copy_ms"] * 0.5 and o["commit_ms"] is not None for o in ops)
    assert tiny_llm.int4_layers == [] and sr.arena_matches_host(tiny_llm, [1, 2], "fp16")
    tiny_llm.swap([1], wait=True)
    assert sr.arena_matches_host(tiny_llm, [1], "int4") and not sr.arena_matches_host(tiny_llm, [1], "fp16")
    tiny_llm.restore(wait=True)


# ----------------------------------------------------------------------------- the experiment
def test_profiles_plan_and_one_line_config_errors():
    gpu, cpu = ov.Config.for_profile("gpu"), ov.Config.for_profile("cpu")
    assert gpu.models == ("shape:llama-2-7b", "smollm2-135m") and gpu.rounds >= 5 and gpu.steps == 256
    assert gpu.batches_of(0) == (1, 8, 32) and gpu.batches_of(1) == (1, 8, 32, 64) and gpu.interval == 32
    total = sum(r["seconds"] for r in ov.plan(gpu))
    assert total <= gpu.time_limit_s <= 180  # the published run fits the device-time budget, by its own estimate
    assert cpu.models == ("tiny",) and cpu.max_batch == (4,)
    for bad in (dict(interval=32), dict(rounds=1), dict(max_batch=[4, 8]), dict(block_layers=5), dict(copy_pace=0),
                dict(batches=[0]), dict(device="mps"), dict(bogus=1), dict(max_batch=[0])):
        with pytest.raises(MorphError) as exc:
            ov.Config.for_profile("cpu", **bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(MorphError, match="over time_limit_s"):
        ov.run(ov.Config.for_profile("cpu", time_limit_s=1.0))
    if not torch.cuda.is_available():
        with pytest.raises(MorphError, match="profile='cpu'"):
            ov.run(gpu)


HEADLINE = ("engine", "tpot_ratio_async_swap", "tpot_ratio_async_swap_ci95", "p99_itl_ratio_async_swap",
            "boundary_stall_ms", "host_ms_per_layer", "sync_stall_vs_copy_ratio", "swap_latency_ms")


def _check_result(res, judged: bool):
    h = res.headline
    assert set(HEADLINE) <= set(h) and h["valid"] is True and h["invalid_because"] == []
    assert h["tokens_match"]["value"] == 1.0
    for k, v in h.items():
        if isinstance(v, dict) and "met" in v:
            assert (v["met"] is not None) == judged, k
    runs = res.files["runs.json"]
    assert {r["mode"] for r in runs} == set(ov.MODES) and all(r["valid"] for r in runs)
    model = res.files["models.json"][0]
    for row in model["batches"].values():
        assert row["tpot_ratio_side"]["n"] == res.params["rounds"] and row["tokens_match"] == [1.0] * res.params["rounds"]
        assert set(ov.by_label(row)) == {f"swap {res.params['block_layers']}", f"restore {res.params['block_layers']}",
                                         "swap 1", "restore 1"}
    tl = res.files["timeline.json"]
    assert tl["side"]["ops"] and all(o["chunks"] for o in tl["side"]["ops"])
    return h


def test_tiny_cpu_run():
    threads = torch.get_num_threads()
    res = ov.run(ov.Config.for_profile("cpu", batches=[2], max_batch=[2], steps=32, interval=8))
    assert torch.get_num_threads() == threads and res.params["device"] == "cpu" and res.params["threads"] == 1
    h = _check_result(res, judged=False)
    assert "CPU" in h["engine"] and h["weights"].startswith("random")


@pytest.mark.gpu
def test_gpu_paths_at_tiny_sizes():
    """The GPU profile's code at tiny sizes: CUDA graphs precaptured (no lazy capture, every timed step a
    graph), side-stream copies on the copy stream with events, the synchronous replay, equal tokens."""
    cfg = ov.Config.for_profile("gpu", models=["shape:smollm2-135m"], batches=[1, 4], max_batch=[4], steps=32,
                                interval=8, block_layers=4, rounds=2, prompt_len=16)
    res = ov.run(cfg)
    h = _check_result(res, judged=True)
    model = res.files["models.json"][0]
    assert all(row["graph_share"] == 1.0 for row in model["batches"].values())
    assert model["isolated"]["int4"]["gbs"] > 1 and h["host_ms_per_layer"]["value"] > 0
    sync_st = [e["sync_stall_ms"] for row in model["batches"].values() for e in row["events"].values()]
    assert sum(x for x in sync_st if x is not None) > 0  # the synchronous copies cost their steps something


def test_pages_never_draw_committed_results_of_the_old_format(tmp_path, monkeypatch):
    """Chapters 3-4 changed their results' format: committed results without the new headline are not drawn
    (this run's are, labelled as this run's); committed results of the new format are, as the book's."""
    from morphbook.experiments.base import Result, as_params
    from morphbook.publish import store
    from morphbook.publish.notebook import run_chapter
    from morphlib import fingerprint

    cfg = ov.Config.for_profile("cpu")
    fresh = tmp_path / "fresh"
    monkeypatch.chdir(tmp_path)  # the committed results are ./results
    for headline, drawn in (({"tpot_ms_no_swap": 1.0}, False), ({"engine": "old engine run"}, True)):
        store.save_result("overlap", Result(as_params(cfg), headline, {}, 1.0), tmp_path / "results",
                          recording=fingerprint.Recording())
        shown = run_chapter("overlap", lambda c: Result(as_params(c), {"engine": "this run"}, {}, 1.0), cfg, fresh,
                            needs="engine")
        assert shown.committed is drawn and shown.headline["engine"] == ("old engine run" if drawn else "this run")
