"""INT4 storage and kernels: layouts round-trip, the linear matches its dequantized reference."""

import pytest
import torch

from morphlib.errors import MorphError
from morphlib.quant.int4 import (Int4Linear, dequantize_groupwise, int4_nbytes, pack, quantize_groupwise,
                           unpack)
from morphlib.models import decoder_layers, layer_linears


def pack_tinygemm_reference(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Slow scalar transcription of aten's _convert_weight_to_int4pack (CUDA) layout."""
    n, k = q.shape
    hi_lo = ((q[:, 0::2].int() << 4) | q[:, 1::2].int())
    out = torch.zeros(n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2, dtype=torch.int64)
    for nt in range(out.shape[0]):
        for ko in range(out.shape[1]):
            for t in range(32):
                row = nt * 8 + t // 4
                for j in range(inner_k_tiles // 2):
                    base = (ko * inner_k_tiles + 2 * j) * 8 + t % 4
                    v = [int(hi_lo[row, base + off]) for off in (0, 4, 8, 12)]
                    word = 0
                    for i in range(4):
                        word |= (v[i] >> 4) << (4 * i)  # high nibbles (even k) first
                        word |= (v[i] & 0xF) << (16 + 4 * i)
                    out[nt, ko, t, j] = word
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("layout", ["plain", "cpu"])
@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (1536, 576), (576, 1536)])
def test_layouts_round_trip(layout, shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    torch.testing.assert_close(unpack(pack(q, layout), layout, *shape), q, rtol=0, atol=0)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_tinygemm_unpack_inverts_the_cuda_layout(inner_k_tiles):
    shape = (16, inner_k_tiles * 32)
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_tinygemm_reference(q, inner_k_tiles)
    torch.testing.assert_close(unpack(packed, "tinygemm", *shape), q, rtol=0, atol=0)
    if torch.cuda.is_available():  # the real op must produce the layout we unpack
        real = torch.ops.aten._convert_weight_to_int4pack(
            ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous().cuda(), inner_k_tiles)
        torch.testing.assert_close(real.cpu(), packed, rtol=0, atol=0)


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
        assert q.layout == ("tinygemm" if device == "cuda" else "cpu")
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
