"""Chapter 3 machinery on CPU: slab layout, exact round trips, copy plans, the experiment's bookkeeping."""

import pytest
import torch

from morphbook.experiments.transfer import Config, LayerSlab, SlabModel, run
from morphlib.errors import MorphError
from morphlib.select.layersets import middle_block, runs, spread
from morphlib.shapes import shape_layer_bytes


def _tensors(n_layers=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(33, 17, generator=g).to(torch.bfloat16),
             "packed": torch.randint(0, 255, (7, 5), generator=g, dtype=torch.uint8),
             "i32": torch.randint(-1000, 1000, (3, 4, 2), generator=g, dtype=torch.int32)}
            for _ in range(n_layers)]


def test_layer_sets():
    assert middle_block(30, 8) == list(range(11, 19))
    assert middle_block(32, 1) == [15]
    for n, k in [(30, 2), (30, 8), (32, 16), (22, 8), (30, 15)]:
        s = spread(n, k)
        assert len(s) == k and all(0 <= i < n for i in s)
        assert all(b - a >= 2 for a, b in zip(s, s[1:])), s  # scattered: never adjacent when k <= n/2
    assert spread(30, 30) == list(range(30))
    assert runs([5, 1, 2, 3, 9, 10]) == [(1, 3), (5, 5), (9, 10)]
    with pytest.raises(MorphError):
        middle_block(30, 31)


def test_slab_round_trip_is_bitwise_exact_and_copies_only_the_asked_layers():
    src = _tensors()
    slab = LayerSlab.from_tensors(src, "cpu")
    for li, layer in enumerate(src):  # the views hold exactly the original tensors
        for name, t in layer.items():
            v = slab.view(li, name)
            assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
            assert (v.data_ptr() - slab.device_buffer.data_ptr()) % 256 == 0
    assert slab.payload_bytes([0]) == sum(t.numel() * t.element_size() for t in src[0].values())
    for packing, expect_copies in [("tensor", 9), ("layer", 3), ("run", 2)]:
        slab.device_buffer.zero_()
        assert not slab.matches_host([1])
        assert slab.copy_to_device([1, 2, 4], packing) == expect_copies
        assert slab.matches_host([1, 2, 4])
        for li in (0, 3):  # untouched layers stay zero
            a, b = slab.ranges[li]
            assert int(slab.device_buffer[a:b].count_nonzero()) == 0
        for li in (1, 2, 4):
            for name, t in src[li].items():
                assert torch.equal(slab.view(li, name), t)


def test_slab_errors_are_one_line():
    slab = LayerSlab.from_tensors(_tensors(3), "cpu")
    for bad in (lambda: slab.plan([3]), lambda: slab.plan([0], "bogus"), lambda: slab.plan([1, 1]),
                lambda: slab.copy_to_device([0], stream=object())):
        with pytest.raises(MorphError) as exc:
            bad()
        assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def smol_slabs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run() does on CPU: many small ops, and OpenMP spin-waits collapse on a busy machine
    try:
        return SlabModel.build("smollm2-135m", "cpu", group_size=64, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_slab_model_weights_live_in_the_slab(smol_slabs):
    sm = smol_slabs
    want = shape_layer_bytes("smollm2-135m", 64)
    assert sm.fp16.payload_bytes([0]) == want["fp16_bytes"]
    assert sm.int4.payload_bytes([0]) == want["int4_bytes"]
    lin = sm.layers[7].mlp.down_proj
    lo, hi = sm.fp16.device_buffer.data_ptr(), sm.fp16.device_buffer.data_ptr() + sm.fp16.nbytes
    assert lo <= lin.weight.data_ptr() < hi  # the module's weight IS slab storage
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    twin = sm.twins[7]["mlp.down_proj"]
    y_ref = twin(x)
    sm.int4.device_buffer.zero_()  # wipe the INT4 layer, then bring it back with one copy
    assert not torch.equal(twin(x), y_ref)
    sm.int4.copy_to_device([7], "layer")
    assert torch.equal(twin(x), y_ref)


def test_run_small_cpu_fallback():
    threads = torch.get_num_threads()
    cfg = Config.for_profile("cpu", layer_counts=[1, 2], repeats=2, warmup=1, ceiling_mb=[1])
    assert cfg.layer_counts == (1, 2) and cfg.shapes == ("smollm2-135m",)  # lists become tuples
    res = run(cfg)
    assert torch.get_num_threads() == threads  # the CPU fallback's one thread does not leak out of run
    assert res.params["device"] == "cpu" and res.params["threads"] == 1 and res.params["profile"] == "cpu"
    timings = res.files["timings.json"]
    assert len(timings) == 2 * (3 + 6)
    assert {(r["packing"], r["copies"]) for r in timings if r["payload"] == "fp16" and r["layers"] == 2
            and r["contiguity"] == "block"} == {("tensor", 14), ("layer", 2), ("run", 1)}
    assert all(r["median_ms"] > 0 and r["n"] == 2 and r["ceiling_ratio"] > 0 for r in timings)
    assert [r["mb"] for r in res.files["ceiling.json"]] == [1.0]
    assert res.files["layer_bytes.json"][0]["fp16_bytes"] == shape_layer_bytes("smollm2-135m")["fp16_bytes"]
    h = res.headline
    assert h["copies_bitwise_exact"] is True and h["shape"] == "smollm2-135m" and "CPU fallback" in h["timer"]
    assert h["scattered_vs_block_ratio_fp16_2_layers"]["value"] > 0
    assert {"packed_vs_pertensor_speedup_int4_1_layer", "block_one_copy_speedup_int4_2_layers",
            "fp16_2_layers_gbps", "fp16_2_layers_p99_ms", "ceiling_gbps"} <= set(h)


def test_profiles_and_one_line_config_errors():
    gpu = Config.for_profile("gpu")
    assert gpu.shapes == ("tinyllama-1.1b", "llama-2-7b") and gpu.repeats == 40 and gpu.warmup == 3
    assert gpu.ceiling_mb == (1, 4, 16, 64, 256, 1024) and gpu.layer_counts == (1, 2, 4, 8)
    cpu = Config.for_profile("cpu")
    assert cpu.repeats == 10 and cpu.warmup == 2 and cpu.ceiling_mb == (1, 4, 16, 64)
    for bad in (dict(shapes=["gpt-9"]), dict(layer_counts=[0]), dict(layer_counts=[2, 2]),
                dict(layer_counts=[31]), dict(repeats=0), dict(device="mps"), dict(bogus=1)):
        with pytest.raises(MorphError) as exc:
            Config.for_profile("cpu", **bad)
        assert "\n" not in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_profile_without_cuda_names_the_cpu_fallback():
    with pytest.raises(MorphError, match="profile='cpu'") as exc:
        run(Config.for_profile("gpu"))
    assert "\n" not in str(exc.value)
