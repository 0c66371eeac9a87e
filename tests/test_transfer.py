"""Chapter 3 on the engine: the plan and its repeats rule, the raw copy plans (pieces cover the bytes, copies are
exact), the verdict and setting rules by hand, one tiny CPU run, and the GPU paths at tiny sizes (``gpu``)."""

import pytest
import torch

from morphbook.experiments import swapruns as sr
from morphbook.experiments import transfer as tr
from morphlib.engine import LLM, EngineConfig
from morphlib.errors import MorphError


def test_paces_and_config_errors_are_one_line():
    assert tr.pace_tuple("[0.5, null]") == (0.5, None) and tr.pace_tuple(0.8) == (0.8,)
    assert [tr.pace_label(p) for p in (0.5, None)] == ["0.5", "unpaced"]
    for bad in ("[2]", "[0.5, 0.5]", "[]", "x", [True]):
        with pytest.raises(MorphError):
            tr.pace_tuple(bad)
    for bad in (dict(shapes=["gpt-9"]), dict(layer_counts=[0]), dict(layer_counts=[5]), dict(engine_chunk_bytes=1),
                dict(min_repeats=50), dict(condition_s=0), dict(memory_gib=-1), dict(paces=[3]), dict(device="mps"),
                dict(bogus=1)):
        with pytest.raises(MorphError) as exc:
            tr.Config.for_profile("cpu", **bad)
        assert "\n" not in str(exc.value)


def test_gpu_plan_fits_and_repeats_follow_the_rule():
    gpu = tr.Config.for_profile("gpu")
    assert gpu.shapes == ("llama-2-7b", "llama-3-8b") and gpu.layer_counts == (1, 4, 8, 16)
    assert gpu.paces == (0.5, 0.8, None) and gpu.decode_batches == (1, 8, 32) and gpu.chunk_bytes == (4 << 20, 16 << 20, 64 << 20)
    rows = tr.plan(gpu)
    assert sum(r["seconds"] for r in rows) <= gpu.time_limit_s <= 150  # by the plan's own estimate
    assert tr.repeats_for(gpu, 1e-3) == 200 and tr.repeats_for(gpu, 10.0) == gpu.min_repeats
    assert tr.repeats_for(gpu, gpu.condition_s / 77) == 77
    one_layer = [r for r in rows if r["what"].startswith("engine ops, 1 layer") or "1 layer(s)" in r["what"]]
    assert all(r["repeats"] == 200 for r in one_layer if "pageable" not in r["what"])  # the 200 where short
    assert all(r["repeats"] >= gpu.min_repeats for r in rows if r["what"].startswith(("engine ops", "raw", "ceiling")))
    with pytest.raises(MorphError, match="over time_limit_s"):
        tr.run(tr.Config.for_profile("cpu", time_limit_s=1.0))


@pytest.fixture(scope="module")
def tiny_llm():
    model, _, _ = sr.engine_source("tiny", 0)
    return LLM(model, EngineConfig(max_num_seqs=2, max_model_len=128, kv_blocks=64, swappable=(1, 2), restorable=(1, 2),
                                   cuda_graphs=False))


def test_tensor_pieces_cover_each_payload_and_raw_plans_copy_exactly(tiny_llm):
    lay = tiny_llm.layout
    # INT4: packed + scale_zero of 4 matrices (qkv, o, gate_up, down); 16-bit: the 7 projections' rows
    for payload, size, count in (("int4", lay.head_bytes, 8), ("fp16", lay.region_bytes, 7)):
        pieces = sorted(tr.tensor_pieces(lay, payload))
        assert len(pieces) == count
        assert all(a + n <= b for (a, n), (b, _) in zip(pieces, pieces[1:]))  # disjoint, in order
        assert pieces[-1][0] + pieces[-1][1] <= size and sum(n for _, n in pieces) >= 0.95 * size
    cfg = tr.Config.for_profile("cpu", ceiling_bytes=[1 << 12, 1 << 30])
    plans = tr.raw_plans(tiny_llm, cfg, True)
    assert ("int4", "tensor", "pinned", 1) in plans and ("fp16", "layer", "pageable", 1) in plans
    assert [k for k in plans if k[1] == "ceiling"] == [("fp16", "ceiling", "pinned", 1 << 12)]  # 1 GiB: larger than a layer
    for plan in plans.values():
        for dst, _ in plan:
            dst.zero_()
    assert not all(torch.equal(d, s) for p in plans.values() for d, s in p)
    assert tr.plans_exact(plans)
    samples = tr.time_plans(tr.CopyTimer(tiny_llm.device), plans, {k: 3 for k in plans} | {next(iter(plans)): 5}, 1, 0)
    assert [len(v) for v in samples.values()] == [5] + [3] * (len(plans) - 1) and all(x > 0 for v in samples.values() for x in v)


def test_verdicts_and_the_setting_rule_by_hand():
    one = {"median_ms": 1.0, "jitter": 0.01, "copies": 1}
    many = {"median_ms": 1.2, "jitter": 0.10, "copies": 14}
    assert tr.verdict_faster(many, one, "x").startswith("holds") and tr.verdict_jitter(many, one, "x").startswith("holds")
    same = {"median_ms": 1.02, "jitter": 0.015, "copies": 14}
    assert tr.verdict_faster(same, one, "x").startswith("no practical") and tr.verdict_jitter(same, one, "x").startswith("no practical")
    assert tr.verdict_faster({"median_ms": 0.5}, one, "x").startswith("reversed")
    assert tr.verdict_jitter({"jitter": 0.0}, {"jitter": 0.05}, "x").startswith("reversed")

    def row(b, chunk, pace, slow, bw, valid=True):
        return {"batch": b, "chunk_bytes": chunk, "pace": pace, "slowdown": slow, "bw_vs_isolated": bw, "valid": valid}

    rows = [row(b, c, p, 0.01, 0.95) for b in (1, 8) for c in (4, 16) for p in ("0.5", "0.8")]
    rows += [row(1, 16, "unpaced", 0.01, 0.95), row(8, 16, "unpaced", 0.50, 0.95)]  # unpaced: fails at batch 8
    assert tr.choose_setting(rows) == {"chunk_bytes": 16, "pace": "0.8"}  # highest passing pace, then the larger chunk
    rows[-1]["slowdown"] = 0.02
    assert tr.choose_setting(rows) == {"chunk_bytes": 16, "pace": "unpaced"}
    rows[-1]["valid"] = False  # an invalid run never qualifies
    assert tr.choose_setting(rows) == {"chunk_bytes": 16, "pace": "0.8"}
    assert tr.choose_setting([row(1, 16, "0.5", 0.2, 0.95)]) is None


def test_tiny_cpu_run():
    threads = torch.get_num_threads()
    cfg = tr.Config.for_profile("cpu", layer_counts=[1, 2], chunk_bytes=[16 << 10, 64 << 10], repeats=4, min_repeats=2,
                                decode_batches=[2], paces=[0.5, None], pairs=2, gap=5)
    res = tr.run(cfg)
    assert torch.get_num_threads() == threads and res.params["device"] == "cpu" and res.params["threads"] == 1
    h = res.headline
    for key in ("engine", "copy_bw_under_decode_vs_isolated", "decode_slowdown_during_copy", "swap_to_use_ms",
                "copies_bitwise_exact", "verdict_packed_faster_int4", "verdict_less_jitter_fp16"):
        assert key in h, key
    assert h["valid"] is True and h["copies_bitwise_exact"] is True and h["targets_judged"] is False
    assert h["copy_bw_under_decode_vs_isolated"]["met"] is None  # targets are judged on a GPU only
    assert h["swap_to_use_ms"]["value"] > 0 and h["int4_layer_copy_ms"]["n"] == 4
    chosen = h["chosen_copy_setting"] or {"chunk_bytes": 64 << 10, "pace": "0.5"}  # read when none qualifies
    assert [tr.setting_text(1 << 20, "0.8"), tr.setting_text(64 << 10, "unpaced")] == ["1 MiB chunks, pace 0.8",
                                                                                     "64 KiB chunks, unpaced"]
    assert tr.setting_text(chosen["chunk_bytes"], chosen["pace"]) in h["swap_to_use_ms"]["label"]
    assert h["copy_setting_read"]["chosen"] == (h["chosen_copy_setting"] is not None)
    ops = res.files["engine_ops.json"]
    assert {(o["to"], o["layers"], o["chunk_bytes"]) for o in ops} == {
        (t, k, c) for t in ("int4", "fp16") for c, ks in ((16 << 10, (1,)), (64 << 10, (1, 2))) for k in ks}
    assert all(len(o["samples_ms"]) == o["n"] for o in ops)
    cont = res.files["contention.json"]
    assert len(cont) == 1 * 2 * 2 and all(r["valid"] and r["events"] == 4 for r in cont)
    assert set(res.files["timeline.json"]) == {"0.5", "unpaced"}
    raw = res.files["raw_copies.json"]
    assert {r["memory"] for r in raw} == {"pinned", "pageable"} and not any(r["host_pinned"] for r in raw)  # CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_profile_without_cuda_names_the_cpu_profile():
    with pytest.raises(MorphError, match="profile='cpu'") as exc:
        tr.run(tr.Config.for_profile("gpu"))
    assert "\n" not in str(exc.value)


@pytest.mark.gpu
def test_gpu_paths_at_tiny_sizes():
    """The GPU profile's code at tiny sizes (SmolLM2's shape): pinned and pageable copies timed by CUDA events
    on the engine's copy stream, engine ops with events per chunk, decode contention with CUDA graphs
    (precaptured: no lazy capture, every timed step a graph)."""
    mib = 1 << 20
    cfg = tr.Config.for_profile("gpu", shapes=["smollm2-135m"], layer_counts=[1, 2], chunk_bytes=[mib, 4 * mib],
                                engine_chunk_bytes=mib, repeats=6, min_repeats=3, pageable_layer_counts=[1],
                                ceiling_bytes=[mib], decode_batches=[1, 4], paces=[0.8, None], pairs=2, gap=4,
                                prompt_len=16, memory_gib=4.0)
    res = tr.run(cfg)
    h = res.headline
    assert h["valid"] is True and h["targets_judged"] is True and h["copies_bitwise_exact"] is True
    raw = {(r["payload"], r["packing"], r["memory"]): r for r in res.files["raw_copies.json"]}
    assert raw[("fp16", "layer", "pinned")]["host_pinned"] and not raw[("fp16", "layer", "pageable")]["host_pinned"]
    assert raw[("fp16", "layer", "pinned")]["gbps"] > 5
    assert all(r["graph_share"] == 1.0 and r["bw_vs_isolated"] > 0.2 for r in res.files["contention.json"])
    assert all(o["copy_ms"] is not None for o in res.files["contention_ops.json"])
