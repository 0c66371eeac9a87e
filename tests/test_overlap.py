"""Chapter 4 on CPU: the swap schedule, the stall bookkeeping, the config, and one tiny real run."""

import pytest
import torch

from morphbook.experiments.overlap import Config, DecodeRun, run, schedule, summarize
from morphlib.errors import MorphError


def test_schedule_alternates_swap_and_restore():
    assert schedule(16, 4) == {4: "swap", 8: "restore", 12: "swap"}
    assert schedule(9, 8) == {8: "swap"}


def test_summarize_stall_is_excess_over_plain_steps_of_the_same_precision():
    r = DecodeRun("sync", 0, step_ms=[50.0, 10.0, 30.0, 12.0, 12.0, 25.0, 11.0],
                  state=["fp16", "fp16", "int4", "int4", "int4", "fp16", "fp16"],
                  carried=["", "", "swap", "", "", "restore", ""],
                  events=[{"kind": "swap", "host_ms": 3.0}, {"kind": "restore", "host_ms": 4.0}])
    none = DecodeRun("none", 0, step_ms=[40.0, 9.0, 11.0], state=["fp16"] * 3, carried=[""] * 3)
    s = summarize([r, none])
    assert s["none_plain_ms"] == 10.0  # step 0 (first use) never counts
    assert s["sync_swap_stall_ms"] == 30.0 - 12.0  # plain INT4 steps: 12, 12
    assert s["sync_restore_stall_ms"] == 25.0 - 10.5  # plain FP16 steps after step 0: 10, 11
    assert s["sync_swap_call_ms"] == 3.0 and s["sync_restore_call_ms"] == 4.0
    assert "async_tokens_match_sync" not in s  # no side-stream run on CPU


def test_profiles_and_one_line_config_errors():
    gpu, cpu = Config.for_profile("gpu"), Config.for_profile("cpu")
    assert (gpu.batch, gpu.prompt_len, gpu.steps, gpu.interval, gpu.layers_swapped, gpu.rounds) == (8, 128, 64, 8, 16, 3)
    assert (cpu.batch, cpu.prompt_len, cpu.steps, cpu.interval, cpu.layers_swapped, cpu.rounds) == (2, 16, 16, 4, 4, 1)
    for bad in (dict(interval=16), dict(batch=0), dict(prompt_len=1), dict(device="mps"), dict(layers=[3])):
        with pytest.raises(MorphError) as exc:
            Config.for_profile("cpu", **bad)
        assert "\n" not in str(exc.value)
    if not torch.cuda.is_available():
        with pytest.raises(MorphError, match="profile='cpu'"):
            run(gpu)


def test_tiny_cpu_run():
    threads = torch.get_num_threads()
    res = run(Config.for_profile("cpu", batch=1, prompt_len=8, steps=5, interval=2, layers_swapped=2))
    assert torch.get_num_threads() == threads
    assert res.params["layers"] == [14, 15] and res.params["device"] == "cpu" and res.params["threads"] == 1
    steps = res.files["steps.json"]
    assert {r["mode"] for r in steps} == {"none", "sync"} and len(steps) == 2 * 5
    assert [r["carried"] for r in steps if r["mode"] == "sync"] == ["", "", "swap", "", "restore"]
    assert [r["state"] for r in steps if r["mode"] == "sync"] == ["fp16", "fp16", "int4", "int4", "fp16"]
    swap = next(e for e in res.files["events.json"] if e["kind"] == "swap")
    h = res.headline
    assert h["layers_swapped"] == 2 and h["freed_mib_expected"]["value"] == swap["freed_bytes"] / 2**20 > 0
    assert h["tpot_ms_no_swap"]["value"] > 0 and h["async_tokens_match_sync"]["value"] is None
    assert h["freed_mib_measured"]["value"] is None  # no device allocator on CPU
