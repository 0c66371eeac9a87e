"""Paged attention over full-depth KV blocks addressed by a per-block base offset table.

The cache is the arena viewed as the model dtype (``kv``, flat). Token j of a sequence with block
table ``bt`` has, in layer l, its K row at ``block_base[bt[j // B]] + k_off(l) + (j % B) * kvd`` and its
V row at the same place with ``v_off(l)`` (``memory.Layout``): blocks may sit in the main pool or in
the freed tail of a swapped layer's region; the kernels never know which.

* ``decode``: one query token per sequence (the CUDA-graph path). Grid (sequence, KV head, split):
  all query heads of a GQA group share one K/V read; the context is split into ``splits`` parts
  (flash-decoding) merged by a second small kernel when the grid would otherwise be too small.
* ``varlen``: any number of query tokens per sequence, causal (prefill chunks and mixed steps).
  Grid (query tile, head).
* ``*_ref``: the plain-torch reference (gather, then ``scaled_dot_product_attention``), used on CPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttnMeta:
    """Per-step metadata (device tensors) plus host lists for the torch reference."""

    slot_off: torch.Tensor  # [T] int64: element offset of each token's K/V row in layer 0's K; -1 = no store
    ctx_len: torch.Tensor  # [S] int64: tokens in the cache after this step, per sequence
    block_tables: torch.Tensor  # [S, max_blocks] int64 block ids
    decode: bool  # every sequence has exactly one query token
    q_start: torch.Tensor | None = None  # [S] (varlen)
    q_len: torch.Tensor | None = None
    tile_seq: torch.Tensor | None = None  # [n_tiles] (varlen)
    tile_m0: torch.Tensor | None = None
    host: dict = field(default_factory=dict)  # q_start, q_len, ctx lists, tables (torch reference)
    cache: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- torch reference
def _gather_index(meta: AttnMeta, i: int, block_base: torch.Tensor, block_size: int, kvd: int) -> torch.Tensor:
    key = ("g", i)
    if key not in meta.cache:
        ctx = meta.host["ctx"][i]
        table = torch.as_tensor(meta.host["tables"][i], dtype=torch.int64)
        j = torch.arange(ctx, dtype=torch.int64)
        tok = block_base[table[j // block_size]] + (j % block_size) * kvd
        meta.cache[key] = tok[:, None] + torch.arange(kvd, dtype=torch.int64)[None, :]
    return meta.cache[key]


def attention_ref(q, kv, k_off, v_off, meta: AttnMeta, block_base, block_size, num_kv_heads, scale):
    """q [T, nh, hd] -> [T, nh * hd]."""
    t, nh, hd = q.shape
    kvd = num_kv_heads * hd
    out = torch.empty((t, nh, hd), dtype=q.dtype, device=q.device)
    for i, (qs, n, ctx) in enumerate(zip(meta.host["q_start"], meta.host["q_len"], meta.host["ctx"])):
        gi = _gather_index(meta, i, block_base, block_size, kvd)
        k = kv[gi + k_off].view(ctx, num_kv_heads, hd).transpose(0, 1)[None]
        v = kv[gi + v_off].view(ctx, num_kv_heads, hd).transpose(0, 1)[None]
        qq = q[qs:qs + n].transpose(0, 1)[None]
        if n == 1:
            o = F.scaled_dot_product_attention(qq, k, v, scale=scale, enable_gqa=True)
        elif n == ctx:
            o = F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            rows = torch.arange(n)[:, None] + (ctx - n)
            mask = torch.arange(ctx)[None, :] <= rows
            o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask.to(q.device), scale=scale, enable_gqa=True)
        out[qs:qs + n] = o[0].transpose(0, 1)
    return out.reshape(t, nh * hd)


# ----------------------------------------------------------------------------- Triton kernels
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(q_ptr, kv_ptr, base_ptr, bt_ptr, bt_stride, ctx_ptr, out_ptr, part_ptr, ml_ptr,
                      scale, k_off, v_off, NH, splits,
                      G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, KVD: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kh = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(ctx_ptr + b)
        per = tl.cdiv(tl.cdiv(ctx, splits), BLOCK_N) * BLOCK_N
        start = sp * per
        end = tl.minimum(ctx, start + per)
        g = tl.arange(0, GP)
        d = tl.arange(0, HD)
        n = tl.arange(0, BLOCK_N)
        hq = kh * G + g
        mq = g < G
        q = tl.load(q_ptr + b * NH * HD + hq[:, None] * HD + d[None, :], mask=mq[:, None], other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        for s0 in range(start, end, BLOCK_N):
            t = s0 + n
            valid = t < end
            blk = tl.load(bt_ptr + b * bt_stride + t // BS, mask=valid, other=0)
            row = tl.load(base_ptr + blk, mask=valid, other=0) + (t % BS) * KVD + kh * HD
            k = tl.load(kv_ptr + k_off + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(kv_ptr + v_off + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if not SPLIT:
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + b * NH * HD + hq[:, None] * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=mq[:, None])
        else:
            idx = (b * NH + hq) * splits + sp
            tl.store(part_ptr + idx[:, None] * HD + d[None, :], acc, mask=mq[:, None])
            tl.store(ml_ptr + idx * 2, m_i, mask=mq)
            tl.store(ml_ptr + idx * 2 + 1, l_i, mask=mq)

    @triton.jit
    def merge_kernel(part_ptr, ml_ptr, out_ptr, NH, splits, HD: tl.constexpr, MAXS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        sp = tl.arange(0, MAXS)
        ms = sp < splits
        d = tl.arange(0, HD)
        idx = (b * NH + h) * splits + sp
        m = tl.load(ml_ptr + idx * 2, mask=ms, other=float("-inf"))
        l = tl.load(ml_ptr + idx * 2 + 1, mask=ms, other=0.0)
        mx = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
        den = tl.sum(l * w, 0)
        acc = tl.load(part_ptr + idx[:, None] * HD + d[None, :], mask=ms[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
        tl.store(out_ptr + b * NH * HD + h * HD + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def varlen_kernel(q_ptr, kv_ptr, base_ptr, bt_ptr, bt_stride, qstart_ptr, qlen_ptr, ctx_ptr,
                      tile_seq_ptr, tile_m0_ptr, out_ptr, scale, k_off, v_off, NH,
                      G: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr, KVD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        kh = h // G
        seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
        m0 = tl.load(tile_m0_ptr + tile)
        qs = tl.load(qstart_ptr + seq)
        ql = tl.load(qlen_ptr + seq)
        ctx = tl.load(ctx_ptr + seq)
        r = m0 + tl.arange(0, BLOCK_M)
        rm = r < ql
        pos = ctx - ql + r
        d = tl.arange(0, HD)
        n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + (qs + r)[:, None] * NH * HD + h * HD + d[None, :], mask=rm[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        hi = tl.minimum(ctx, ctx - ql + m0 + BLOCK_M)
        for s0 in range(0, hi, BLOCK_N):
            t = s0 + n
            valid = t < hi
            blk = tl.load(bt_ptr + seq * bt_stride + t // BS, mask=valid, other=0)
            row = tl.load(base_ptr + blk, mask=valid, other=0) + (t % BS) * KVD + kh * HD
            k = tl.load(kv_ptr + k_off + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = tl.where((t[None, :] <= pos[:, None]) & valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(kv_ptr + v_off + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (qs + r)[:, None] * NH * HD + h * HD + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rm[:, None])

    return decode_kernel, merge_kernel, varlen_kernel


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


MAX_SPLITS = 16


def decode_splits(batch: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """Context splits so that the decode grid fills the GPU (1 when batch x KV heads already does)."""
    s = 1
    while batch * num_kv_heads * s * 2 <= num_sms and s < MAX_SPLITS:
        s *= 2
    return s


def attention_decode(q, kv, k_off, v_off, meta: AttnMeta, block_base, block_size, num_kv_heads, scale,
                     splits: int = 1, block_n: int = 64):
    """q [B, nh, hd] (one token per sequence) -> [B, nh * hd]."""
    dec, merge, _ = _kernels()
    b, nh, hd = q.shape
    g = nh // num_kv_heads
    out = torch.empty((b, nh, hd), dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    block_n = max(block_n, block_size)
    splits = max(1, min(int(splits), MAX_SPLITS))
    kw = dict(G=g, GP=max(16, _pow2(g)), HD=hd, BS=block_size, KVD=num_kv_heads * hd, BLOCK_N=block_n, PREC=prec,
              num_warps=4)
    bt = meta.block_tables
    if splits == 1:
        dec[(b, num_kv_heads, 1)](q, kv, block_base, bt, bt.stride(0), meta.ctx_len, out, out, out, scale, k_off,
                                  v_off, nh, 1, SPLIT=False, **kw)
    else:
        part = torch.empty((b, nh, splits, hd), dtype=torch.float32, device=q.device)
        ml = torch.empty((b, nh, splits, 2), dtype=torch.float32, device=q.device)
        dec[(b, num_kv_heads, splits)](q, kv, block_base, bt, bt.stride(0), meta.ctx_len, out, part, ml, scale,
                                       k_off, v_off, nh, splits, SPLIT=True, **kw)
        merge[(b, nh)](part, ml, out, nh, splits, HD=hd, MAXS=MAX_SPLITS, num_warps=1)
    return out.reshape(b, nh * hd)


def attention_varlen(q, kv, k_off, v_off, meta: AttnMeta, block_base, block_size, num_kv_heads, scale,
                     block_m: int = 16, block_n: int = 64):
    """q [T, nh, hd] (chunks of several sequences) -> [T, nh * hd], causal within each sequence."""
    _, _, var = _kernels()
    t, nh, hd = q.shape
    out = torch.empty((t, nh, hd), dtype=q.dtype, device=q.device)
    n_tiles = meta.tile_seq.shape[0]
    if n_tiles:
        var[(n_tiles, nh)](q, kv, block_base, meta.block_tables, meta.block_tables.stride(0), meta.q_start,
                           meta.q_len, meta.ctx_len, meta.tile_seq, meta.tile_m0, out, scale, k_off, v_off, nh,
                           G=nh // num_kv_heads, HD=hd, BS=block_size, KVD=num_kv_heads * hd, BLOCK_M=block_m,
                           BLOCK_N=max(block_n, block_size),
                           PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out.reshape(t, nh * hd)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
