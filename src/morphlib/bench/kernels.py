"""INT4 linear vs bf16 ``F.linear``: timing, tuning table, headline against the issue-10 targets.

``run_bench(...) -> dict`` times, per weight shape and row count M, bf16 ``F.linear`` and the INT4
kernel that ``int4.kernel_plan`` chooses, in one run, plus three reference columns: the exact-mode path
(bit-exact dequantize + cuBLAS, what the chapters run above 16 rows), tinygemm
(``aten._weight_int4pack_mm`` on a copy of the weight in its own layout, made for the bench only) and,
on the Llama-2-7B shapes, GemLite (``bench.gemlite``: the same q, scale and zero in its HQQ format, its
shipped H100 configs; "not installed" when it is absent). Headline: the worst INT4/bf16 time ratio per
row band against issue #19's targets, and the worst of ours over GemLite's and over tinygemm's time.
At one row it reports the INT4 kernel's achieved memory bandwidth against a device-to-device copy
measured in the same run. ``run_tune(...)`` measures the candidate kernels per (shape, M) and returns
the tuning-table entries that ``kernel_plan`` reads (``python -m morphlib bench --tune``).

Timing (CUDA): each measured call is captured ``R`` times into a CUDA graph, each on its own copy of
the weight, with ``R`` chosen so that the copies together exceed 3x the L2 cache (weights are read
from HBM, as in a real forward pass where other layers evict them); the graph is replayed several
times between CUDA events and the median replay time / R is reported. Weights are random normal
(never zeros). On CPU: the median of repeated wall-clock runs, clearly labelled "CPU".
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from morphlib.bench import gemlite
from morphlib.bench.timing import copy_bandwidth_gbps, time_cpu, time_cuda
from morphlib.device import resolve_device
from morphlib.engine.memory import FUSED, stacked_shape
from morphlib.errors import MorphError
from morphlib.quant import int4
from morphlib.shapes import SHAPES, int4_nbytes, linear_shapes

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MODELS = ("llama-2-7b", "tinyllama-1.1b", "smollm2-135m")
HEADLINE_MODEL = "llama-2-7b"
# issue 19: INT4 time / bf16 time, worst over the Llama-2-7B shapes (one row: all but 4096x4096, which has its own)
TARGETS = {
    "worst_time_ratio_rows_1": ((1, 1), 0.40),
    "worst_time_ratio_rows_1_4096x4096": ((1, 1), 0.50),
    "worst_time_ratio_rows_le_16": ((1, 16), 0.50),
    "worst_time_ratio_rows_16_256": ((16, 256), 1.0),
    "worst_time_ratio_rows_512_2048": ((512, 2048), 1.10),
}
# ours / a yardstick's time, worst over the Llama-2-7B (shape, rows): never above GemLite's by more than 10 %
# (issue 19); the same bound for tinygemm (issue 19 names it as a yardstick without a bound of its own)
YARDSTICKS = {"worst_ratio_vs_gemlite": ("gemlite_ms", 1.10), "worst_ratio_vs_tinygemm": ("tinygemm_ms", 1.10)}
MAX_COPIES = 64
# Seconds on an H200 (the committed run: 11 shapes x 12 row counts in 19 s), for the plan printed first;
# GemLite: its compile in the precompile workers, loading and timing per (shape, rows) -- an estimate
PLAN_S = {"fixed": 8.0, "per_row": 0.085, "gemlite_fixed": 6.0, "gemlite_per_row": 0.2}


# ----------------------------------------------------------------------------- shapes


def model_shapes(models=MODELS, group_size: int = 64, fused: bool = False) -> list[dict]:
    """Distinct (N, K) linear shapes of the given model configs, with the projections that have them;
    ``fused``: also the serving engine's fused INT4 matrices ``qkv`` and ``gate_up`` (what it launches)."""
    out = []
    for model in models:
        by_shape: dict[tuple[int, int], list[str]] = {}
        shapes = linear_shapes(SHAPES[model])
        if fused:
            shapes = {**shapes, **{m: stacked_shape(shapes, FUSED[m]) for m in ("qkv", "gate_up")}}
        for name, (n, k) in shapes.items():
            by_shape.setdefault((n, k), []).append(name)
        for (n, k), names in by_shape.items():
            if k % group_size == 0:
                out.append({"model": model, "n": n, "k": k, "linears": names})
    return out


# ----------------------------------------------------------------------------- tinygemm (a yardstick)


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def pack_tinygemm(q: torch.Tensor) -> torch.Tensor:
    """q (uint8 [N, K], 0..15) in the tensor-core tile layout of ``aten._convert_weight_to_int4pack``
    (CUDA, sm80+), which ``aten._weight_int4pack_mm`` runs: the bench's reference column, not a
    storage layout of the library."""
    hi_lo = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(hi_lo, _inner_k_tiles(q.shape[1]))


# ----------------------------------------------------------------------------- problems


class Problem:
    """One [N, K] weight on the device: bf16 copies, INT4 (``triton`` layout) copies, tinygemm copies."""

    def __init__(self, n: int, k: int, group_size: int, device, l2_bytes: int, tinygemm: bool = True,
                 seed: int = 0, gemlite_module=None):
        self.n, self.k, self.g, self.device = n, k, group_size, device
        gen = torch.Generator(device=device).manual_seed(seed)
        w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        q, scale, zero = int4.quantize_groupwise(w, group_size)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

        def copies(nbytes):
            return max(1, min(MAX_COPIES, math.ceil(3 * l2_bytes / nbytes)))

        self.w = [w] + [w.clone() for _ in range(copies(2 * n * k) - 1)]
        packed = int4.pack(q, "triton")
        r = copies(int4_nbytes(n, k, group_size))
        self.p = [packed] + [packed.clone() for _ in range(r - 1)]
        self.sz = [sz] + [sz.clone() for _ in range(r - 1)]
        self.tg = None
        if tinygemm:
            tg = pack_tinygemm(q)
            self.tg = [tg] + [tg.clone() for _ in range(r - 1)]
        self.gl, self.gl_args, self.gl_error = gemlite_module, [], None
        if gemlite_module is not None:
            try:
                args, self.gl_meta = gemlite.linear_args(gemlite_module, q, scale, zero, group_size, device)
                self.gl_args = [args] + [[t.clone() for t in args] for _ in range(r - 1)]
            except Exception as exc:  # noqa: BLE001  (a reference column only: said in its rows)
                self.gl_error = f"packing failed: {type(exc).__name__}: {str(exc)[:100]}"
        self.workspace = torch.empty(int4.scratch_bytes(n, k), dtype=torch.uint8, device=device)

    def x(self, m: int, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed + m)
        return torch.randn(m, self.k, device=self.device, generator=gen).to(torch.bfloat16)

    def bf16_calls(self, x):
        return [lambda w=w: F.linear(x, w) for w in self.w]

    def plan_calls(self, x, plan):
        return [lambda p=p, sz=sz: int4._run_plan(plan, x, p, sz, n=self.n, k=self.k, group_size=self.g,
                                                  input_scale_inv=None, bias=None, workspace=self.workspace)
                for p, sz in zip(self.p, self.sz)]

    def tinygemm_calls(self, x):
        return [lambda t=t, sz=sz: torch.ops.aten._weight_int4pack_mm(x, t, self.g, sz)
                for t, sz in zip(self.tg, self.sz)]

    def gemlite_calls(self, x):
        return [lambda a=a: gemlite.forward(self.gl, x, a, self.gl_meta) for a in self.gl_args]

    def dequant_calls(self, cfg):
        from morphlib.quant import kernels

        out = self.workspace.view(torch.bfloat16).view(self.n, self.k)
        return [lambda p=p, sz=sz: kernels.dequantize_into(out, p, sz, n=self.n, k=self.k, group_size=self.g, cfg=cfg)
                for p, sz in zip(self.p, self.sz)]


# ----------------------------------------------------------------------------- candidates (tuning)

DEQUANT_CANDIDATES = [
    {"dq_bn": 32, "dq_gpp": 2, "dq_warps": 4},
    {"dq_bn": 64, "dq_gpp": 2, "dq_warps": 4},
    {"dq_bn": 32, "dq_gpp": 4, "dq_warps": 4},
    {"dq_bn": 16, "dq_gpp": 4, "dq_warps": 2},
]


def _dot(bm, bn, swap, split=1, warps=4, stages=3, factor=0, gb=1):
    return {"kernel": "dot", "BM": bm, "BN": bn, "swap": swap, "split": split, "warps": warps, "stages": stages,
            "factor": factor, "GB": 1 if factor else gb}


def _gemv(bn, split=1, gb=4, warps=4, stages=3):
    return {"kernel": "gemv", "BN": bn, "split": split, "GB": gb, "warps": warps, "stages": stages}


def candidates(m: int, n: int, k: int, group_size: int) -> list[dict]:
    """Kernel configurations the tuner measures at M rows (every one computes the same function)."""
    c: list[dict] = []
    if m == 1:
        c += [_gemv(bn, s, gb, w) for bn, gb, w in ((8, 8, 2), (16, 4, 4), (16, 8, 4), (32, 4, 4), (32, 8, 8))
              for s in (1, 2, 4)]
    if m <= 16:
        c += [_dot(16, bn, 1, s, gb=gb) for bn in (64, 128) for gb in (2, 4) for s in (1, 2, 4, 8)]
        c += [_dot(16, bn, 0, s, gb=gb) for bn in (16, 32) for gb in (2, 4) for s in (1, 2)]
        c += [_dot(16, 128, 1, s, factor=1) for s in (1, 4)]
        return c
    c += [{"kernel": "dequant_gemm"}]  # the exact path competes from 17 rows on (it won at 128-256 on H200)
    if m <= 32:
        c += [_dot(32, bn, 1, s, gb=gb) for bn in (64, 128) for gb in (2, 4) for s in (1, 2, 4)]
        c += [_dot(32, 32, 0, s, gb=4) for s in (1, 2)]
    elif m <= 64:
        c += [_dot(64, bn, 1, s, gb=gb) for bn in (64, 128) for gb in (2, 4) for s in (1, 2, 4)]
    elif m <= 128:
        c += [_dot(128, bn, 1, s, warps=w, gb=gb) for bn, w in ((64, 4), (128, 8)) for gb in (2, 4) for s in (1, 2)]
        c += [_dot(64, 128, 0, s, gb=4) for s in (1, 2)] + [_dot(128, 128, 0, warps=8, gb=2)]
    elif m <= 256:
        c += [_dot(128, bn, 1, s, warps=w, gb=2) for bn, w in ((64, 4), (128, 8)) for s in (1, 2)]
        c += [_dot(128, 128, 0, s, warps=8, gb=2) for s in (1, 2)] + [_dot(128, 64, 0, gb=2), _dot(64, 128, 0, gb=4)]
        c += [_dot(256, 64, 1, warps=8, gb=2), _dot(256, 128, 1, warps=8, gb=2, stages=2)]
    else:
        c += [_dot(128, 128, 0, warps=8, gb=2), _dot(128, 128, 0, warps=8, gb=4, stages=2),
              _dot(128, 256, 0, warps=8, gb=2), _dot(256, 128, 1, warps=8, gb=2, stages=2),
              _dot(128, 128, 1, warps=8, gb=4, stages=2)]
    return c


def _effective_split(k: int, g: int, split: int) -> int:
    groups = k // g
    per = -(-groups // max(1, min(split, groups)))
    return -(-groups // per)


def variant_key(plan: dict, m: int, k: int, g: int, sinv: bool = False, bias: bool = False) -> tuple:
    """The compiled-kernel identity of a plan (what Triton specializes on)."""
    kind = plan["kernel"]
    if kind == "dequant_gemm":
        return ("dequant", g, sinv, False, plan.get("dq_bn", 32), plan.get("dq_gpp", 2), plan.get("dq_warps", 4))
    ws = _effective_split(k, g, plan.get("split", 1)) > 1
    if kind == "gemv" and m == 1:
        return ("gemv", g, sinv, bias, ws, plan["BN"], plan.get("GB", 4), plan.get("warps", 4), plan.get("stages", 3))
    if kind == "gemv":  # more rows than one: gemv() runs the default dot
        plan = {"BM": 16, "BN": 64, "swap": 1}
    factor = int(plan.get("factor", 0))
    return ("dot", g, sinv, bias, ws, plan["BM"], plan["BN"], int(plan.get("swap", 0)), plan.get("warps", 4),
            plan.get("stages", 3), factor, 1 if factor else plan.get("GB", 1))


def all_variant_keys(shapes: list[dict], rows=ROWS, group_size: int = 64, sinv=False, bias=False) -> list[tuple]:
    """Every kernel variant the tuner (and the rules) may launch on these shapes."""
    keys = []
    for s in shapes:
        for m in rows:
            for c in candidates(m, s["n"], s["k"], group_size):
                if c["kernel"] != "dequant_gemm":
                    keys.append(variant_key(c, m, s["k"], group_size, sinv, bias))
            for mode in ("fast", "exact"):
                plan = int4.rule_plan(s["n"], s["k"], m, group_size, mode)
                keys.append(variant_key(plan, m, s["k"], group_size, sinv, bias))
        keys += [variant_key({"kernel": "dequant_gemm", **d}, 0, s["k"], group_size, sinv) for d in DEQUANT_CANDIDATES]
    return sorted(set(keys))


def _compile_worker(keys: list[tuple]) -> list[str]:
    """Run each kernel variant once on a small problem so that Triton compiles and caches it."""
    from morphlib.quant import kernels

    dev = torch.device("cuda")
    errors = []
    for key in keys:
        try:
            kind, g, has_sinv, has_bias, ws = key[:5]
            n, k = 128, 8 * g
            p = torch.randint(0, 255, (n, k // 2), dtype=torch.uint8, device=dev)
            sz = torch.rand(k // g, n, 2, device=dev).to(torch.bfloat16)
            sinv = torch.rand(k, device=dev).to(torch.bfloat16) if has_sinv else None
            bias = torch.rand(n, device=dev).to(torch.bfloat16) if has_bias else None
            if kind == "dequant":
                out = torch.empty(n, k, dtype=torch.bfloat16, device=dev)
                kernels.dequantize_into(out, p, sz, n=n, k=k, group_size=g, input_scale_inv=sinv,
                                        cfg={"dq_bn": key[4], "dq_gpp": key[5], "dq_warps": key[6]})
            elif kind == "gemv":
                bn, gb, warps, stages = key[5:]
                x = torch.randn(1, k, device=dev).to(torch.bfloat16)
                kernels.gemv(x, p, sz, n=n, k=k, group_size=g, input_scale_inv=sinv, bias=bias,
                             cfg=_gemv(bn, 2 if ws else 1, gb, warps, stages))
            else:
                bm, bn, swap, warps, stages, factor, gb = key[5:]
                x = torch.randn(3, k, device=dev).to(torch.bfloat16)
                kernels.dot(x, p, sz, n=n, k=k, group_size=g, input_scale_inv=sinv, bias=bias,
                            cfg=_dot(bm, bn, swap, 2 if ws else 1, warps, stages, factor, gb))
        except Exception as exc:  # a config the card cannot run (e.g. shared memory): skipped later
            errors.append(f"{key}: {type(exc).__name__}: {str(exc)[:200]}")
    torch.cuda.synchronize()
    return errors


def _precompile_worker(job) -> list[str]:
    keys, gemlite_jobs, group_size = job
    errors = _compile_worker(keys) if keys else []
    return errors + (gemlite.warm(gemlite_jobs, group_size) if gemlite_jobs else [])


def precompile(keys, workers: int | None = None, log=print, gemlite_jobs=(), group_size: int = 64) -> None:
    """Compile kernel variants in parallel processes (they fill Triton's on-disk cache); ``gemlite_jobs``
    [(n, k, rows)]: GemLite's kernels for those shapes and row counts, in the same workers."""
    import concurrent.futures as cf
    import multiprocessing as mp

    keys, gemlite_jobs = sorted(set(keys)), sorted(set(gemlite_jobs))
    if not keys and not gemlite_jobs:
        return
    workers = workers or max(1, min(len(keys) + len(gemlite_jobs), (os.cpu_count() or 2) - 2, 14))
    chunks = [(keys[i::workers], gemlite_jobs[i::workers], group_size) for i in range(workers)]
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for errs in pool.map(_precompile_worker, chunks):
            for e in errs:
                log(f"  compile: {e}")
    log(f"precompiled {len(keys)} kernel variants" + (f" and GemLite for {len(gemlite_jobs)} (shape, rows)"
                                                      if gemlite_jobs else "")
        + f" in {time.perf_counter() - t0:.1f} s ({workers} processes)")


# ----------------------------------------------------------------------------- tuning


def run_tune(models=None, rows=ROWS, group_sizes=(64,), device=None, deadline_s: float | None = None,
             shapes: list[dict] | None = None, log=print) -> dict:
    """Measure every candidate kernel per (shape, M) and return this card's tuning-table record
    ({"capability", "sm_count", "entries": {"NxK/gG": {"M": plan + "us", "dequant": cfg}}})."""
    device = torch.device(device or "cuda")
    props = torch.cuda.get_device_properties(device)
    t0 = time.perf_counter()
    jobs = []
    for g in group_sizes:
        for s in shapes or model_shapes(models or MODELS, g, fused=True):  # the engine's matrices too
            if s["k"] % g == 0:
                jobs.append((s, g))
    keys = []
    for s, g in jobs:
        keys += all_variant_keys([s], rows, g)
    precompile(keys, log=log)
    entries: dict = {}
    for s, g in jobs:
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            log(f"tune: deadline reached, {s['n']}x{s['k']} g{g} and later shapes keep the rules")
            continue
        n, k = s["n"], s["k"]
        prob = Problem(n, k, g, device, props.L2_cache_size, tinygemm=False)
        ent: dict = {}
        dq = []
        for d in DEQUANT_CANDIDATES:
            try:
                dq.append((time_cuda(prob.dequant_calls(d), min_ms=5) * 1e3, d))
            except Exception as exc:
                log(f"  skip dequant {d}: {type(exc).__name__}")
        ent["dequant"] = min(dq, key=lambda t: t[0])[1]
        ent["dequant_us"] = round(min(dq, key=lambda t: t[0])[0], 2)
        for m in rows:
            x = prob.x(m)
            best = None
            for c in candidates(m, n, k, g):
                plan = {**c, **ent["dequant"]} if c["kernel"] == "dequant_gemm" else c
                try:
                    us = time_cuda(prob.plan_calls(x, plan), min_ms=5) * 1e3
                except Exception as exc:
                    log(f"  skip {c}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                if best is None or us < best[0]:
                    best = (us, c)
            ent[str(m)] = {**best[1], "us": round(best[0], 2)}
        entries[int4.shape_key(n, k, g)] = ent
        log(f"tuned {s['model']} {n}x{k} g{g}: " + ", ".join(
            f"{m}:{ent[str(m)]['kernel']}" for m in rows) + f" ({time.perf_counter() - t0:.0f} s)")
        del prob
        torch.cuda.empty_cache()
    return {"capability": [props.major, props.minor], "sm_count": props.multi_processor_count,
            "made": {"torch": torch.__version__, "triton": _triton_version(),
                     "date": time.strftime("%Y-%m-%d"), "rows": list(rows),
                     "shapes": sorted({int4.shape_key(s["n"], s["k"], g) for s, g in jobs})},
            "entries": entries}


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def missing_shapes(record: dict | None, models=None, group_sizes=(64,)) -> list[dict]:
    """The shapes (the engine's fused matrices included) that this card's table ``record`` has no
    entry for, at any of ``group_sizes``."""
    have = set((record or {}).get("entries", {}))
    out = []
    for s in model_shapes(models or MODELS, group_sizes[0], fused=True):
        if any(s["k"] % g == 0 and int4.shape_key(s["n"], s["k"], g) not in have for g in group_sizes):
            out.append(s)
    return out


def merge_record(old: dict | None, new: dict | None) -> dict:
    """``old``'s entries with ``new``'s added (``new`` wins on a shape both hold); ``made`` lists both runs."""
    if old is None or new is None:
        if new is None and old is None:
            raise MorphError("nothing to merge: no table for this card and no shape tuned")
        return new or old
    made = [*(old["made"] if isinstance(old.get("made"), list) else [old.get("made")]), new.get("made")]
    return {**old, **{k: new[k] for k in ("capability", "sm_count")},
            "made": [m for m in made if m], "entries": {**old.get("entries", {}), **new.get("entries", {})}}


def install_table(device_name: str, record: dict) -> dict:
    """Use ``record`` as this card's tuning table in this process (returns the whole table)."""
    table = int4.tuning_table()
    table = {**table, "devices": {**table.get("devices", {}), device_name: record}}
    int4._TABLE = table
    return table


# ----------------------------------------------------------------------------- bench


def _plan_label(plan: dict) -> str:
    kind = plan["kernel"]
    if kind == "gemv":
        return f"gemv BN{plan['BN']} GB{plan.get('GB', 4)} s{plan.get('split', 1)}"
    if kind == "dot":
        return (f"dot{'^T' if plan.get('swap') else ''}{'f' if plan.get('factor') else ''} {plan['BM']}x{plan['BN']}"
                f" GB{plan.get('GB', 1)} s{plan.get('split', 1)} w{plan.get('warps', 4)}")
    if kind == "dequant_gemm":
        return "dequant+cuBLAS"
    return kind


def _band_rows(rows: list[dict], name: str, lo: int, hi: int, key: str) -> list[dict]:
    band = [r for r in rows if r["model"] == HEADLINE_MODEL and lo <= r["m"] <= hi and r.get(key) is not None]
    if name.startswith("worst_time_ratio_rows_1"):  # one row: 4096x4096 apart (its own, looser target)
        square = name.endswith("_4096x4096")
        band = [r for r in band if ((r["n"], r["k"]) == (4096, 4096)) == square]
    return band


def _worst(band: list[dict], key: str, target: float, **extra) -> dict:
    worst = max(band, key=lambda r: r[key])
    return {"value": round(worst[key], 3), "target": target, "met": worst[key] <= target,
            "miss_by": round(max(0.0, worst[key] - target), 3), "at": f"{worst['n']}x{worst['k']} rows {worst['m']}",
            **extra}


def headline(rows: list[dict], key: str = "ratio") -> dict:
    """Worst INT4/bf16 time ratio over the Llama-2-7B shapes per row band, with its target."""
    out = {}
    for name, ((lo, hi), target) in TARGETS.items():
        band = _band_rows(rows, name, lo, hi, key)
        if band:
            out[name] = _worst(band, key, target)
    return out


def yardsticks(rows: list[dict]) -> dict:
    """Worst time of ours over GemLite's and over tinygemm's on the Llama-2-7B (shape, rows), with targets."""
    out = {}
    for name, (column, target) in YARDSTICKS.items():
        pairs = [{**r, "vs": r["int4_ms"] / r[column]} for r in rows
                 if r["model"] == HEADLINE_MODEL and r.get(column) is not None]
        if pairs:
            out[name] = _worst(pairs, "vs", target, compared=len(pairs))
    return out


def run_bench(models=None, rows=ROWS, group_size: int = 64, device=None, mode: str = "fast",
              tinygemm: bool = True, shapes: list[dict] | None = None, gemlite_column: bool = True, log=print) -> dict:
    """Time bf16 ``F.linear`` and the chosen INT4 kernel per shape and row count (module doc).

    ``models``: shape sets of ``morphlib.shapes.SHAPES`` (default: Llama-2-7B, TinyLlama, SmolLM2 on
    CUDA; SmolLM2 on CPU); ``shapes``: explicit [{"model", "n", "k", "linears"}] instead. ``gemlite_column``:
    time GemLite on the headline model's shapes (and on explicit shapes) when it is found."""
    device = resolve_device(device)
    if device.type != "cuda":
        return _run_bench_cpu(shapes or model_shapes(models or ("smollm2-135m",), group_size), rows, group_size, log)
    return _run_bench_cuda(models, rows, group_size, device, mode, tinygemm, shapes, gemlite_column, log)


def plan_seconds(rows: int, gemlite_rows: int) -> float:
    """Estimated seconds of a CUDA run timing ``rows`` (shape, rows) pairs, ``gemlite_rows`` of them with GemLite."""
    p = PLAN_S
    return p["fixed"] + rows * p["per_row"] + (p["gemlite_fixed"] + gemlite_rows * p["gemlite_per_row"] if gemlite_rows else 0)


def _gemlite_setup(shapes, rows, group_size, wanted: bool, log):
    """(module or None, {(n, k, m): config source}, "what the column is"): GemLite on the headline model's
    shapes (and explicit ones) only -- its targets are set there, and each shape costs compile time."""
    if not wanted:
        return None, {}, "not run (gemlite_column=False)"
    gl, info = gemlite.load()
    if gl is None:
        log(f"GemLite column: {info}")
        return None, {}, info
    own = sorted({(s["n"], s["k"]) for s in shapes if s["model"] in (HEADLINE_MODEL, "custom")})
    try:
        used = gemlite.configure(gl, own, rows, group_size)
    except Exception as exc:  # noqa: BLE001  (a reference column: the run goes on without it)
        info = f"not run: configuring GemLite failed: {type(exc).__name__}: {str(exc)[:120]}"
        log(f"GemLite column: {info}")
        return None, {}, info
    borrowed = sum(v != "shipped" for v in used.values())
    info += f"; configs/{gemlite.CONFIG}.json, {borrowed} of {len(used)} (shape, rows) borrowed from the nearest shipped entry"
    log(f"GemLite column: {info}")
    return gl, used, info


def _run_bench_cuda(models, rows, group_size, device, mode, tinygemm, shapes, gemlite_column, log) -> dict:
    props = torch.cuda.get_device_properties(device)
    name = props.name
    shapes = shapes or model_shapes(models or MODELS, group_size)
    gl, gl_used, gl_info = _gemlite_setup(shapes, rows, group_size, gemlite_column, log)
    log(f"plan: {len(shapes)} shapes x {len(rows)} row counts, GemLite on {len(gl_used)}: estimated "
        f"{plan_seconds(len(shapes) * len(rows), len(gl_used)):.0f} s on an H200")
    precompile([variant_key(int4.kernel_plan(name, s["n"], s["k"], m, group_size, md, capability=(props.major, props.minor),
                                              sm_count=props.multi_processor_count), m, s["k"], group_size)
                for s in shapes for m in rows for md in {mode, "exact"}], log=log,
               gemlite_jobs=list(gl_used), group_size=group_size)
    copy_gbps = copy_bandwidth_gbps(device)
    log(f"{name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB), torch {torch.__version__}, "
        f"triton {_triton_version()}; mode {mode}, g{group_size}; device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    out_rows = []
    for s in shapes:
        n, k = s["n"], s["k"]
        prob = Problem(n, k, group_size, device, props.L2_cache_size, tinygemm=tinygemm,
                       gemlite_module=gl if (n, k, rows[0]) in gl_used else None)
        log(f"\n{s['model']} {'/'.join(s['linears'])}: N={n} K={k} g{group_size} "
            f"(bf16 {2 * n * k / 2**20:.1f} MiB x{len(prob.w)} copies, int4 {int4_nbytes(n, k, group_size) / 2**20:.2f} MiB x{len(prob.p)})")
        log(f"{'rows':>5} {'bf16 ms':>8} {'int4 kernel':<26} {'ratio':>6} {'exact':>6} {'tinygemm':>8} {'gemlite':>8}  bandwidth")
        for m in rows:
            x = prob.x(m)
            plan = int4.kernel_plan(name, n, k, m, group_size, mode, capability=(props.major, props.minor),
                                    sm_count=props.multi_processor_count)
            exact_plan = int4.kernel_plan(name, n, k, m, group_size, "exact", capability=(props.major, props.minor),
                                          sm_count=props.multi_processor_count)
            t_bf16 = time_cuda(prob.bf16_calls(x))
            t_int4 = time_cuda(prob.plan_calls(x, plan))
            t_exact = t_int4 if exact_plan == plan else time_cuda(prob.plan_calls(x, exact_plan))
            t_tg = _yardstick(prob.tinygemm_calls, x, "tinygemm", m, log) if tinygemm else None
            t_gl = _yardstick(prob.gemlite_calls, x, "GemLite", m, log) if prob.gl_args else None
            row = {"model": s["model"], "linears": s["linears"], "n": n, "k": k, "m": m,
                   "bf16_ms": t_bf16, "kernel": _plan_label(plan), "plan": plan, "int4_ms": t_int4,
                   "ratio": t_int4 / t_bf16, "exact_kernel": _plan_label(exact_plan), "exact_ms": t_exact,
                   "exact_ratio": t_exact / t_bf16, "tinygemm_ms": t_tg,
                   "tinygemm_ratio": None if t_tg is None else t_tg / t_bf16, "gemlite_ms": t_gl,
                   "gemlite_ratio": None if t_gl is None else t_gl / t_bf16,
                   "gemlite_config": prob.gl_error or gl_used.get((n, k, m), gl_info if gl is None
                                                                  else "not timed (headline shapes only)")}
            bw = ""
            if m == 1:
                row["int4_gbps"] = (int4_nbytes(n, k, group_size) + 2 * (k + n)) / (t_int4 * 1e-3) / 1e9
                row["bf16_gbps"] = (2 * n * k + 2 * (k + n)) / (t_bf16 * 1e-3) / 1e9
                row["copy_gbps"] = copy_gbps
                bw = (f"int4 {row['int4_gbps']:.0f} GB/s = {row['int4_gbps'] / copy_gbps:.0%} of copy; "
                      f"bf16 {row['bf16_gbps']:.0f} GB/s")
            tg, gls = (f"{v:>8.2f}" if v is not None else f"{'-':>8}" for v in (row["tinygemm_ratio"], row["gemlite_ratio"]))
            log(f"{m:>5} {t_bf16:>8.4f} {row['kernel']:<26} {row['ratio']:>6.2f} {row['exact_ratio']:>6.2f} {tg} {gls}  {bw}")
            out_rows.append(row)
        del prob
        torch.cuda.empty_cache()
    head = {**headline(out_rows), **yardsticks(out_rows)}
    exact_head = headline(out_rows, "exact_ratio")
    result = {"device": name, "cpu": False, "sm_count": props.multi_processor_count,
              "torch": torch.__version__, "triton": _triton_version(), "mode": mode, "group_size": group_size,
              "copy_gbps": copy_gbps, "timing": "CUDA graph of R calls on R weight copies (> 3x L2), median replay / R",
              "gemlite": gl_info, "rows": out_rows, "headline": head, "headline_exact_mode": exact_head,
              "targets": {**{k: v[1] for k, v in TARGETS.items()}, **{k: v[1] for k, v in YARDSTICKS.items()}}}
    log("\n" + format_headline(result))
    return result


def _yardstick(calls, x, what: str, m: int, log) -> float | None:
    """ms per call of a reference column's ``calls(x)``, or None (said in the log) when it fails."""
    try:
        return time_cuda(calls(x))
    except Exception as exc:  # noqa: BLE001  (a reference column only)
        log(f"  {what} failed at {m} rows: {type(exc).__name__}: {str(exc)[:100]}")
        return None


def format_headline(result: dict) -> str:
    lines = [f"headline ({HEADLINE_MODEL} shapes, {result['device']}{' CPU' if result.get('cpu') else ''}, "
             f"mode {result.get('mode')}): worst INT4/bf16 time ratio per band; worst of ours over a yardstick's time"]
    for key, h in result["headline"].items():
        verdict = "met" if h["met"] else f"MISSED by {h['miss_by']:.2f}"
        ex = result.get("headline_exact_mode", {}).get(key)
        extra = f"; exact mode {ex['value']:.2f}" if ex and ex["value"] != h["value"] else ""
        lines.append(f"  {key:<34} {h['value']:>6.2f}  target <= {h['target']:.2f}  {verdict}  (at {h['at']}{extra})")
    return "\n".join(lines)


def _run_bench_cpu(shapes, rows, group_size, log, threads: int = 1) -> dict:
    # one thread: on a shared, loaded machine OpenMP's barriers make multi-thread timings erratic
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _cpu_rows(shapes, rows, group_size, log, threads)
    finally:
        torch.set_num_threads(before)


def _cpu_rows(shapes, rows, group_size, log, threads) -> dict:
    log(f"CPU ({threads} threads), torch {torch.__version__}: INT4 in the CPU layout "
        f"(fused _weight_int4pack_mm_for_cpu up to {int4.KERNEL_MAX_TOKENS['cpu']} rows, dequantize+GEMM above) vs bf16")
    out_rows = []
    for s in shapes:
        n, k = s["n"], s["k"]
        w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        q = int4.Int4Linear.from_weight(w, group_size=group_size)
        log(f"\nCPU {s['model']} {'/'.join(s['linears'])}: N={n} K={k} g{group_size}, layout {q.layout}")
        log(f"{'rows':>5} {'bf16 ms':>8} {'int4 kernel':<26} {'ratio':>6}")
        for m in rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            t_bf16 = time_cpu(lambda: F.linear(x, w))
            t_int4 = time_cpu(lambda: q(x))
            fused = q.layout == "cpu" and m <= int4.KERNEL_MAX_TOKENS["cpu"]
            kernel = "int4pack_mm_for_cpu" if fused else "dequantize+GEMM"
            row = {"model": s["model"], "linears": s["linears"], "n": n, "k": k, "m": m, "bf16_ms": t_bf16,
                   "kernel": kernel, "int4_ms": t_int4, "ratio": t_int4 / t_bf16, "exact_ratio": t_int4 / t_bf16}
            if m == 1:
                row["int4_gbps"] = int4_nbytes(n, k, group_size) / (t_int4 * 1e-3) / 1e9
            log(f"{m:>5} {t_bf16:>8.3f} {kernel:<26} {row['ratio']:>6.2f}")
            out_rows.append(row)
    result = {"device": "CPU", "cpu": True, "threads": threads, "torch": torch.__version__, "mode": "cpu",
              "group_size": group_size, "rows": out_rows, "headline": headline(out_rows),
              "targets": {k: v[1] for k, v in TARGETS.items()}}
    if result["headline"]:
        log("\n" + format_headline(result))
    return result
