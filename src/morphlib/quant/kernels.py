"""Triton kernels for INT4 weights in the ``triton`` layout (CUDA). Imported lazily by ``int4``.

Storage read by every kernel (layout ``triton``, one format, written once at quantization time):

* ``packed``: uint8 [N, K/2], row-major; in each block of 32 k's (16 bytes), byte j holds
  k = 32b + j in the low nibble and k = 32b + 16 + j in the high nibble (q in 0..15), so that the
  activations of a byte tile's low and high nibbles are contiguous runs (16-byte loads, no shuffles);
* ``scale_zero``: bf16 [K/g, N, 2] (scale, zero) per (group, output row); w = (q - 8) * scale + zero.

Kernels (``morphlib.quant.int4.kernel_plan`` chooses one per call, deterministically):

* ``dequantize_into``: the weight to bf16 in a caller-given [N, K] buffer, rounding exactly as the
  torch reference ``dequantize_packed`` does (fp32 math, bf16 after the multiply, after the add and
  after the AWQ input scale), so that ``F.linear`` on it is bit-identical to the old large-M path.
* ``gemv``: one row (decode). fp32 dequantize-multiply-accumulate on CUDA cores, GB groups per
  software-pipelined K-step (wide loads of the 4-bit weights); optional split-K (fp32 partials, then a
  fixed-order reduction: deterministic).
* ``dot``: a fused W4A16 tiled GEMM (``tl.dot``, bf16 operands, fp32 accumulate); the weight tile is
  dequantized in registers (two weights per instruction), one quantization group per K step;
  ``swap`` computes y^T = W x^T so that a small M is the MMA's N dimension (the weight tile is the
  register operand of wgmma); ``factor`` multiplies the exact q - 8 and applies scale and zero to each
  group's fp32 partial; optional split-K as above.

None of them uses atomics, so every kernel gives the same bits on the same inputs run to run.

Measured (NVIDIA H200, torch 2.11 + Triton 3.6, ``python -m morphlib bench --tune``, CUDA-graph
timing over weight copies > 3x L2; two device runs):

* run 1 (one group = 64 k per K-step, gemv without pipelining): decode 0.7-1.1 TB/s, ratios to bf16
  0.87-1.27 at 1-16 rows on Llama-2-7B shapes: latency-bound (a few hundred bytes per row in
  flight, not ALU: ~8 instructions per weight in SASS = ~30 % of issue rate).
* run 2 (GB groups per software-pipelined K-step, bf16x2 dequantize in the MMA kernels: ~5 SASS
  instructions per weight): decode 0.79-0.93 on Llama shapes (0.85-1.25 TB/s, still latency- and
  launch-bound: the split-K pass is a second kernel of ~2-3 us), mid M 1.07-2.35, large M
  (dequantize+cuBLAS, 3-3.5 TB/s for the dequantize) 1.13-1.55. tinygemm in the same run: 0.53-0.62
  at one row. Next levers: a single-launch split-K (or stream-K) for decode, a persistent grid, and
  a Hopper-specific fused GEMM (TMA + warp specialization) for 32-512 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels

# Layout ``triton`` (see int4.py): in every block of 32 k's (16 bytes of a row), byte j holds
# k = 32b + j in its low nibble and k = 32b + 16 + j in its high nibble. A [BN, G/2] byte tile of one
# group therefore splits into a "low" and a "high" [BN, G/2] weight tile whose activations are runs of
# 16 consecutive k's: x[g*G + c + 16*(c//16)] and 16 further, for byte column c.

@triton.jit
def _nibbles(p):
    """uint8 tile -> (low - 8, high - 8) as exact float32 without int->float conversions:
    (n | 0x4B000000) read as float32 is 2**23 + n, so subtracting 2**23 + 8 gives n - 8 exactly."""
    w = p.to(tl.int32)
    lo = ((w & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((w >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even: cvt.rn.bf16.f32), returned as fp32."""
    return x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)


@triton.jit
def _dequant_kernel(P, SZ, SINV, W, N, K, G: tl.constexpr, HAS_SINV: tl.constexpr,
                    BN: tl.constexpr, GPP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_c = tl.arange(0, G // 2)
    k_lo = offs_c + 16 * (offs_c // 16)  # k (within the group) of each byte's low nibble
    n_groups = K // G
    rows = offs_n.to(tl.int64)
    for i in tl.static_range(GPP):
        gi = pid_g * GPP + i
        mask_g = mask_n & (gi < n_groups)
        p = tl.load(P + rows[:, None] * (K // 2) + gi * (G // 2) + offs_c[None, :], mask=mask_g[:, None], other=0)
        s = tl.load(SZ + (gi * N + offs_n) * 2, mask=mask_g, other=0.0).to(tl.float32)
        z = tl.load(SZ + (gi * N + offs_n) * 2 + 1, mask=mask_g, other=0.0).to(tl.float32)
        lo, hi = _nibbles(p)
        # the reference's rounding sequence: bf16(bf16(bf16((q - 8) * s) + z) * s_inv)
        wlo = _round_bf16(_round_bf16(lo * s[:, None]) + z[:, None])
        whi = _round_bf16(_round_bf16(hi * s[:, None]) + z[:, None])
        if HAS_SINV:
            gok = (offs_c < G // 2) & (gi < n_groups)
            slo = tl.load(SINV + gi * G + k_lo, mask=gok, other=0.0).to(tl.float32)
            shi = tl.load(SINV + gi * G + k_lo + 16, mask=gok, other=0.0).to(tl.float32)
            wlo = _round_bf16(wlo * slo[None, :])
            whi = _round_bf16(whi * shi[None, :])
        out = W + rows[:, None] * K + gi * G + k_lo[None, :]
        tl.store(out, wlo.to(tl.bfloat16), mask=mask_g[:, None])
        tl.store(out + 16, whi.to(tl.bfloat16), mask=mask_g[:, None])


@triton.jit
def _load_step(P, SZ, rows, offs_n, mask_n, g0, t, groups_per_split, n_groups, N, K,
               G: tl.constexpr, GB: tl.constexpr):
    """One K-step of GB groups: the [BN, GB*G/2] byte tile (one wide load per row) and the
    [BN, GB] scales and zeros; groups past the split or past K read as zero weights."""
    CB: tl.constexpr = GB * G // 2
    offs_c = tl.arange(0, CB)
    offs_g = tl.arange(0, GB)
    gvalid = (t + offs_g < groups_per_split) & (g0 + offs_g < n_groups)
    cvalid = (t + offs_c // (G // 2) < groups_per_split) & (g0 + offs_c // (G // 2) < n_groups)
    p = tl.load(P + rows[:, None] * (K // 2) + g0 * (G // 2) + offs_c[None, :],
                mask=mask_n[:, None] & cvalid[None, :], other=0)
    sz = SZ + ((g0 + offs_g)[None, :] * N + offs_n[:, None]) * 2
    mg = mask_n[:, None] & gvalid[None, :]
    s = tl.load(sz, mask=mg, other=0.0)
    z = tl.load(sz + 1, mask=mg, other=0.0)
    return p, s, z, cvalid


@triton.jit
def _scale_groups(q, s, z, BN: tl.constexpr, G: tl.constexpr, GB: tl.constexpr):
    """q [BN, GB*G/2] (one tile per nibble half) -> q * s + z with each group's own scale and zero."""
    if GB == 1:
        return q * s + z
    else:
        q3 = tl.reshape(q, (BN, GB, G // 2))
        return tl.reshape(q3 * s[:, :, None] + z[:, :, None], (BN, GB * G // 2))


@triton.jit(do_not_specialize=["M", "groups_per_split"])
def _gemv_kernel(X, P, SZ, SINV, BIAS, Y, WS, M, N, K, stride_xm, groups_per_split,
                 G: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr, NS: tl.constexpr,
                 HAS_SINV: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr):
    """One activation row (M == 1): fp32 dequantize-multiply-accumulate on CUDA cores, GB groups
    per software-pipelined K-step (NS stages)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    CB: tl.constexpr = GB * G // 2
    offs_c = tl.arange(0, CB)
    k_lo = offs_c + 16 * (offs_c // 16)
    n_groups = K // G
    g_start = pid_s * groups_per_split
    rows = offs_n.to(tl.int64)
    acc = tl.zeros([BN, CB], dtype=tl.float32)
    for t in tl.range(0, groups_per_split, GB, num_stages=NS):
        g0 = g_start + t
        p, s, z, cvalid = _load_step(P, SZ, rows, offs_n, mask_n, g0, t, groups_per_split, n_groups, N, K, G, GB)
        kk = g0 * G + k_lo
        xlo = tl.load(X + kk, mask=cvalid, other=0.0).to(tl.float32)
        xhi = tl.load(X + kk + 16, mask=cvalid, other=0.0).to(tl.float32)
        if HAS_SINV:
            xlo = xlo * tl.load(SINV + kk, mask=cvalid, other=0.0).to(tl.float32)
            xhi = xhi * tl.load(SINV + kk + 16, mask=cvalid, other=0.0).to(tl.float32)
        lo, hi = _nibbles(p)
        sf = s.to(tl.float32)
        zf = z.to(tl.float32)
        wlo = _scale_groups(lo, sf, zf, BN, G, GB)
        whi = _scale_groups(hi, sf, zf, BN, G, GB)
        acc = acc + xlo[None, :] * wlo  # two separate FMAs per weight pair
        acc = acc + xhi[None, :] * whi
    y = tl.reshape(tl.sum(acc, axis=1), (1, BN))
    offs_m = tl.arange(0, 1)
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if USE_WS:
        tl.store(WS + (pid_s * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=mask)
    else:
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * N + offs_n[None, :], y.to(tl.bfloat16), mask=mask)


@triton.jit
def _nibbles_bf16(p):
    """uint8 tile -> (low - 8, high - 8) as exact bf16, two weights per instruction: (n | 0x4300)
    read as bf16 is 128 + n, and 128 + n - 136 = n - 8 is exact (HADD2.BF16 on Hopper)."""
    w = p.to(tl.int16)
    lo = ((w & 15) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    hi = ((w >> 4) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    return lo, hi


@triton.jit(do_not_specialize=["M", "groups_per_split"])
def _dot_kernel(X, P, SZ, SINV, BIAS, Y, WS, M, N, K, stride_xm, groups_per_split,
                G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr, SWAP: tl.constexpr,
                FACTOR: tl.constexpr, HAS_SINV: tl.constexpr, HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr):
    """K-steps of GB groups. FACTOR=False: w = bf16(bf16((q - 8) * s) + z) in the tile, acc += x w^T
    (bf16 MMA, fp32 acc). FACTOR=True (GB == 1): the MMA multiplies the exact integers q - 8 and each
    group's fp32 partial is scaled after it: acc += s * (x (q - 8)^T) + z * sum(x)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    CB: tl.constexpr = GB * G // 2
    offs_c = tl.arange(0, CB)
    k_lo = offs_c + 16 * (offs_c // 16)
    n_groups = K // G
    g_start = pid_s * groups_per_split
    rows = offs_n.to(tl.int64)
    xrows = offs_m.to(tl.int64)
    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(0, groups_per_split, GB):
        g0 = g_start + t
        p, s, z, cvalid = _load_step(P, SZ, rows, offs_n, mask_n, g0, t, groups_per_split, n_groups, N, K, G, GB)
        xp = X + xrows[:, None] * stride_xm + g0 * G + k_lo[None, :]
        xmask = mask_m[:, None] & cvalid[None, :]
        xlo = tl.load(xp, mask=xmask, other=0.0)
        xhi = tl.load(xp + 16, mask=xmask, other=0.0)
        if HAS_SINV:
            kk = g0 * G + k_lo
            xlo = (xlo.to(tl.float32) * tl.load(SINV + kk, mask=cvalid, other=0.0).to(tl.float32)[None, :]).to(tl.bfloat16)
            xhi = (xhi.to(tl.float32) * tl.load(SINV + kk + 16, mask=cvalid, other=0.0).to(tl.float32)[None, :]).to(tl.bfloat16)
        qlo, qhi = _nibbles_bf16(p)
        if FACTOR:
            xs = tl.sum(xlo.to(tl.float32), axis=1) + tl.sum(xhi.to(tl.float32), axis=1)  # [BM]
            sf = tl.reshape(s.to(tl.float32), (BN,))
            zf = tl.reshape(z.to(tl.float32), (BN,))
            if SWAP:
                part = tl.dot(qlo, tl.trans(xlo))
                part = tl.dot(qhi, tl.trans(xhi), part)
                acc += part * sf[:, None] + zf[:, None] * xs[None, :]
            else:
                part = tl.dot(xlo, tl.trans(qlo))
                part = tl.dot(xhi, tl.trans(qhi), part)
                acc += part * sf[None, :] + xs[:, None] * zf[None, :]
        else:
            wlo = _scale_groups(qlo, s, z, BN, G, GB)
            whi = _scale_groups(qhi, s, z, BN, G, GB)
            if SWAP:
                acc = tl.dot(wlo, tl.trans(xlo), acc)
                acc = tl.dot(whi, tl.trans(xhi), acc)
            else:
                acc = tl.dot(xlo, tl.trans(wlo), acc)
                acc = tl.dot(xhi, tl.trans(whi), acc)
    if SWAP:
        y = tl.trans(acc)
    else:
        y = acc
    mask = mask_m[:, None] & mask_n[None, :]
    if USE_WS:
        tl.store(WS + (pid_s * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :], y, mask=mask)
    else:
        if HAS_BIAS:
            y += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(tl.bfloat16), mask=mask)


@triton.jit(do_not_specialize=["MN", "split"])
def _splitk_reduce_kernel(WS, BIAS, Y, MN, N, split, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(WS + offs, mask=mask, other=0.0)
    for s in range(1, split):  # fixed order: deterministic
        acc += tl.load(WS + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(tl.bfloat16), mask=mask)


# ----------------------------------------------------------------------------- launchers

_DUMMY: dict = {}


def _dummy(device) -> torch.Tensor:
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(8, dtype=torch.bfloat16, device=device)
    return _DUMMY[key]


def dequantize_into(out: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int,
                    group_size: int, input_scale_inv: torch.Tensor | None = None,
                    cfg: dict | None = None) -> torch.Tensor:
    """Write the bf16 [N, K] weight of ``triton``-layout INT4 buffers into ``out`` (bit-identical to
    ``int4.dequantize_packed(..., dtype=torch.bfloat16)``). Returns ``out``."""
    cfg = cfg or {}
    bn, gpp = cfg.get("dq_bn", 32), cfg.get("dq_gpp", 2)
    grid = (triton.cdiv(n, bn), triton.cdiv(k // group_size, gpp))
    sinv = input_scale_inv if input_scale_inv is not None else _dummy(out.device)
    _dequant_kernel[grid](packed, scale_zero, sinv, out, n, k, G=group_size,
                          HAS_SINV=input_scale_inv is not None, BN=bn, GPP=gpp,
                          num_warps=cfg.get("dq_warps", 4))
    return out


def _split_groups(k: int, group_size: int, split: int) -> tuple[int, int]:
    """(splits, groups per split): splits of whole groups (the last one may be shorter; kernels mask
    the groups past K)."""
    n_groups = k // group_size
    per = triton.cdiv(n_groups, max(1, min(split, n_groups)))
    return triton.cdiv(n_groups, per), per


def _finish(ws, bias, y, m, n, split):
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias if bias is not None else _dummy(y.device), y, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)


def gemv(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int, group_size: int,
         cfg: dict, input_scale_inv=None, bias=None) -> torch.Tensor:
    """y = x W^T for one row (CUDA-core kernel; see module doc). More rows: ``dot``."""
    m = x.shape[0]
    if m != 1:
        return dot(x, packed, scale_zero, n=n, k=k, group_size=group_size, cfg={"BM": 16, "BN": 64, "swap": 1},
                   input_scale_inv=input_scale_inv, bias=bias)
    bn = cfg["BN"]
    split, per = _split_groups(k, group_size, cfg.get("split", 1))
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    d = _dummy(x.device)
    _gemv_kernel[(triton.cdiv(n, bn), split)](
        x, packed, scale_zero, d if input_scale_inv is None else input_scale_inv,
        d if bias is None else bias, y, ws, m, n, k, x.stride(0), per,
        G=group_size, BN=bn, GB=cfg.get("GB", 4), NS=cfg.get("stages", 3), HAS_SINV=input_scale_inv is not None,
        HAS_BIAS=bias is not None, USE_WS=split > 1, num_warps=cfg.get("warps", 4))
    if split > 1:
        _finish(ws, bias, y, m, n, split)
    return y


def dot(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, *, n: int, k: int, group_size: int,
        cfg: dict, input_scale_inv=None, bias=None) -> torch.Tensor:
    """y = x W^T with the fused W4A16 tiled GEMM (see module doc)."""
    m = x.shape[0]
    bm, bn = cfg["BM"], cfg["BN"]
    split, per = _split_groups(k, group_size, cfg.get("split", 1))
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    d = _dummy(x.device)
    _dot_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
        x, packed, scale_zero, d if input_scale_inv is None else input_scale_inv,
        d if bias is None else bias, y, ws, m, n, k, x.stride(0), per,
        G=group_size, BM=bm, BN=bn, GB=1 if cfg.get("factor", 0) else cfg.get("GB", 1),
        SWAP=bool(cfg.get("swap", 0)), FACTOR=bool(cfg.get("factor", 0)),
        HAS_SINV=input_scale_inv is not None,
        HAS_BIAS=bias is not None, USE_WS=split > 1, num_warps=cfg.get("warps", 4),
        num_stages=cfg.get("stages", 3))
    if split > 1:
        _finish(ws, bias, y, m, n, split)
    return y
