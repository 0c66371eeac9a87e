"""Real group-wise INT4 weights and a linear layer that runs on them.

Quantization (per output row, groups of ``group_size`` along K, the input dimension)::

    w ~= (q - 8) * scale + zero,   q in 0..15          (tinygemm's convention)
    asymmetric: scale = (max - min) / 15,  zero = min + 8 * scale
    symmetric:  scale = max|w| / 7,        zero = 0    (q - 8 in -8..7)

Storage really holds 4 bits per weight (two weights per byte) plus one bf16 (scale, zero) pair per
group. Three byte layouts, chosen by the device the weights live on:

* ``tinygemm`` (CUDA, sm80+): the tensor-core tile layout of ``aten._convert_weight_to_int4pack``,
  run by ``aten._weight_int4pack_mm``; needs K % 32 == 0 (inner k-tiles 8, 4 or 2).
* ``cpu``: the layout of ``aten._convert_weight_to_int4pack_for_cpu`` (blocks of 64 output rows),
  run by ``aten._weight_int4pack_mm_for_cpu``; used when N % 64 == 0.
* ``plain``: uint8 [N, K/2], even k in the high nibble; no kernel, dequantize-then-matmul only.

Kernel choice (automatic, per call): the fused INT4 kernel when the call has at most
``KERNEL_MAX_TOKENS[device]`` rows (decode, small batches: it reads 4x fewer weight bytes);
otherwise dequantize the weight to bf16 once and run a dense GEMM (prefill, large batches, where
tinygemm is up to 12x slower than bf16 GEMM on H200; ``python -m morphlib bench`` measures the crossover).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from morphlib.errors import MorphError
from morphlib.shapes import int4_nbytes  # noqa: F401  (the byte accounting of this format)

GROUP_SIZES = (32, 64, 128, 256)
# Largest number of rows (tokens) for which the fused INT4 kernel is used instead of dequant+GEMM.
# CUDA: tinygemm beats bf16 GEMM up to ~M=16 on H100/H200 (platform notes: M=8 0.084 vs 0.137 ms,
# M=32 0.145 vs 0.109 ms). CPU (2 cores, AMX): the kernel costs ~10 us per row for a 576x1536
# weight, dequantize+GEMM ~1 ms flat, so the crossover is near 100 rows (morphlib.bench prints it).
KERNEL_MAX_TOKENS = {
    "cuda": int(os.environ.get("MORPHLIB_INT4_KERNEL_MAX_TOKENS_CUDA", 16)),
    "cpu": int(os.environ.get("MORPHLIB_INT4_KERNEL_MAX_TOKENS_CPU", 96)),
}


def check_group_size(k: int, group_size: int, where: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise MorphError(f"group size {group_size} is not supported: choose one of {GROUP_SIZES}")
    if k % group_size != 0:
        fits = [g for g in GROUP_SIZES if k % g == 0]
        raise MorphError(
            f"group size {group_size} does not divide K={k} of {where}; sizes that fit: {fits or 'none'}"
        )


# ----------------------------------------------------------------------------- quantization


def quantize_groupwise(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """Quantize a [N, K] weight. Returns q (uint8 [N, K], 0..15), scale and zero (float32 [N, K/g])."""
    if w.dim() != 2:
        raise MorphError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    check_group_size(k, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = wg.abs().amax(dim=-1).clamp(min=1e-8) / 7.0
        zero = torch.zeros_like(scale)
        q = (torch.round(wg / scale[..., None]) + 8).clamp(0, 15)
    else:
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        zero = lo + 8.0 * scale
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    qg = q.to(dtype).reshape(n, k // group_size, group_size) - 8
    return (qg * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).reshape(n, k)


# ----------------------------------------------------------------------------- byte layouts


def choose_layout(n: int, k: int, device: torch.device) -> str:
    if device.type == "cuda" and k % 32 == 0 and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tinygemm"
    if device.type == "cpu" and n % 64 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    return "plain"


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack q (uint8 [N, K], values 0..15) into the given layout, on q's device."""
    n, k = q.shape
    hi_lo = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()  # plain: even k in the high nibble
    if layout == "plain":
        return hi_lo
    if layout == "tinygemm":
        return torch.ops.aten._convert_weight_to_int4pack(hi_lo, _inner_k_tiles(k))
    if layout == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    raise MorphError(f"unknown INT4 layout {layout!r}")


def unpack(packed: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [N, K] with values 0..15 (pure tensor ops, any device)."""
    if layout == "plain":
        return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, k)
    if layout == "cpu":
        # bytes [N/64][K][32]: low nibble = row j, high nibble = row j + 32 of each 64-row block
        b = packed.reshape(n // 64, k, 32)
        rows = torch.stack([b & 0xF, b >> 4], dim=1)  # [N/64, 2, K, 32]
        return rows.permute(0, 1, 3, 2).reshape(n, k)
    if layout == "tinygemm":
        # int32 [N/8][K/(16*T)][32 lanes][T/2]; lane t = 4*t4 + tm holds row 8*nt + t4; nibble
        # p = 4*h + i of word j holds k = 16*T*ko + 32*j + 8*i + 2*tm + h (from int4mm.cu).
        nt, ko, _, jj = packed.shape
        shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
        nib = (packed[..., None] >> shifts) & 0xF  # [nt, ko, 32, jj, 8]
        nib = nib.reshape(nt, ko, 8, 4, jj, 2, 4)  # nt, ko, t4, tm, j, h, i
        q = nib.permute(0, 2, 1, 4, 6, 3, 5)  # nt, t4 | ko, j, i, tm, h
        return q.reshape(n, k).to(torch.uint8)
    raise MorphError(f"unknown INT4 layout {layout!r}")


def packed_specs(n: int, k: int, group_size: int, layout: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of an [N, K] INT4 weight's buffers in ``layout`` (``packed``, ``scale_zero``),
    so that an engine can place them in memory it owns; their bytes sum to ``int4_nbytes``."""
    check_group_size(k, group_size)
    if layout == "plain":
        packed = ((n, k // 2), torch.uint8)
    elif layout == "cpu":
        packed = ((n, k // 2), torch.uint8)
    elif layout == "tinygemm":
        t = _inner_k_tiles(k)
        packed = ((n // 8, k // (16 * t), 32, t // 2), torch.int32)
    else:
        raise MorphError(f"unknown INT4 layout {layout!r}")
    return {"packed": packed, "scale_zero": ((k // group_size, n, 2), torch.bfloat16)}


def dequantize_packed(packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int, group_size: int,
                      layout: str, input_scale_inv: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The effective [N, K] weight of packed INT4 buffers (with an AWQ input scale folded back in)."""
    q = unpack(packed, layout, n, k)
    sz = scale_zero.to(dtype)
    w = dequantize_groupwise(q, sz[..., 0].t(), sz[..., 1].t(), group_size, dtype)
    if input_scale_inv is not None:
        w = w * input_scale_inv.to(dtype)[None, :]
    return w


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int,
                group_size: int, layout: str, input_scale_inv: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for a bf16 [M, K] activation and a packed INT4 [N, K] weight; returns bf16 [M, N].

    The kernel is chosen by the row count M and the device (module doc); buffers may be views into
    memory the caller owns (a serving engine's arena)."""
    rows = x.shape[0]
    fused = ((layout == "tinygemm" and x.device.type == "cuda" and rows <= KERNEL_MAX_TOKENS["cuda"])
             or (layout == "cpu" and x.device.type == "cpu" and rows <= KERNEL_MAX_TOKENS["cpu"]))
    if fused:
        if input_scale_inv is not None:
            x = x * input_scale_inv
        x = x.contiguous()
        if layout == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)
        return y if bias is None else y + bias.to(y.dtype)
    w = dequantize_packed(packed, scale_zero, n=n, k=k, group_size=group_size, layout=layout,
                          input_scale_inv=input_scale_inv)
    return F.linear(x, w, None if bias is None else bias.to(torch.bfloat16))


# ----------------------------------------------------------------------------- the layer


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored as packed INT4 (see module docstring).

    ``input_scale`` (AWQ-style, optional, shape [K]) is the per-input-channel scale s the weight was
    multiplied by before quantization; forward divides the activation by it, so
    ``y = Q(W diag(s)) (x / s)``. Keeping s here (instead of folding it into the previous norm)
    keeps every swap local to one linear and every restore exact.
    """

    def __init__(self, packed, scale_zero, *, in_features, out_features, group_size, layout,
                 bias=None, input_scale=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.layout = group_size, layout
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)  # bf16 [K/g, N, 2]
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale_inv", None if input_scale is None else (1.0 / input_scale.float()).to(scale_zero.dtype))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, *, group_size: int = 64, symmetric: bool = False,
                    bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                    layout: str | None = None, name: str = "weight") -> "Int4Linear":
        n, k = weight.shape
        check_group_size(k, group_size, name)
        w = weight.detach()
        if input_scale is not None:
            w = w.float() * input_scale.float().to(w.device)[None, :]
        q, scale, zero = quantize_groupwise(w, group_size, symmetric)
        layout = layout or choose_layout(n, k, weight.device)
        scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(pack(q, layout), scale_zero, in_features=k, out_features=n, group_size=group_size,
                   layout=layout, bias=None if bias is None else bias.detach().clone(),
                   input_scale=None if input_scale is None else input_scale.detach().to(weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Int4Linear":
        return cls.from_weight(linear.weight, bias=linear.bias, **kwargs)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The effective [N, K] weight (with the AWQ input scale folded back in)."""
        return dequantize_packed(self.packed, self.scale_zero, n=self.out_features, k=self.in_features,
                                 group_size=self.group_size, layout=self.layout,
                                 input_scale_inv=self.input_scale_inv, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = int4_matmul(x2, self.packed, self.scale_zero, n=self.out_features, k=self.in_features,
                        group_size=self.group_size, layout=self.layout, input_scale_inv=self.input_scale_inv,
                        bias=self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        awq = ", awq" if self.input_scale_inv is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, layout={self.layout}{awq}")
