"""Real group-wise INT4 weights and a linear layer that runs on them.

Quantization (per output row, groups of ``group_size`` along K, the input dimension)::

    w ~= (q - 8) * scale + zero,   q in 0..15          (tinygemm's convention)
    asymmetric: scale = (max - min) / 15,  zero = min + 8 * scale
    symmetric:  scale = max|w| / 7,        zero = 0    (q - 8 in -8..7)

Storage really holds 4 bits per weight (two weights per byte) plus one bf16 (scale, zero) pair per
group, ``scale_zero`` bf16 [K/g, N, 2]. One byte layout per device, written once at quantization:

* ``triton`` (CUDA): uint8 [N, K/2]; in each block of 32 k's (16 bytes of a row) byte j holds
  k = 32b + j in the low nibble and k = 32b + 16 + j in the high nibble. The Triton kernels of
  ``morphlib.quant.kernels`` read it directly (decode GEMV, fused W4A16 GEMM, exact dequantize into a
  scratch buffer) with 16-byte loads of weights and activations alike; without Triton it is
  dequantized with torch ops. Same bytes as the other layouts (``int4_nbytes``).
* ``plain``: uint8 [N, K/2], even k in the high nibble (CPU when N % 64 != 0; no kernel).
* ``cpu``: the layout of ``aten._convert_weight_to_int4pack_for_cpu`` (blocks of 64 output rows),
  run by ``aten._weight_int4pack_mm_for_cpu``; used on CPU when N % 64 == 0.

Each layout is one entry of ``LAYOUTS`` (pack, unpack, the packed buffer's shape, and the layout's own
kernel where it has one), looked up once per call. (tinygemm's tile layout is a yardstick of the
kernels bench, ``morphlib.bench.kernels``, not a storage layout of the library.)

Kernel choice (``kernel_plan``) is a deterministic function of (device name, N, K, M, group size,
mode): a tuning table measured by ``python -m morphlib bench --tune`` and shipped with the package
(``int4_table.json``), with a rule-based fallback for cards and shapes it does not list. Never a
timing race inside a run. Two modes:

* ``exact`` (default; what the chapters run): above ``EXACT_FUSED_MAX_ROWS`` rows the weight is
  dequantized to bf16 (Triton, into a reusable scratch buffer) and multiplied by ``F.linear``, with
  bit-for-bit the numerics of the torch reference ``F.linear(x, dequantize_packed(...))``; at most
  that many rows run the table's fused kernel (tolerance below).
* ``fast`` (opt-in, for a serving engine): the table's fastest kernel at every row count, which may be
  the fused W4A16 GEMM at large M (not bit-identical to ``exact``).

Tolerance of every fused kernel against the fp32 reference (bf16 activations, fp32 dequantized
weight, float64 matmul): relative Frobenius error <= 1e-2 (measured ~3e-3: bf16 rounding of the
weight tile, of the AWQ-scaled activation and of the output); tests/test_int4_gpu.py checks it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from morphlib.errors import MorphError
from morphlib.shapes import int4_nbytes  # noqa: F401  (the byte accounting of this format)

GROUP_SIZES = (32, 64, 128, 256)
# CPU: fused `_weight_int4pack_mm_for_cpu` up to this many rows, dequantize+GEMM above (2 cores, AMX:
# the kernel costs ~10 us per row for a 576x1536 weight, dequantize+GEMM ~1 ms flat). Read at each call.
KERNEL_MAX_TOKENS = {"cpu": int(os.environ.get("MORPHLIB_INT4_KERNEL_MAX_TOKENS_CPU", 96))}
# exact mode (plain layout, CUDA): fused kernels up to this many rows, bit-exact dequantize+GEMM above
# (the rows the old tinygemm layout ran fused; the chapters' 512-token windows are far above it).
EXACT_FUSED_MAX_ROWS = 16
MODES = ("exact", "fast")
DEFAULT_MODE = os.environ.get("MORPHLIB_INT4_MODE", "exact")
TABLE_PATH = Path(__file__).with_name("int4_table.json")


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
    """The one storage layout of a device: ``triton`` on CUDA; on CPU ``cpu`` when N % 64 == 0,
    else ``plain``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and n % 64 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    return "plain"


def _pack_plain(q: torch.Tensor) -> torch.Tensor:  # even k in the high nibble
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def _unpack_plain(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(n, k)


def _pack_triton(q: torch.Tensor) -> torch.Tensor:  # per 32-block: low nibble k = 32b + j, high nibble k = 32b + 16 + j
    n, k = q.shape
    if k % 32:
        raise MorphError(f"the triton layout needs K % 32 == 0, got K={k}")
    b = q.reshape(n, k // 32, 2, 16)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _unpack_triton(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    b = packed.reshape(n, k // 32, 16)
    return torch.stack([b & 0xF, b >> 4], dim=2).reshape(n, k)


def _pack_cpu(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    # bytes [N/64][K][32]: low nibble = row j, high nibble = row j + 32 of each 64-row block
    b = packed.reshape(n // 64, k, 32)
    rows = torch.stack([b & 0xF, b >> 4], dim=1)  # [N/64, 2, K, 32]
    return rows.permute(0, 1, 3, 2).reshape(n, k)


def _half_bytes(n: int, k: int) -> tuple[tuple[int, ...], torch.dtype]:
    return (n, k // 2), torch.uint8


def _runs_triton(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and triton_available()


def _matmul_triton(x, packed, scale_zero, *, n, k, group_size, input_scale_inv, bias, mode, workspace):
    if x.shape[0] == 0:
        return x.new_empty(0, n, dtype=torch.bfloat16)
    x = x.to(torch.bfloat16)
    plan = plan_for(x, n, k, group_size, mode)
    return _run_plan(plan, x, packed, scale_zero, n=n, k=k, group_size=group_size,
                     input_scale_inv=input_scale_inv, bias=bias, workspace=workspace)


def _runs_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.shape[0] <= KERNEL_MAX_TOKENS["cpu"]


def _matmul_cpu(x, packed, scale_zero, *, n, k, group_size, input_scale_inv, bias, mode, workspace):
    if input_scale_inv is not None:
        x = x * input_scale_inv
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scale_zero)
    return y if bias is None else y + bias.to(y.dtype)


@dataclass(frozen=True)
class Int4Layout:
    """One byte layout of packed INT4 weights (module doc): ``pack`` q (uint8 [N, K], 0..15) into its
    buffer, ``unpack`` (packed, n, k) it back, the buffer's (shape, dtype) for an [N, K] weight, and the
    layout's own kernel: ``matmul`` when ``runs(x)`` says it takes this activation, else dequantize+GEMM."""

    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor]
    packed_shape: Callable[[int, int], tuple[tuple[int, ...], torch.dtype]]
    runs: Callable[[torch.Tensor], bool] = lambda x: False
    matmul: Callable | None = None


LAYOUTS: dict[str, Int4Layout] = {
    "triton": Int4Layout(_pack_triton, _unpack_triton, _half_bytes, _runs_triton, _matmul_triton),
    "plain": Int4Layout(_pack_plain, _unpack_plain, _half_bytes),
    "cpu": Int4Layout(_pack_cpu, _unpack_cpu, _half_bytes, _runs_cpu, _matmul_cpu),
}


def layout_of(name: str) -> Int4Layout:
    if name not in LAYOUTS:
        raise MorphError(f"unknown INT4 layout {name!r}: choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack q (uint8 [N, K], values 0..15) into the given layout, on q's device."""
    return layout_of(layout).pack(q)


def unpack(packed: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [N, K] with values 0..15 (pure tensor ops, any device)."""
    return layout_of(layout).unpack(packed, n, k)


def packed_specs(n: int, k: int, group_size: int, layout: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of an [N, K] INT4 weight's buffers in ``layout`` (``packed``, ``scale_zero``),
    so that an engine can place them in memory it owns; their bytes sum to ``int4_nbytes``."""
    check_group_size(k, group_size)
    return {"packed": layout_of(layout).packed_shape(n, k), "scale_zero": ((k // group_size, n, 2), torch.bfloat16)}


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


# ----------------------------------------------------------------------------- kernel choice


def triton_available() -> bool:
    """Whether the Triton kernels can run (``triton`` importable; CUDA needed to launch them)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TABLE: dict | None = None


def tuning_table() -> dict:
    """The shipped tuning table (``int4_table.json``): {"devices": {name: {"entries": ...}}}."""
    global _TABLE
    if _TABLE is None:
        _TABLE = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"devices": {}}
    return _TABLE


def shape_key(n: int, k: int, group_size: int) -> str:
    return f"{n}x{k}/g{group_size}"


def _table_device(name: str, capability: tuple[int, int] | None, sm_count: int | None) -> dict | None:
    devices = tuning_table().get("devices", {})
    if name in devices:
        return devices[name]
    # same chip family (compute capability and SM count, e.g. H100 SXM <-> H200): that card's table
    for other in sorted(devices):
        d = devices[other]
        if capability is not None and tuple(d.get("capability", ())) == tuple(capability) \
                and d.get("sm_count") == sm_count:
            return d
    return None


DEQUANT_DEFAULT = {"dq_bn": 32, "dq_gpp": 2, "dq_warps": 4}


def rule_plan(n: int, k: int, m: int, group_size: int, mode: str, sm_count: int = 132) -> dict:
    """Rule-based kernel choice for cards and shapes the tuning table does not list (distilled from
    the H200 table: what won there, by weight size and row count)."""
    if m > EXACT_FUSED_MAX_ROWS and mode == "exact":
        return {"kernel": "dequant_gemm", **DEQUANT_DEFAULT}
    big = n * k >= (1 << 24)  # >= 16 M weights (Llama-7B projections): wgmma kernel with split-K
    if m == 1 and not big:
        return {"kernel": "gemv", "BN": 8 if n >= 1024 else 16, "GB": 8, "split": 4 if (k >= 4096 or n <= 256) else 1,
                "warps": 2 if n >= 1024 else 4, "stages": 3}
    if m <= 16:
        if n * k < (1 << 20):  # tiny (SmolLM-sized): mma.sync tiles, no split-K pass
            return {"kernel": "dot", "BM": 16, "BN": 32, "GB": 4, "swap": 0, "split": 1, "warps": 4, "stages": 3,
                    "factor": 0}
        split = 2 if n >= 8192 else 4
        return {"kernel": "dot", "BM": 16, "BN": 64, "GB": 4, "swap": 1, "split": split, "warps": 4, "stages": 3,
                "factor": 0}
    if m <= 64:
        bm = 32 if m <= 32 else 64
        return {"kernel": "dot", "BM": bm, "BN": 64, "GB": 4 if m <= 32 else 2, "swap": 1,
                "split": 2 if n >= 8192 else 4, "warps": 4, "stages": 3, "factor": 0}
    return {"kernel": "dequant_gemm", **DEQUANT_DEFAULT}


def kernel_plan(device_name: str, n: int, k: int, m: int, group_size: int, mode: str = "exact", *,
                capability: tuple[int, int] | None = None, sm_count: int | None = None) -> dict:
    """The kernel (and its launch configuration) for one INT4 matmul of M rows on a CUDA card.

    A pure function of its arguments and the shipped table: the same call always gets the same
    kernel. The table is looked up by card name (or a card of the same capability and SM count),
    shape and group size; M goes to the smallest tuned row count >= M (the largest above 2048).
    ``source`` in the result says where the choice came from (``table`` or ``rules``)."""
    if mode not in MODES:
        raise MorphError(f"unknown INT4 mode {mode!r}: choose one of {MODES}")
    dev = _table_device(device_name, capability, sm_count)
    entries = (dev or {}).get("entries", {}).get(shape_key(n, k, group_size))
    if entries:
        if m > EXACT_FUSED_MAX_ROWS and mode == "exact":
            return {"kernel": "dequant_gemm", **entries.get("dequant", DEQUANT_DEFAULT), "source": "table"}
        tuned = sorted(int(r) for r in entries if r.isdigit())
        bucket = next((r for r in tuned if r >= m), tuned[-1])
        plan = dict(entries[str(bucket)])
        plan.pop("us", None)
        if plan["kernel"] == "dequant_gemm":
            plan.update({**DEQUANT_DEFAULT, **entries.get("dequant", {})})
        return {**plan, "source": "table"}
    return {**rule_plan(n, k, m, group_size, mode, sm_count or 132), "source": "rules"}


_DEVICE_INFO: dict = {}


def _device_info(device: torch.device) -> tuple[str, tuple[int, int], int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_INFO:
        props = torch.cuda.get_device_properties(idx)
        _DEVICE_INFO[idx] = (props.name, (props.major, props.minor), props.multi_processor_count)
    return _DEVICE_INFO[idx]


def plan_for(x: torch.Tensor, n: int, k: int, group_size: int, mode: str | None = None) -> dict:
    """``kernel_plan`` for an activation on a CUDA device."""
    name, cap, sms = _device_info(x.device)
    return kernel_plan(name, n, k, x.shape[0], group_size, mode or DEFAULT_MODE, capability=cap, sm_count=sms)


# ----------------------------------------------------------------------------- matmul

_SCRATCH: dict = {}


def scratch_bytes(n: int, k: int) -> int:
    """Bytes of the bf16 scratch the dequantize+GEMM path needs for one [N, K] weight (workspace that
    an engine budgets once for its largest linear; one layer at a time)."""
    return 2 * n * k


def _scratch(device: torch.device, n: int, k: int, workspace: torch.Tensor | None) -> torch.Tensor:
    if workspace is not None:
        flat = workspace.view(-1).view(torch.uint8)
        if flat.numel() < 2 * n * k:
            raise MorphError(f"INT4 workspace has {flat.numel()} bytes; the [{n}, {k}] weight needs {2 * n * k}")
        return flat[: 2 * n * k].view(torch.bfloat16).view(n, k)
    # one buffer per (device, stream), grown to the largest weight seen: kernels on one stream run in
    # order, so reusing it layer after layer is safe; two streams never share one
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < n * k:
        _SCRATCH[key] = buf = torch.empty(n * k, dtype=torch.bfloat16, device=device)
    return buf[: n * k].view(n, k)


def _run_plan(plan: dict, x, packed, scale_zero, *, n, k, group_size, input_scale_inv, bias, workspace):
    from morphlib.quant import kernels

    kind = plan["kernel"]
    if kind == "dequant_gemm":
        if input_scale_inv is not None and input_scale_inv.dtype != torch.bfloat16:
            input_scale_inv = input_scale_inv.to(torch.bfloat16)  # as the reference rounds it
        w = _scratch(x.device, n, k, workspace)
        kernels.dequantize_into(w, packed, scale_zero, n=n, k=k, group_size=group_size,
                                input_scale_inv=input_scale_inv, cfg=plan)
        return F.linear(x, w, None if bias is None else bias.to(torch.bfloat16))
    if x.stride(-1) != 1:
        x = x.contiguous()
    fn = {"gemv": kernels.gemv, "dot": kernels.dot}[kind]
    return fn(x, packed, scale_zero, n=n, k=k, group_size=group_size, cfg=plan,
              input_scale_inv=input_scale_inv, bias=bias)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int,
                group_size: int, layout: str, input_scale_inv: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, mode: str | None = None,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for a bf16 [M, K] activation and a packed INT4 [N, K] weight; returns bf16 [M, N].

    The layout's own kernel when it takes ``x`` (``LAYOUTS``), else the torch reference: dequantize,
    then ``F.linear``. Buffers may be views into memory the caller owns (a serving engine's arena).
    ``mode``: ``exact`` (default, ``DEFAULT_MODE``) or ``fast`` (module doc). ``workspace``: an optional
    caller-owned buffer of at least ``scratch_bytes(n, k)`` bytes for the dequantize+GEMM path (else a
    cached one)."""
    lay = layout_of(layout)
    if lay.matmul is not None and lay.runs(x):
        return lay.matmul(x, packed, scale_zero, n=n, k=k, group_size=group_size, input_scale_inv=input_scale_inv,
                          bias=bias, mode=mode, workspace=workspace)
    w = dequantize_packed(packed, scale_zero, n=n, k=k, group_size=group_size, layout=layout,
                          input_scale_inv=input_scale_inv)
    return F.linear(x, w, None if bias is None else bias.to(torch.bfloat16))


# ----------------------------------------------------------------------------- the layer


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored as packed INT4 (see module docstring).

    ``mode`` picks the CUDA kernels (``exact`` or ``fast``, module doc); None follows ``DEFAULT_MODE``.
    ``input_scale`` (AWQ-style, optional, shape [K]) is the per-input-channel scale s the weight was
    multiplied by before quantization; forward divides the activation by it, so
    ``y = Q(W diag(s)) (x / s)``. Keeping s here (instead of folding it into the previous norm)
    keeps every swap local to one linear and every restore exact.
    """

    def __init__(self, packed, scale_zero, *, in_features, out_features, group_size, layout,
                 bias=None, input_scale=None, mode: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.layout = group_size, layout
        self.mode = mode  # None: DEFAULT_MODE ("exact"); a serving engine may set "fast"
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
                        bias=self.bias, mode=self.mode)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        awq = ", awq" if self.input_scale_inv is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, layout={self.layout}{awq}")
