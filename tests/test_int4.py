"""INT4 storage and kernels: layouts round-trip, the linear matches its dequantized reference."""

import pytest
import torch
import torch.nn.functional as F

from morphlib.errors import MorphError
from morphlib.quant import int4
from morphlib.quant.int4 import (Int4Linear, dequantize_groupwise, dequantize_packed, int4_nbytes, pack,
                                 packed_specs, quantize_groupwise, unpack)
from morphlib.structure import decoder_layers, layer_linears


@pytest.mark.parametrize("layout", ["plain", "cpu", "triton"])
@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (1536, 576), (576, 1536)])
def test_layouts_round_trip(layout, shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack(q, layout)
    torch.testing.assert_close(unpack(packed, layout, *shape), q, rtol=0, atol=0)
    spec_shape, spec_dtype = packed_specs(shape[0], shape[1], 64, layout)["packed"]
    assert tuple(packed.shape) == spec_shape and packed.dtype == spec_dtype


def test_triton_layout_pairs_k_and_k_plus_16():
    """Byte j of each 16-byte block holds k = 32b + j (low nibble) and k = 32b + 16 + j (high nibble)."""
    q = torch.randint(0, 16, (3, 96), dtype=torch.uint8)
    p = pack(q, "triton")
    for b in range(3):
        for j in range(16):
            assert int(p[1, 16 * b + j]) == int(q[1, 32 * b + j]) | (int(q[1, 32 * b + 16 + j]) << 4)


def _nbytes(shape, dtype) -> int:
    return torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("layout", ["plain", "cpu", "triton"])
@pytest.mark.parametrize("n,k,g", [(576, 576, 64), (1536, 576, 32), (4096, 11008, 128), (256, 2048, 256)])
def test_packed_specs_bytes_are_exact(layout, n, k, g):
    specs = packed_specs(n, k, g, layout)
    assert sum(_nbytes(*spec) for spec in specs.values()) == int4_nbytes(n, k, g) == n * k // 2 + 4 * n * (k // g)


def test_every_layout_is_one_table_entry_and_an_unknown_one_is_refused():
    assert set(int4.LAYOUTS) == {"plain", "cpu", "triton"}  # tinygemm is the kernels bench's yardstick only
    for call in (lambda: pack(torch.zeros(64, 64, dtype=torch.uint8), "tinygemm"),
                 lambda: packed_specs(64, 64, 64, "tinygemm"), lambda: int4.layout_of("nibbles")):
        with pytest.raises(MorphError, match="unknown INT4 layout"):
            call()


def test_device_layouts():
    assert int4.choose_layout(576, 576, torch.device("cpu")) == "cpu"
    assert int4.choose_layout(200, 576, torch.device("cpu")) == "plain"
    assert int4.choose_layout(200, 576, torch.device("cuda")) == "triton"


def test_kernel_plan_is_deterministic_with_rules_and_exact_mode():
    """Kernel choice: a pure function of (device, N, K, M, g, mode); exact mode never fuses above 16 rows."""
    for name in ("NVIDIA H200", "Some Unknown GPU"):
        for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (1000, 640)]:
            for m in (1, 2, 3, 8, 16, 17, 100, 512, 5000):
                for mode in int4.MODES:
                    a = int4.kernel_plan(name, n, k, m, 64, mode, capability=(9, 0), sm_count=132)
                    b = int4.kernel_plan(name, n, k, m, 64, mode, capability=(9, 0), sm_count=132)
                    assert a == b
                    assert a["kernel"] in ("gemv", "dot", "dequant_gemm")
                    if mode == "exact" and m > int4.EXACT_FUSED_MAX_ROWS:
                        assert a["kernel"] == "dequant_gemm"
    assert int4.kernel_plan("Some Unknown GPU", 4096, 4096, 1, 64, sm_count=132)["source"] == "rules"
    with pytest.raises(MorphError, match="unknown INT4 mode"):
        int4.kernel_plan("NVIDIA H200", 64, 64, 1, 64, "fastest")


def test_table_lookup_rounds_rows_up_to_the_next_tuned_count():
    table = int4.tuning_table()["devices"].get("NVIDIA H200")
    if not table:
        pytest.skip("no H200 table shipped")
    entries = table["entries"]["4096x4096/g64"]
    for m, bucket in ((1, "1"), (3, "4"), (5, "8"), (16, "16"), (17, "32"), (300, "512"), (9999, "2048")):
        plan = int4.kernel_plan("NVIDIA H200", 4096, 4096, m, 64, "fast")
        want = {k: v for k, v in entries[bucket].items() if k != "us"}
        assert plan["source"] == "table" and {k: plan[k] for k in want} == want, (m, plan)
    # a card of the same capability and SM count (H100 SXM) reads the H200 table; exact mode stays exact
    assert int4.kernel_plan("NVIDIA H100 80GB HBM3", 4096, 4096, 1, 64, capability=(9, 0), sm_count=132)["source"] == "table"
    assert int4.kernel_plan("NVIDIA H200", 4096, 4096, 300, 64, "exact")["kernel"] == "dequant_gemm"


def test_shipped_tuning_table_is_well_formed():
    from morphlib.bench import kernels as bench

    table = int4.tuning_table()
    for name, dev in table.get("devices", {}).items():
        assert len(dev["capability"]) == 2 and dev["sm_count"] > 0, name
        for key, entries in dev["entries"].items():
            n, rest = key.split("x")
            k, g = rest.split("/g")
            assert int(k) % int(g) == 0
            assert set(entries["dequant"]) == {"dq_bn", "dq_gpp", "dq_warps"}
            for m in bench.ROWS:
                assert entries[str(m)]["kernel"] in ("gemv", "dot", "dequant_gemm"), (name, key, m)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_quantize_reconstructs_within_half_a_step(symmetric, group_size):
    w = torch.randn(128, 256)
    q, scale, zero = quantize_groupwise(w, group_size, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (dequantize_groupwise(q, scale, zero, group_size) - w).abs().reshape(128, -1, group_size)
    step = scale[..., None].expand_as(err)
    assert bool((err <= 0.5 * step + 1e-6).all()) or symmetric  # symmetric may clip at -8 * scale
    rel = (err.pow(2).mean() / w.pow(2).mean()).sqrt()
    assert rel < (0.13 if symmetric else 0.10)


def _real_linears(model, count=3):
    layer = decoder_layers(model)[7]
    return list(layer_linears(layer).items())[:count] + [("mlp.down_proj", layer_linears(layer)["mlp.down_proj"])]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 7, 64, 200])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_matches_dequantized_reference(model, batch, group_size, device):
    """Fused kernel (small batch) and dequantize+GEMM (large batch) vs float64 on the dequantized weight."""
    torch.manual_seed(batch)
    for name, lin in _real_linears(model):
        weight = lin.weight.to(device)
        q = Int4Linear.from_weight(weight, group_size=group_size)
        assert q.layout == ("triton" if device == "cuda" else "cpu")
        x = torch.randn(batch, lin.in_features, dtype=torch.bfloat16, device=device)
        ref = x.double() @ q.dequantize(torch.float64).t()
        out = q(x).double()
        rel = (out - ref).norm() / ref.norm()
        assert rel <= 1e-2, f"{name} batch {batch}: relative error {rel:.2e}"


def test_awq_input_scale_is_applied_on_both_paths(model):
    lin = layer_linears(decoder_layers(model)[3])["self_attn.q_proj"]
    s = torch.rand(lin.in_features) + 0.5
    q = Int4Linear.from_linear(lin, group_size=64, input_scale=s)
    for batch in (1, 200):  # fused kernel and dequantize+GEMM
        x = torch.randn(batch, lin.in_features, dtype=torch.bfloat16)
        ref = x.double() @ q.dequantize(torch.float64).t()
        assert (q(x).double() - ref).norm() / ref.norm() <= 1e-2
    # and the layer still approximates the original weight
    w = lin.weight.double()
    assert (q.dequantize(torch.float64) - w).norm() / w.norm() < 0.15


@pytest.mark.parametrize("group_size", [64, 128])
def test_packed_bytes_at_most_0_3_of_fp16(model, group_size):
    """4 bits per weight + a bf16 (scale, zero) per group: 0.281 at g64, 0.266 at g128 (0.3125 at g32)."""
    linears = _real_linears(model) if group_size == 64 else [("down_proj", layer_linears(decoder_layers(model)[0])["mlp.down_proj"])]
    for name, lin in linears:
        q = Int4Linear.from_linear(lin, group_size=group_size)
        fp16 = lin.weight.numel() * 2
        assert q.nbytes == int4_nbytes(lin.out_features, lin.in_features, group_size)
        assert q.nbytes <= 0.3 * fp16, f"{name}: {q.nbytes / fp16:.3f}"


def test_smollm2_weights_sit_on_a_group32_grid(model):
    """The default model is a dequantized Q4_1 GGUF: asym g32 is (nearly) lossless, g64 is not."""
    w = layer_linears(decoder_layers(model)[5])["mlp.up_proj"].weight.float()
    rel = {}
    for g in (32, 64):
        q, s, z = quantize_groupwise(w, g, symmetric=False)
        rel[g] = float((dequantize_groupwise(q, s, z, g) - w).norm() / w.norm())
    assert rel[32] < 0.01 < 0.05 < rel[64], rel


def test_bad_group_size_is_a_one_line_error():
    with pytest.raises(MorphError, match="does not divide K=576") as exc:
        Int4Linear.from_weight(torch.randn(64, 576), group_size=128)
    assert "\n" not in str(exc.value)
    with pytest.raises(MorphError, match="not supported"):
        quantize_groupwise(torch.randn(64, 576), 48)


def test_cpu_large_batch_path_is_the_torch_reference():
    """CPU, above the fused-kernel rows: exactly F.linear on the torch-dequantized weight."""
    torch.manual_seed(0)
    w = torch.randn(192, 576) * 0.02
    lin = Int4Linear.from_weight(w, group_size=64, input_scale=torch.rand(576) + 0.5)
    x = torch.randn(200, 576).to(torch.bfloat16)
    ref = F.linear(x, dequantize_packed(lin.packed, lin.scale_zero, n=192, k=576, group_size=64, layout="cpu",
                                        input_scale_inv=lin.input_scale_inv))
    assert torch.equal(lin(x), ref)


def test_bench_runs_on_cpu_and_reports_the_headline(tmp_path):
    import json

    from morphlib.cli import main
    from morphlib.bench import kernels as bench

    res = bench.run_bench(shapes=[{"model": "llama-2-7b", "n": 128, "k": 256, "linears": ["toy"]}], rows=[1, 8, 200],
                          device="cpu", log=lambda *a: None)
    assert res["cpu"] and res["device"] == "CPU" and len(res["rows"]) == 3
    assert {"worst_time_ratio_rows_1", "worst_time_ratio_rows_le_16", "worst_time_ratio_rows_16_256"} == set(res["headline"])
    out = tmp_path / "b.json"
    main(["bench", "--n", "128", "--k", "256", "--rows", "1", "4", "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["m"] for r in data["rows"]] == [1, 4] and data["cpu"]
