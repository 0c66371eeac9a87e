"""Triton INT4 kernels: exactness of the dequantize path, tolerance of the fused kernels, determinism.

* ``gpu`` tests run on a CUDA machine with Triton (skipped elsewhere, e.g. in CI).
* ``interpreter`` tests run the same kernels on CPU tensors through Triton's interpreter
  (``TRITON_INTERPRET=1``) when Triton is installed and no GPU is present (skipped in CI, which has
  no Triton). They check the arithmetic, not the speed.

Tolerance of every fused kernel (gemv, dot, split-K or not) against the reference (bf16 activation,
fp32 dequantized weight, float64 matmul): relative Frobenius error <= 1e-2; the dequantize+GEMM
path is bit-identical (``torch.equal``) to ``F.linear(x, dequantize_packed(...))``.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from morphlib.quant import int4
from morphlib.quant.int4 import Int4Linear, dequantize_packed, pack, quantize_groupwise

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
TOL = 1e-2


def _buffers(n, k, g, device, seed, symmetric=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    q, s, z = quantize_groupwise(w, g, symmetric)
    sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
    sinv = (1.0 / (torch.rand(k, generator=gen) + 0.5)).to(torch.bfloat16)
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    return q.to(device), sz.to(device), sinv.to(device), bias.to(device)


def _rel(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output (an element left unwritten?)"
    return float((out.double() - ref).norm() / ref.norm())


def _poison(numel, device):
    """Leave NaN in the allocator's free block of this size, so an unwritten output element shows."""
    t = torch.empty(numel, dtype=torch.float32, device=device).fill_(float("nan"))
    del t


# ----------------------------------------------------------------------------- interpreter (CPU)

# The interpreter must be switched on before Triton is first imported, so these tests run in a child
# pytest process started by test_triton_interpreter_suite with TRITON_INTERPRET=1.
INTERP_CHILD = os.environ.get("TRITON_INTERPRET") == "1" and HAVE_TRITON and not CUDA
interp = pytest.mark.skipif(not INTERP_CHILD, reason="runs inside test_triton_interpreter_suite's child process")


def _interpreter_shims():
    """Triton 3.6's interpreter vs numpy >= 2.4 and bf16 (test-side shims, not library code): loop
    bounds arrive as 1-element arrays; bf16 dots would multiply raw uint16 bits; fp32 -> bf16 casts
    truncate instead of rounding to nearest-even as the GPU does."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti

    orig_patch = ti._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    orig_dot = ti.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(h):
            if h.dtype.scalar == tl.bfloat16:
                return ti.TensorHandle(ti._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                       tl.float32)
            return h
        return orig_dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    orig_cf = ti._convert_float

    def convert_float(data, src, dst, rounding):
        if src == tl.float32 and dst == tl.bfloat16:
            b = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
            return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        return orig_cf(data, src, dst, rounding)

    def to_f32(h):
        return orig_cf(h.data, tl.bfloat16, tl.float32, None).view(np.float32)

    def bf16_arith(name, fn):
        orig = getattr(ti.InterpreterBuilder, name)

        def op(self, lhs, rhs):
            if lhs.dtype.scalar == tl.bfloat16:  # stored as uint16: compute in fp32, round to nearest-even
                out = fn(to_f32(lhs), to_f32(rhs)).astype(np.float32)
                return ti.TensorHandle(convert_float(out, tl.float32, tl.bfloat16, None), tl.bfloat16)
            return orig(self, lhs, rhs)
        setattr(ti.InterpreterBuilder, name, op)

    def get_bf16(self, value):
        return ti.TensorHandle(convert_float(np.array([value], dtype=np.float32), tl.float32, tl.bfloat16, None),
                               tl.bfloat16)

    ti.InterpreterBuilder.get_bf16 = get_bf16
    ti._patch_lang_tensor = patch_tensor
    ti.InterpreterBuilder.create_dot = dot
    ti._convert_float = convert_float
    for name, fn in (("create_fadd", np.add), ("create_fsub", np.subtract), ("create_fmul", np.multiply)):
        bf16_arith(name, fn)


if INTERP_CHILD:
    _interpreter_shims()


@pytest.mark.skipif(not HAVE_TRITON or CUDA or INTERP_CHILD, reason="needs Triton installed on a machine without a GPU")
def test_triton_interpreter_suite():
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interp_"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.fixture(scope="module")
def interp_kernels():
    from morphlib.quant import kernels

    return kernels


@interp
@pytest.mark.parametrize("n,k,g", [(96, 256, 64), (40, 128, 32), (48, 512, 128), (24, 512, 256)])
def test_interp_dequantize_is_bit_exact(interp_kernels, n, k, g):
    q, sz, sinv, _ = _buffers(n, k, g, "cpu", seed=n + k)
    packed = pack(q, "triton")
    for s in (None, sinv):
        ref = dequantize_packed(packed, sz, n=n, k=k, group_size=g, layout="triton", input_scale_inv=s)
        out = torch.full((n, k), float("nan"), dtype=torch.bfloat16)
        interp_kernels.dequantize_into(out, packed, sz, n=n, k=k, group_size=g, input_scale_inv=s,
                                       cfg={"dq_bn": 32, "dq_gpp": 3})
        assert torch.equal(out, ref)


@interp
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_interp_fused_kernels_within_tolerance(interp_kernels, m):
    n, k, g = 72, 384, 64
    q, sz, sinv, bias = _buffers(n, k, g, "cpu", seed=m)
    packed = pack(q, "triton")
    w = dequantize_packed(packed, sz, n=n, k=k, group_size=g, layout="triton", input_scale_inv=sinv,
                          dtype=torch.float32)
    x = torch.randn(m, k).to(torch.bfloat16)
    ref = x.double() @ w.double().t() + bias.double()
    for fn, cfg in [(interp_kernels.gemv, {"BN": 16}), (interp_kernels.gemv, {"BN": 32, "split": 3, "GB": 2}),
                    (interp_kernels.gemv, {"BN": 8, "split": 2, "GB": 4}),
                    (interp_kernels.dot, {"BM": 16, "BN": 32, "swap": 0}),
                    (interp_kernels.dot, {"BM": 16, "BN": 16, "swap": 1, "split": 2, "GB": 2}),
                    (interp_kernels.dot, {"BM": 16, "BN": 32, "swap": 0, "GB": 4, "split": 2}),
                    (interp_kernels.dot, {"BM": 16, "BN": 32, "swap": 1, "factor": 1}),
                    (interp_kernels.dot, {"BM": 16, "BN": 16, "swap": 0, "factor": 1, "split": 3})]:
        y = fn(x, packed, sz, n=n, k=k, group_size=g, cfg=cfg, input_scale_inv=sinv, bias=bias)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert _rel(y, ref) <= TOL, (fn.__name__, cfg)


# ----------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,g", [(4096, 4096, 64), (11008, 4096, 128), (576, 1536, 64), (200, 320, 32),
                                   (256, 2048, 256)])
def test_dequantize_kernel_is_bit_exact(n, k, g):
    from morphlib.bench import kernels as bench
    from morphlib.quant import kernels

    q, sz, sinv, _ = _buffers(n, k, g, "cuda", seed=n)
    packed = pack(q, "triton")
    for s in (None, sinv):
        ref = dequantize_packed(packed, sz, n=n, k=k, group_size=g, layout="triton", input_scale_inv=s)
        for cfg in bench.DEQUANT_CANDIDATES:
            out = torch.full((n, k), float("nan"), dtype=torch.bfloat16, device="cuda")
            kernels.dequantize_into(out, packed, sz, n=n, k=k, group_size=g, input_scale_inv=s, cfg=cfg)
            assert torch.equal(out, ref), cfg


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(17, 4096), (512, 4096), (8, 512, 576)])
def test_exact_mode_is_bit_identical_to_the_old_large_batch_path(shape):
    """The chapters' path: y = F.linear(x, W_bf16) with W dequantized by torch ops (what main ran above 16
    rows, then from the tinygemm layout: unpacking is exact, so the layout does not matter). The triton
    layout + Triton dequantize + cuBLAS gives the same bits."""
    k = shape[-1]
    n = 1536 if k == 576 else 11008
    torch.manual_seed(sum(shape))
    weight = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
    s = torch.rand(k, device="cuda") + 0.5
    for input_scale in (None, s):
        lin = Int4Linear.from_weight(weight, group_size=64, bias=bias, input_scale=input_scale)
        assert lin.layout == "triton"
        x = torch.randn(*shape, device="cuda").to(torch.bfloat16)
        old_w = dequantize_packed(lin.packed, lin.scale_zero, n=n, k=k, group_size=64, layout="triton",
                                  input_scale_inv=lin.input_scale_inv)
        old = F.linear(x.reshape(-1, k), old_w, bias).reshape(*shape[:-1], n)
        assert torch.equal(lin(x), old)
        lin.mode = "exact"
        assert torch.equal(lin(x), old)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(576, 1536), (4096, 4096)])
def test_tinygemm_yardstick_computes_the_same_linear(n, k):
    """The kernels bench's tinygemm column times a correct INT4 matmul: its packing hands aten's kernel the
    weight the library's own layouts hold."""
    from morphlib.bench.kernels import pack_tinygemm

    q, sz, _, _ = _buffers(n, k, 64, "cuda", seed=n)
    w = dequantize_packed(pack(q, "triton"), sz, n=n, k=k, group_size=64, layout="triton", dtype=torch.float32)
    packed = pack_tinygemm(q)
    for m in (1, 16):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x, packed, 64, sz)
        assert _rel(y, x.double() @ w.double().t()) <= TOL, m


TOL_SHAPES = [(200, 640, 64), (576, 576, 64), (4096, 4096, 128), (256, 2048, 32)]
TOL_ROWS = (1, 2, 3, 8, 16, 33, 64, 200, 256, 512)


def _tolerance_configs(m, n, k, g):
    """Every tuner candidate at g64; a representative few at other group sizes (compile time)."""
    from morphlib.bench import kernels as bench

    if g == 64:
        return bench.candidates(m, n, k, g)
    few = [bench._gemv(16), bench._gemv(32, 4, 8, 8), bench._dot(16, 64, 1, 2, gb=2), bench._dot(16, 32, 0, gb=4),
           bench._dot(64, 128, 0, gb=2), bench._dot(128, 128, 0, warps=8, gb=2), {"kernel": "dequant_gemm"}]
    return [c for c in few if c["kernel"] != "gemv" or m == 1]


def variant_keys():
    """Kernel variants these tests launch (the device script precompiles them in parallel)."""
    from morphlib.bench import kernels as bench

    keys = []
    for n, k, g in TOL_SHAPES:
        for m in TOL_ROWS:
            for c in _tolerance_configs(m, n, k, g):
                plan = {**int4.DEQUANT_DEFAULT, **c}
                keys.append(bench.variant_key(plan, m, k, g, sinv=True, bias=True))
    for g in (64, 128, 256, 32):
        keys += [bench.variant_key({"kernel": "dequant_gemm", **d}, 0, 8 * g, g, sinv) for d in bench.DEQUANT_CANDIDATES
                 for sinv in (False, True)]
    return sorted(set(keys))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,g", TOL_SHAPES)
def test_fused_kernels_are_within_tolerance_and_deterministic(n, k, g):
    q, sz, sinv, bias = _buffers(n, k, g, "cuda", seed=k)
    packed = pack(q, "triton")
    w = dequantize_packed(packed, sz, n=n, k=k, group_size=g, layout="triton", input_scale_inv=sinv,
                          dtype=torch.float32)
    ws = torch.empty(int4.scratch_bytes(n, k), dtype=torch.uint8, device="cuda")
    worst = 0.0
    for m in TOL_ROWS:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)  # fresh inputs for every M
        ref = x.double() @ w.double().t() + bias.double()
        for cfg in _tolerance_configs(m, n, k, g):
            plan = {**int4.DEQUANT_DEFAULT, **cfg}
            _poison(8 * m * n + 4096, "cuda")
            y = int4._run_plan(plan, x, packed, sz, n=n, k=k, group_size=g, input_scale_inv=sinv, bias=bias,
                               workspace=ws)
            rel = _rel(y, ref)
            worst = max(worst, rel)
            assert rel <= TOL, (m, cfg, rel)
            y2 = int4._run_plan(plan, x, packed, sz, n=n, k=k, group_size=g, input_scale_inv=sinv, bias=bias,
                                workspace=ws)
            assert torch.equal(y, y2), ("not deterministic", m, cfg)
    print(f"{n}x{k} g{g}: worst relative error {worst:.2e}")


@gpu
@pytest.mark.gpu
def test_table_plans_run_and_dispatch_is_deterministic():
    """Every kernel the shipped table (or the rules) picks on this card runs and is within tolerance;
    the same call always gets the same plan."""
    from morphlib.bench import kernels as bench

    name = torch.cuda.get_device_name()
    for s in bench.model_shapes(("llama-2-7b", "smollm2-135m"), 64, fused=True):  # the engine's fused matrices too
        n, k = s["n"], s["k"]
        q, sz, _, _ = _buffers(n, k, 64, "cuda", seed=n + k)
        packed = pack(q, "triton")
        w = dequantize_packed(packed, sz, n=n, k=k, group_size=64, layout="triton", dtype=torch.float32)
        for m in (1, 4, 8, 64, 512):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            plans = {str(int4.plan_for(x, n, k, 64, mode)) for mode in ("fast",) for _ in range(3)}
            assert len(plans) == 1
            assert int4.plan_for(x, n, k, 64, "fast") == int4.kernel_plan(
                name, n, k, m, 64, "fast", capability=torch.cuda.get_device_capability(),
                sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
            for mode in ("fast", "exact"):
                y = int4.int4_matmul(x, packed, sz, n=n, k=k, group_size=64, layout="triton", mode=mode)
                assert _rel(y, x.double() @ w.double().t()) <= TOL, (n, k, m, mode)


@gpu
@pytest.mark.gpu
def test_buffers_may_be_views_into_an_arena():
    n, k, g = 1536, 576, 64
    q, sz, sinv, bias = _buffers(n, k, g, "cuda", seed=3)
    specs = int4.packed_specs(n, k, g, "triton")
    arena = torch.empty(1 << 22, dtype=torch.uint8, device="cuda")
    views, off = {}, 4096 + 16
    for name, (shape, dtype) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        views[name] = arena[off:off + nbytes].view(dtype).view(shape)
        off += nbytes
    assert off - 4096 - 16 == int4.int4_nbytes(n, k, g)
    views["packed"].copy_(pack(q, "triton"))
    views["scale_zero"].copy_(sz)
    owned = pack(q, "triton")
    for m in (1, 8, 100, 600):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        for mode in ("fast", "exact"):
            a = int4.int4_matmul(x, views["packed"], views["scale_zero"], n=n, k=k, group_size=g, layout="triton",
                                 input_scale_inv=sinv, bias=bias, mode=mode)
            b = int4.int4_matmul(x, owned, sz, n=n, k=k, group_size=g, layout="triton", input_scale_inv=sinv,
                                 bias=bias, mode=mode)
            assert torch.equal(a, b)
