"""Element-wise pieces of a Llama layer, each with a plain-torch reference (CPU, exact HF numerics) and a
fused Triton kernel (CUDA) that rounds like the torch ops it replaces:

* ``add_rmsnorm(x, residual, w)``: ``s = residual + x`` (rounded to the dtype), ``rmsnorm(s) * w``;
  returns (normed, s). One kernel instead of ~7.
* ``rope_store(q, k, v, ...)``: rotary embedding of q and k (``q*cos + rotate_half(q)*sin``, each
  product rounded like HF's bf16 ops) and the store of k, v into their KV-cache slots. One kernel.
* ``silu_mul(g, u)``: ``silu(g) * u``. One kernel.

Triton is imported only when a kernel is first used (CPU machines and CI have no Triton).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# ----------------------------------------------------------------------------- torch reference
def add_rmsnorm_ref(x, residual, weight, eps):
    if residual is not None:
        x = residual + x
    dt = x.dtype
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(dt), x


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_store_ref(q, k, v, positions, cos, sin, kv, slot_idx, k_off, v_off, num_heads, num_kv_heads):
    """q [T, nh*hd], k/v [T, kvd] (views allowed) -> roped q [T, nh, hd]; k roped and v written to the
    cache at element index ``slot_idx`` [T', kvd] (+k_off / +v_off) for the rows in ``slot_idx.rows``."""
    t = q.shape[0]
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    q = q.reshape(t, num_heads, -1)
    k = k.reshape(t, num_kv_heads, -1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    idx, rows = slot_idx
    if rows is None:
        kv[idx + k_off] = k.reshape(t, -1)
        kv[idx + v_off] = v.reshape(t, -1)
    else:
        kv[idx + k_off] = k.reshape(t, -1)[rows]
        kv[idx + v_off] = v.reshape(t, -1)[rows]
    return q


def silu_mul_ref(g, u):
    return F.silu(g) * u


# ----------------------------------------------------------------------------- Triton kernels
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_rmsnorm_kernel(x_ptr, x_stride, r_ptr, r_stride, w_ptr, out_ptr, rout_ptr, H, eps,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * x_stride + offs, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * r_stride + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(rout_ptr + row * H + offs, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / H
        y = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=m, other=0.0)
        y = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * H + offs, y, mask=m)

    @triton.jit
    def rope_store_kernel(q_ptr, q_stride, k_ptr, k_stride, v_ptr, v_stride, pos_ptr, cos_ptr, sin_ptr,
                          kv_ptr, slot_ptr, k_off, v_off, out_ptr,
                          NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                          NHP: tl.constexpr, NKVP: tl.constexpr, HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t)
        d = tl.arange(0, HALF)[None, :]
        c = tl.load(cos_ptr + pos * HD + d).to(tl.float32)  # cos/sin halves are equal (cat(freqs, freqs))
        s = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        # q: [NHP, HALF] halves
        h = tl.arange(0, NHP)[:, None]
        mq = h < NH
        x1 = tl.load(q_ptr + t * q_stride + h * HD + d, mask=mq, other=0.0).to(tl.float32)
        x2 = tl.load(q_ptr + t * q_stride + h * HD + HALF + d, mask=mq, other=0.0).to(tl.float32)
        o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + t * (NH * HD) + h * HD + d, o1, mask=mq)
        tl.store(out_ptr + t * (NH * HD) + h * HD + HALF + d, o2, mask=mq)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            g = tl.arange(0, NKVP)[:, None]
            mk = g < NKV
            y1 = tl.load(k_ptr + t * k_stride + g * HD + d, mask=mk, other=0.0).to(tl.float32)
            y2 = tl.load(k_ptr + t * k_stride + g * HD + HALF + d, mask=mk, other=0.0).to(tl.float32)
            p1 = ((y1 * c).to(dt).to(tl.float32) - (y2 * s).to(dt).to(tl.float32)).to(dt)
            p2 = ((y2 * c).to(dt).to(tl.float32) + (y1 * s).to(dt).to(tl.float32)).to(dt)
            base = kv_ptr + slot + g * HD + d
            tl.store(base + k_off, p1, mask=mk)
            tl.store(base + k_off + HALF, p2, mask=mk)
            v1 = tl.load(v_ptr + t * v_stride + g * HD + d, mask=mk, other=0.0)
            v2 = tl.load(v_ptr + t * v_stride + g * HD + HALF + d, mask=mk, other=0.0)
            tl.store(base + v_off, v1, mask=mk)
            tl.store(base + v_off + HALF, v2, mask=mk)

    @triton.jit
    def silu_mul_kernel(g_ptr, g_stride, u_ptr, u_stride, out_ptr, N, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + row * g_stride + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + offs, mask=m, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (a * u).to(dt), mask=m)

    return add_rmsnorm_kernel, rope_store_kernel, silu_mul_kernel


def add_rmsnorm_triton(x, residual, weight, eps):
    t, h = x.shape
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    rout = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t == 0:
        return out, rout
    k = _kernels()[0]
    r = residual if residual is not None else x
    k[(t,)](x, x.stride(0), r, r.stride(0), weight, out, rout, h, eps,
            HAS_RES=residual is not None, BLOCK=_pow2(h), num_warps=4 if h <= 4096 else 8)
    return out, rout


def rope_store_triton(q, k, v, positions, cos, sin, kv, slot_off, k_off, v_off, num_heads, num_kv_heads):
    t = q.shape[0]
    hd = cos.shape[-1]
    out = torch.empty((t, num_heads, hd), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    _kernels()[1][(t,)](q, q.stride(0), k, k.stride(0), v, v.stride(0), positions, cos, sin, kv, slot_off,
                        k_off, v_off, out, NH=num_heads, NKV=num_kv_heads, HD=hd, NHP=_pow2(num_heads),
                        NKVP=_pow2(num_kv_heads), HALF=hd // 2, num_warps=4)
    return out


def silu_mul_triton(g, u):
    t, n = g.shape
    out = torch.empty((t, n), dtype=g.dtype, device=g.device)
    if t == 0:
        return out
    block = min(1024, _pow2(n))
    _kernels()[2][(t, -(-n // block))](g, g.stride(0), u, u.stride(0), out, n, BLOCK=block, num_warps=4)
    return out
