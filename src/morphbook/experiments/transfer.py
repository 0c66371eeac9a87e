"""Chapter 3: what a swap's copies cost on the serving engine, alone and while the engine decodes.

Every copy moves a layer's real bytes into the engine's own memory (``morphlib.engine``: one arena per
engine). Three mechanisms, each number on the page names its own:

* **engine op**: a swap (the layer's INT4 head, host -> a staging slot, then committed into the head of its
  region) or a restore (its 16-bit region, host -> region tail + staging -> head) through ``LLM.swap`` /
  ``LLM.restore`` on an idle engine: the engine's copy backend (chunks on its copy stream, a CUDA event
  pair per chunk), its two staging slots, its commits at step boundaries. 1 .. 16 layers; the engine's
  chunk sizes.
* **raw copy**: plain ``torch`` copies (one ``cudaMemcpyAsync`` each) from a host buffer into free KV
  blocks of the same arena, on the engine's copy stream, two CUDA events around the whole plan: one copy
  per layer against one per tensor (the original project's packing claims), pinned against pageable host
  memory, and the ceiling (one contiguous pinned copy of N MiB). The engine adds nothing to these: they
  are properties of the copy engine and of host memory.
* **decode contention**: the engine swaps and restores one layer, again and again, while it decodes a
  batch with CUDA graphs (random weights, GPU-bound steps), for every chunk size and pacing; per op, the
  copy bandwidth its chunks reached against the same op on the idle engine, and the slowdown of the steps
  the copies overlapped against the nearest quiet steps in the same morph state (``swapruns``).

Repeats: ``repeats`` (200) per condition, fewer only for a condition whose one repeat is long (by the
plan's estimate: ``condition_s`` of device time per condition, never fewer than ``min_repeats``); the plan
and its estimated device time are printed before anything is measured, and a plan over ``time_limit_s`` is
refused. The cpu profile runs every path on a tiny random Llama on the CPU (host memcpy, no PCIe).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from morphbook.experiments import swapruns as sr
from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, cpu_threads, int_tuple
from morphlib.device import resolve_device
from morphlib.engine import LLM, EngineConfig
from morphlib.errors import MorphError
from morphlib.select.layersets import middle_block

MIB = 1 << 20
DEVICES = ("auto", "cuda", "cpu")
PAYLOADS = ("int4", "fp16")  # a swap copies the INT4 head, a restore the 16-bit region
# the plan's device-time model (an H200; the brief's measurements): what a repeat costs before it is measured
H2D_PINNED, H2D_PAGEABLE = 55e9, 11e9
BOUNDARY_S = 4e-4  # an idle engine's host round trip per staging-slot pair (finish, sync, step, commit)
STEP_S = {1: 4.9e-3, 8: 5.6e-3, 32: 8.4e-3}  # Llama-2-7B decode step with CUDA graphs, by batch (engine bench)
ENGINE_BUILD_S, PROCESS_S = 10.0, 12.0  # one engine (weights, INT4 twins, pinned host copies, graphs); imports

DEFAULTS = {
    "gpu": dict(shapes=("llama-2-7b", "llama-3-8b"), layer_counts=(1, 4, 8, 16),
                chunk_bytes=(4 * MIB, 16 * MIB, 64 * MIB), engine_chunk_bytes=16 * MIB, repeats=200, min_repeats=30,
                condition_s=2.5, pageable_layer_counts=(1, 4), ceiling_bytes=(MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB),
                decode_batches=(1, 8, 32), paces=(0.5, 0.8, None), pairs=8, gap=8, prompt_len=128, memory_gib=24.0,
                time_limit_s=150.0),
    "cpu": dict(shapes=("tiny",), layer_counts=(1, 2), chunk_bytes=(16 << 10, 64 << 10, 256 << 10),
                engine_chunk_bytes=64 << 10, repeats=20, min_repeats=5, condition_s=0.5, pageable_layer_counts=(1,),
                ceiling_bytes=(16 << 10, 64 << 10, 256 << 10), decode_batches=(1, 4), paces=(0.5, 0.8, None), pairs=3,
                gap=6, prompt_len=16, memory_gib=None, time_limit_s=150.0),
}


def pace_tuple(value) -> tuple:
    """Pacing fractions in (0, 1], or None for unpaced, in the order given (JSON text accepted: papermill)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise MorphError(f"paces must be a list of fractions or null (unpaced), got {value!r}") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for p in items:
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.01 <= p <= 1):
            raise MorphError(f"paces: {p!r} is neither a fraction in [0.01, 1] nor null (unpaced)")
    if not items or len(set(items)) != len(items):
        raise MorphError(f"paces must list distinct settings, got {value!r}")
    return tuple(items)


def pace_label(pace) -> str:
    return "unpaced" if pace is None else f"{pace:g}"


def size_text(nbytes: int) -> str:
    """'16 MiB', '64 KiB'."""
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def setting_text(chunk_bytes: int, pace: str) -> str:
    """'16 MiB chunks, pace 0.8' or '64 MiB chunks, unpaced'."""
    return f"{size_text(chunk_bytes)} chunks, " + ("unpaced" if pace == "unpaced" else f"pace {pace}")


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    shapes: tuple[str, ...] = DEFAULTS["gpu"]["shapes"]  # morphlib.shapes names (random weights) or "tiny" (CPU)
    layer_counts: tuple[int, ...] = (1, 4, 8, 16)  # engine ops: layers per swap / restore (middle blocks)
    chunk_bytes: tuple[int, ...] = DEFAULTS["gpu"]["chunk_bytes"]  # the engine's copy chunk sizes measured
    engine_chunk_bytes: int = 16 * MIB  # the chunk size of the multi-layer engine ops (one of chunk_bytes)
    repeats: int = 200  # per condition (the most)
    min_repeats: int = 30  # the fewest, for a condition whose one repeat is long
    condition_s: float = 2.5  # device time a condition may take by the plan's estimate (sets fewer repeats)
    pageable_layer_counts: tuple[int, ...] = (1, 4)  # raw copies: pinned against pageable host memory
    ceiling_bytes: tuple[int, ...] = DEFAULTS["gpu"]["ceiling_bytes"]  # one contiguous pinned copy of each size
    decode_batches: tuple[int, ...] = (1, 8, 32)  # decode contention: batch sizes (CUDA graphs)
    paces: tuple = (0.5, 0.8, None)  # decode contention: copy pacing (None: unpaced)
    pairs: int = 8  # decode contention: swap + restore pairs of one layer per condition
    gap: int = 8  # decode contention: steps from one event to the next
    prompt_len: int = 128
    warmup: int = 4  # untimed decode steps before each timed window
    memory_gib: float | None = 24.0  # the engine's memory budget (None: the weights + 512 MiB, CPU)
    cpu_copy_bandwidth: float = 2e8  # CPU only: the modelled link the copies' landing follows (bytes/s)
    time_limit_s: float = 150.0  # a plan estimated longer is refused before anything runs
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else the CPU; or "cuda" / "cpu"

    def __post_init__(self):
        shapes = tuple(self.shapes) if isinstance(self.shapes, (list, tuple)) else (self.shapes,)
        if not shapes:
            raise MorphError("shapes must name at least one model shape")
        for s in shapes:
            _num_layers(s)  # a one-line error naming the shapes
        object.__setattr__(self, "shapes", shapes)
        for name in ("layer_counts", "chunk_bytes", "pageable_layer_counts", "ceiling_bytes", "decode_batches"):
            object.__setattr__(self, name, int_tuple(name, getattr(self, name), distinct=name == "layer_counts"))
        object.__setattr__(self, "paces", pace_tuple(self.paces))
        self.check_counts("engine_chunk_bytes", "repeats", "min_repeats", "pairs", "gap", "prompt_len", "warmup")
        if self.engine_chunk_bytes not in self.chunk_bytes:
            raise MorphError(f"engine_chunk_bytes ({self.engine_chunk_bytes}) must be one of chunk_bytes {self.chunk_bytes}")
        if self.min_repeats > self.repeats:
            raise MorphError(f"min_repeats ({self.min_repeats}) exceeds repeats ({self.repeats})")
        depth = min(_num_layers(s) for s in shapes)
        if max(self.layer_counts + self.pageable_layer_counts) > depth:
            raise MorphError(f"layer counts up to {max(self.layer_counts + self.pageable_layer_counts)} exceed the "
                             f"{depth} layers of the shallowest shape")
        for name in ("condition_s", "time_limit_s", "cpu_copy_bandwidth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise MorphError(f"{name} must be a positive number, got {v!r}")
        if self.memory_gib is not None and (isinstance(self.memory_gib, bool) or not isinstance(self.memory_gib, (int, float))
                                            or not self.memory_gib > 0):
            raise MorphError(f"memory_gib must be a positive number of GiB or None, got {self.memory_gib!r}")
        if self.device not in DEVICES:
            raise MorphError(f"device {self.device!r} is not supported: use {', '.join(map(repr, DEVICES))}")

    @property
    def decode_steps(self) -> int:
        return 2 * self.pairs * self.gap + self.gap


def _num_layers(shape: str) -> int:
    from morphlib.shapes import shape_config

    return sr.TINY["num_hidden_layers"] if shape == "tiny" else shape_config(shape)["num_hidden_layers"]


def _layer_bytes(shape: str, group_size: int = 64) -> dict:
    """16-bit region and INT4 head bytes of one layer, for the plan's estimate (the engine's layout decides the
    real ones; the CPU's tiny model is float32)."""
    from morphlib.shapes import int4_nbytes, linear_shapes, shape_config

    mats = linear_shapes(sr.TINY if shape == "tiny" else shape_config(shape)).values()
    elem = 4 if shape == "tiny" else 2
    return {"fp16": sum(elem * n * k for n, k in mats), "int4": sum(int4_nbytes(n, k, group_size) for n, k in mats)}


# ----------------------------------------------------------------------------- the plan
def repeats_for(cfg: Config, one_s: float) -> int:
    """``repeats``, fewer when one repeat is long: ``condition_s`` / one repeat, never below ``min_repeats``."""
    return max(cfg.min_repeats, min(cfg.repeats, int(cfg.condition_s / max(one_s, 1e-9))))


def engine_op_s(nbytes: dict, k: int) -> float:
    """Estimated seconds of one swap + restore cycle of ``k`` layers on an idle engine."""
    return k * (nbytes["int4"] + nbytes["fp16"]) / H2D_PINNED + 2 * math.ceil(k / 2) * BOUNDARY_S


def plan(cfg: Config) -> list[dict]:
    """Every measurement's conditions, repeats and estimated device seconds (H200 assumptions)."""
    rows = []
    for si, shape in enumerate(cfg.shapes):
        nb = _layer_bytes(shape)
        for chunk in cfg.chunk_bytes:
            for k in (cfg.layer_counts if chunk == cfg.engine_chunk_bytes else (1,)):
                one = engine_op_s(nb, k)
                n = repeats_for(cfg, one)
                rows.append({"shape": shape, "what": f"engine ops, {k} layer(s), {chunk // 1024} KiB chunks",
                             "repeats": n, "seconds": n * one})
        for payload in PAYLOADS:
            for name, k, bw in _raw_conditions(cfg, si == 0):
                one = k * nb[payload] / bw
                n = repeats_for(cfg, one)
                rows.append({"shape": shape, "what": f"raw {payload} {name}, {k} layer(s)", "repeats": n, "seconds": n * one})
        if si == 0:
            for size in cfg.ceiling_bytes:
                n = repeats_for(cfg, size / H2D_PINNED)
                rows.append({"shape": shape, "what": f"ceiling {size // 1024} KiB", "repeats": n, "seconds": n * size / H2D_PINNED})
            for b in cfg.decode_batches:
                step = STEP_S.get(b, max(STEP_S.values()))
                n = len(cfg.chunk_bytes) * len(cfg.paces)
                rows.append({"shape": shape, "what": f"decode contention, batch {b}: {n} settings x "
                             f"{cfg.decode_steps + cfg.warmup} steps", "repeats": 1,
                             "seconds": n * ((cfg.decode_steps + cfg.warmup + 2) * step + 0.15)})
        rows.append({"shape": shape, "what": "engine construction", "repeats": 1, "seconds": ENGINE_BUILD_S})
    rows.append({"shape": "", "what": "process start, imports, CUDA context", "repeats": 1, "seconds": PROCESS_S})
    return rows


def _raw_conditions(cfg: Config, first_shape: bool) -> list[tuple[str, int, float]]:
    """(packing / memory, layers, assumed bandwidth) of the raw copies of one payload."""
    out = [("one copy per layer, pinned", 1, H2D_PINNED), ("one copy per tensor, pinned", 1, H2D_PINNED)]
    if first_shape:
        out += [("one copy per layer, pinned", k, H2D_PINNED) for k in cfg.pageable_layer_counts if k != 1]
        out += [("one copy per layer, pageable", k, H2D_PAGEABLE) for k in cfg.pageable_layer_counts]
    return out


# ----------------------------------------------------------------------------- raw copies
class CopyTimer:
    """Milliseconds of one plan of copies: CUDA events around it on ``stream``, or the wall clock on CPU."""

    def __init__(self, device: torch.device, stream=None):
        self.cuda = device.type == "cuda"
        self.stream = stream
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, plan) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # nothing else in flight
            self.start.record(self.stream)
            run_plan(plan, self.stream)
            self.end.record(self.stream)
            self.end.synchronize()
            return float(self.start.elapsed_time(self.end))
        t0 = time.perf_counter()
        run_plan(plan)
        return (time.perf_counter() - t0) * 1e3


def run_plan(plan, stream=None) -> int:
    """Issue the copies of a plan [(destination, source)] (non-blocking on CUDA, on ``stream`` when given)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for dst, src in plan:
            dst.copy_(src, non_blocking=dst.is_cuda)
    return len(plan)


def tensor_pieces(layout, payload: str) -> list[tuple[int, int]]:
    """(offset, bytes) of each tensor of a layer's INT4 head (packed, scales per INT4 matrix: qkv, o, gate_up,
    down) or of its 16-bit region (each projection's rows of the fused matrices), in the engine's layout."""
    if payload == "int4":
        return [(p.offset, p.nbytes) for pieces in layout.int4.values() for p in pieces.values()]
    s, e = layout.spec, layout.elem
    rows = {"qkv": (s.q_dim, s.kv_dim, s.kv_dim), "o": (s.hidden,), "gate_up": (s.intermediate, s.intermediate),
            "down": (s.hidden,)}
    out = []
    for name, piece in layout.fp16.items():
        off, k = piece.offset, piece.shape[1]
        for r in rows[name]:
            out.append((off, r * k * e))
            off += r * k * e
    return out


def raw_plans(llm: LLM, cfg: Config, first_shape: bool) -> dict:
    """{(payload, packing, memory, layers): [(arena destination, host source)]}, destinations in free KV blocks."""
    lay, copies = llm.layout, llm.copies
    block = middle_block(llm.spec.num_layers, max(cfg.pageable_layer_counts + (1,)))
    room = lay.main_blocks * lay.block_bytes
    if llm.bm.num_used or room < max(len(block), 1) * lay.region_bytes:
        raise MorphError(f"raw copies need an idle engine whose free KV pool holds {len(block)} layer regions "
                         f"({len(block) * lay.region_bytes / 2**30:.2f} GiB); it holds {room / 2**30:.2f} GiB")
    scratch = llm.arena.bytes(lay.pool0, room)
    host = {"int4": copies.int4_host, "fp16": copies.fp16_host}
    plans = {}
    for payload in PAYLOADS:
        size = lay.head_bytes if payload == "int4" else lay.region_bytes
        src0 = host[payload][block[0]]
        plans[(payload, "tensor", "pinned", 1)] = [(scratch[o:o + n], src0[o:o + n]) for o, n in tensor_pieces(lay, payload)]
        for name, k, _ in _raw_conditions(cfg, first_shape):
            if "tensor" in name:
                continue
            memory = "pageable" if "pageable" in name else "pinned"
            layers = middle_block(llm.spec.num_layers, k)
            srcs = [host[payload][li] for li in layers]
            if memory == "pageable":
                srcs = [_pageable(t) for t in srcs]
            plans[(payload, "layer", memory, k)] = [(scratch[i * size:(i + 1) * size], t) for i, t in enumerate(srcs)]
    if first_shape:
        src = host["fp16"][block[0]]
        for n in cfg.ceiling_bytes:
            if n <= src.numel():
                plans[("fp16", "ceiling", "pinned", n)] = [(scratch[:n], src[:n])]
    return plans


def _pageable(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype)
    out.copy_(t)
    if out.is_pinned():
        raise MorphError("a pageable host buffer came out pinned")
    return out


def time_plans(timer: CopyTimer, plans: dict, repeats: dict, warmup: int, seed: int) -> dict:
    """Every plan once per round in a fresh random order (plans with fewer repeats drop out of later rounds),
    after ``warmup`` untimed rounds: {key: [ms, ...]}."""
    rng, keys = np.random.default_rng(seed), list(plans)
    samples = {k: [] for k in keys}
    for r in range(warmup + max(repeats.values())):
        for i in rng.permutation(len(keys)):
            k = keys[i]
            if r < warmup:
                timer(plans[k])
            elif len(samples[k]) < repeats[k]:
                samples[k].append(timer(plans[k]))
    return samples


def plans_exact(plans: dict, stream=None) -> bool:
    """Each plan run once more: every destination equals its source byte for byte."""
    for plan in plans.values():
        run_plan(plan, stream)
        if stream is not None:
            torch.cuda.synchronize()
        if not all(sr.same_bytes(dst, src) for dst, src in plan):
            return False
    return True


def stats(ms, nbytes: int) -> dict:
    x = np.asarray([v for v in ms if v is not None], dtype=float)
    med = float(np.median(x))
    return {"n": int(x.size), "median_ms": med, "p50_ms": med, "p90_ms": float(np.percentile(x, 90)),
            "p99_ms": float(np.percentile(x, 99)), "max_ms": float(x.max()), "min_ms": float(x.min()),
            "jitter": float(np.percentile(x, 99) / med - 1), "gbps": nbytes / (med * 1e-3) / 1e9,
            "samples_ms": [round(float(v), 4) for v in x]}


# ----------------------------------------------------------------------------- one engine
# The engine's default margin (10 % over the measured workspace) is for serving. This experiment also writes
# raw copies into free KV blocks and switches chunk sizes and pacing between decode runs; on the first H200
# run (04e42b6) the capped allocator then ran out 86 MiB short at batch 32 (23.77 GiB live, 165 MiB of it
# fragmented). The KV pool this costs (about 300 MiB of a 24 GiB budget) is not what chapter 3 measures.
WORKSPACE_MARGIN = 0.5


def build_engine(shape: str, cfg: Config, device: torch.device, decode: bool) -> LLM:
    """The engine of one shape: its middle ``max(layer_counts)`` layers swappable and restorable; batch limits
    and graph buckets for the decode contention when ``decode``."""
    num = _num_layers(shape)
    block = tuple(middle_block(num, max(cfg.layer_counts + cfg.pageable_layer_counts)))
    batch = max(cfg.decode_batches) if decode else 1
    econf = EngineConfig(memory_budget=None if cfg.memory_gib is None else int(cfg.memory_gib * 2**30), device=str(device),
                         max_num_seqs=batch, max_num_batched_tokens=max(2048, batch) if device.type == "cuda" else 256,
                         graph_buckets=cfg.decode_batches if decode else (1,), swappable=block, restorable=block,
                         max_model_len=_context(cfg), copy_chunk_bytes=cfg.engine_chunk_bytes,
                         copy_bandwidth=None if device.type == "cuda" else cfg.cpu_copy_bandwidth, seed=cfg.seed,
                         workspace_margin=WORKSPACE_MARGIN)
    source, _, _ = sr.engine_source(shape if shape == "tiny" else f"shape:{shape}", cfg.seed)
    return LLM(source, econf)


def _context(cfg: Config) -> int:
    need = cfg.prompt_len + 1 + cfg.warmup + cfg.decode_steps + sr.DRAIN_TOKENS
    return 1 << (need - 1).bit_length()


def engine_ops(llm: LLM, shape: str, cfg: Config) -> tuple[list[dict], list[dict], bool]:
    """Engine ops on the idle engine: every chunk size for one layer, every layer count at the engine's chunk
    size. Returns (op rows, group rows, whether every copied byte matched its host copy)."""
    nb = {"int4": llm.layout.head_bytes, "fp16": llm.layout.region_bytes}
    num = llm.spec.num_layers
    sr.idle_morphs(llm, middle_block(num, 1), 2)  # untimed: first-use costs out of the measurement
    ops, groups, exact = [], [], True
    for chunk in cfg.chunk_bytes:
        llm.configure_copies(swap_mode="side", copy_chunk_bytes=chunk)
        for k in (cfg.layer_counts if chunk == cfg.engine_chunk_bytes else (1,)):
            layers = middle_block(num, k)
            o, g = sr.idle_morphs(llm, layers, repeats_for(cfg, engine_op_s(nb, k)))
            tag = {"shape": shape, "chunk_bytes": chunk}
            ops += [{**tag, **r} for r in o]
            groups += [{**tag, **r} for r in g]
            llm.swap(layers, wait=True)  # a last swap left in place: are the heads the host's INT4 bytes?
            exact &= sr.arena_matches_host(llm, layers, "int4")
            llm.restore(wait=True)
            exact &= sr.arena_matches_host(llm, layers, "fp16")
    llm.configure_copies(copy_chunk_bytes=cfg.engine_chunk_bytes)
    return ops, groups, exact


def raw_copies(llm: LLM, shape: str, cfg: Config, first_shape: bool) -> tuple[list[dict], bool]:
    """Raw copies (module doc): one row per condition (its statistics and samples), and whether every copy
    was exact."""
    llm.reset()
    plans = raw_plans(llm, cfg, first_shape)
    timer = CopyTimer(llm.device, llm.copies.stream)
    nbytes = {k: sum(dst.numel() for dst, _ in p) for k, p in plans.items()}
    bw = {"pinned": H2D_PINNED, "pageable": H2D_PAGEABLE}
    repeats = {k: repeats_for(cfg, nbytes[k] / bw[k[2]]) for k in plans}
    samples = time_plans(timer, plans, repeats, warmup=2, seed=cfg.seed)
    exact = plans_exact(plans, llm.copies.stream)
    pinned = {k: all(src.is_pinned() for _, src in p) for k, p in plans.items()}
    rows = [{"shape": shape, "payload": p, "packing": pk, "memory": mem, "host_pinned": pinned[(p, pk, mem, k)],
             "layers": k if pk != "ceiling" else 1, "bytes": nbytes[(p, pk, mem, k)], "copies": len(plans[(p, pk, mem, k)]),
             **stats(v, nbytes[(p, pk, mem, k)])} for (p, pk, mem, k), v in samples.items()]
    del plans
    return rows, exact


# ----------------------------------------------------------------------------- decode contention
def contention(llm: LLM, cfg: Config, iso_gbs: dict) -> tuple[list[dict], list[dict], dict]:
    """One run per (batch, chunk size, pacing): ``pairs`` swaps and restores of the middle layer, one every
    ``gap`` steps. Returns (one row per setting, every op, the runs of the middle batch at the engine's chunk
    size, for the timeline: {pace: {"steps", "ops"}})."""
    layer = middle_block(llm.spec.num_layers, 1)[0]
    llm.precapture([layer])
    rows, ops, timeline = [], [], {}
    n = cfg.decode_steps
    shown = cfg.decode_batches[len(cfg.decode_batches) // 2]
    for b in cfg.decode_batches:
        prompts = sr.random_prompts(llm.spec.vocab, b, cfg.prompt_len, cfg.seed + b)
        for chunk in cfg.chunk_bytes:
            for pace in cfg.paces:
                llm.configure_copies(swap_mode="side", copy_chunk_bytes=chunk, copy_pace=pace)
                events = [sr.Event(i * cfg.gap, "int4" if i % 2 == 0 else "fp16", (layer,),
                                   "swap" if i % 2 == 0 else "restore") for i in range(2 * cfg.pairs)]
                run = sr.decode_run(llm, prompts, n, events, cfg.warmup)
                tag = {"batch": b, "chunk_bytes": chunk, "pace": pace_label(pace)}
                rows.append({**tag, **contention_row(run, n, iso_gbs[chunk])})
                ops += [{**tag, **{k: v for k, v in o.items() if k != "chunks"}} for o in run["ops"]]
                if b == shown and chunk == cfg.engine_chunk_bytes:
                    timeline[pace_label(pace)] = {"batch": b, "chunk_bytes": chunk, "steps": run["steps"], "ops": run["ops"]}
    llm.configure_copies(copy_chunk_bytes=cfg.engine_chunk_bytes, copy_pace=EngineConfig().copy_pace)
    return rows, ops, timeline


def contention_row(run: dict, n: int, iso_gbs: dict) -> dict:
    """What one contention run says: slowdown of the overlapped steps (95 % interval over events), commit
    stalls, each op's chunk bandwidth against the idle engine's for the same kind of op, latencies."""
    steps = run["steps"]
    base = sr.baselines(steps)
    in_window = set(sr.timed(steps, n))
    kind = {e["event"]: e["to"] for e in run["events"]}
    out = {"valid": run["valid"], "problems": run["problems"], "graph_share": run["graph_share"],
           "quiet_step_ms": sr.median([s["ms"] for k, s in enumerate(steps) if k in in_window and sr.quiet(s)])}
    for name, to in (("", None), ("swap_", "int4"), ("restore_", "fp16")):
        d = sr.slowdown([run], n, None if to is None else (lambda s, ev, r, to=to: kind.get(ev) == to))
        out[f"{name}slowdown"], out[f"{name}slowdown_ci95"], out[f"{name}overlapped_steps"] = d["value"], d["ci95"], d["steps"]
    stalls = sr.commit_stalls(steps, base)
    out["commit_stall_ms"] = sr.median([s["stall_ms"] for s in stalls])
    for to, name in (("int4", "swap"), ("fp16", "restore")):
        mine = [o for o in run["ops"] if o["to"] == to]
        ratios = [sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) / iso_gbs[to] for o in mine if o["copy_ms"]]
        out[f"{name}_bw_vs_isolated"] = sr.median(ratios)
        out[f"{name}_gbs"] = sr.median([sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) for o in mine])
        out[f"{name}_effective_gbs"] = sr.median([sr.bandwidth_gbs(o["bytes"], o["span_ms"]) for o in mine])
        out[f"{name}_to_use_ms"] = sr.median([e["latency_ms"] for e in run["events"] if e["to"] == to])
        out[f"{name}_host_ms"] = sr.median([o["host_ms"] for o in mine])
    both = [sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) / iso_gbs[o["to"]] for o in run["ops"] if o["copy_ms"]]
    out["bw_vs_isolated"] = sr.median(both)
    out["events"], out["dropped_events"] = len(run["events"]), len(run["dropped_events"])
    return out


# ----------------------------------------------------------------------------- verdicts and headline
SLOWDOWN_TARGET, BW_TARGET = 0.03, 0.90  # the targets, fixed before any measurement
FASTER = 1.05  # "faster": median time ratio beyond 5 %
JITTER_FACTOR, JITTER_POINTS = 2.0, 0.01  # "less jitter": half the relative P99 spread, and at least 1 point less


def verdict_faster(many: dict, one: dict, what: str) -> str:
    r = many["median_ms"] / one["median_ms"]
    if r >= FASTER:
        return f"holds: {what} take {r:.2f}x the time of one copy"
    if r <= 1 / FASTER:
        return f"reversed: {what} take {r:.2f}x the time of one copy (faster)"
    return f"no practical difference: {what} take {r:.3f}x the time of one copy (within {FASTER - 1:.0%})"


def verdict_jitter(many: dict, one: dict, what: str) -> str:
    a, b = one["jitter"], many["jitter"]
    text = f"P99 / median - 1: one copy {a:.1%}, {what} {b:.1%}"
    if b >= JITTER_FACTOR * a and b - a >= JITTER_POINTS:
        return f"holds: {text}"
    if a >= JITTER_FACTOR * b and a - b >= JITTER_POINTS:
        return f"reversed: {text}"
    return f"no practical difference: {text}"


def choose_setting(rows: list[dict]) -> dict | None:
    """The fastest copy setting at which the contention vanishes: every batch meets both targets (slowdown of
    the overlapped steps <= 3 %, chunk bandwidth >= 0.90 of the idle engine's); the highest pace wins
    (unpaced highest), then the larger chunk. None when no setting meets them."""
    good = []
    for key in sorted({(r["chunk_bytes"], r["pace"]) for r in rows}):
        mine = [r for r in rows if (r["chunk_bytes"], r["pace"]) == key]
        if all(r["valid"] and r["slowdown"] is not None and r["slowdown"] <= SLOWDOWN_TARGET
               and r["bw_vs_isolated"] is not None and r["bw_vs_isolated"] >= BW_TARGET for r in mine):
            good.append(key)
    if not good:
        return None
    rank = lambda key: (float("inf") if key[1] == "unpaced" else float(key[1]), key[0])  # noqa: E731
    chunk, pace = max(good, key=rank)
    return {"chunk_bytes": chunk, "pace": pace}


def fig(value, unit: str, label: str, **extra) -> dict:
    return {"value": value, "unit": unit, "label": label, **extra}


def target(value, cmp: str, goal: float, judged: bool) -> dict:
    """The target and whether it was met (None: not judged: an invalid run, or not on a GPU)."""
    met = None if value is None or not judged else bool(value <= goal if cmp == "<=" else value >= goal)
    return {"target": f"{cmp} {goal:g}", "met": met}


def headline(engine: str, op_stats: list[dict], group_stats: list[dict], raw_rows: list[dict], cont: list[dict],
             cfg: Config, exact: bool, cuda: bool, graphs: bool) -> dict:
    shape = cfg.shapes[0]
    valid = all(r["valid"] for r in cont)
    judged = valid and cuda
    problems = sorted({p for r in cont for p in r["problems"]})
    op = {(r["shape"], r["to"], r["layers"], r["chunk_bytes"]): r for r in op_stats}
    raw = {(r["shape"], r["payload"], r["packing"], r["memory"], r["layers"]): r for r in raw_rows}
    grp = {(r["shape"], r["to"], r["layers"], r["chunk_bytes"]): r for r in group_stats}
    chosen = choose_setting(cont)
    default = EngineConfig().copy_pace
    at = chosen or {"chunk_bytes": cfg.engine_chunk_bytes,
                    "pace": pace_label(default if default in cfg.paces else cfg.paces[0])}
    mine = [r for r in cont if (r["chunk_bytes"], r["pace"]) == (at["chunk_bytes"], at["pace"])]
    worst = lambda key, fn: fn([r[key] for r in mine if r[key] is not None], default=None)  # noqa: E731
    where = setting_text(at["chunk_bytes"], at["pace"]) + ("" if chosen else "; no setting met both targets")
    bw, slow, use = worst("bw_vs_isolated", min), worst("slowdown", max), worst("swap_to_use_ms", max)
    ec, k1, kmax = cfg.engine_chunk_bytes, 1, max(cfg.layer_counts)
    swap1, rest1 = op[(shape, "int4", k1, ec)], op[(shape, "fp16", k1, ec)]
    ceiling = [r for r in raw_rows if r["shape"] == shape and r["packing"] == "ceiling"]
    pin1 = {p: raw[(shape, p, "layer", "pinned", 1)] for p in PAYLOADS}
    pg = {p: raw.get((shape, p, "layer", "pageable", 1)) for p in PAYLOADS}
    smallest = min(cfg.chunk_bytes)
    out = {
        "engine": engine, "shape": shape, "valid": valid, "invalid_because": problems, "targets_judged": judged,
        "cuda_graphs": graphs, "copy_setting_read": {**at, "chosen": chosen is not None},
        "timer": "CUDA events" if cuda else "host wall clock and host timestamps (CPU: memcpy, no PCIe)",
        "copy_bw_under_decode_vs_isolated": fig(bw, "x", f"Chunk bandwidth of a swap/restore while decoding / on the "
                                                f"idle engine, worst batch ({where})", **target(bw, ">=", BW_TARGET, judged)),
        "decode_slowdown_during_copy": fig(slow, "", f"Slowdown of the decode steps a copy overlapped, worst batch "
                                           f"({where})", **target(slow, "<=", SLOWDOWN_TARGET, judged)),
        "swap_to_use_ms": fig(use, " ms", f"One-layer swap, request to the end of the first step that computes in "
                              f"INT4 with it, worst batch ({where})"),
        "chosen_copy_setting": chosen,
        "int4_layer_copy_ms": fig(swap1["median_ms"], " ms", f"Engine op: one layer's INT4 head, idle engine, "
                                  f"{size_text(ec)} chunks (median span)", p99_ms=swap1["p99_ms"], n=swap1["n"]),
        "fp16_layer_copy_ms": fig(rest1["median_ms"], " ms", f"Engine op: one layer's 16-bit region (a restore), idle "
                                  f"engine (median span)", p99_ms=rest1["p99_ms"], n=rest1["n"]),
        f"swap_{kmax}_layers_ms": fig(grp[(shape, "int4", kmax, ec)]["median_ms"], " ms",
                                      f"Engine op: swap of {kmax} layers on the idle engine, request to last commit (median wall)"),
        f"restore_{kmax}_layers_ms": fig(grp[(shape, "fp16", kmax, ec)]["median_ms"], " ms",
                                         f"Engine op: restore of {kmax} layers on the idle engine (median wall)"),
        "pinned_ceiling_gbps": fig(max((r["gbps"] for r in ceiling), default=None), " GB/s",
                                   "Raw copy: one contiguous pinned copy, best size (the ceiling)"),
        "pinned_layer_gbps": fig(pin1["fp16"]["gbps"], " GB/s", "Raw copy: one 16-bit layer region, pinned"),
        "pageable_layer_gbps": fig(pg["fp16"]["gbps"] if pg["fp16"] else None, " GB/s",
                                   "Raw copy: one 16-bit layer region, pageable host memory"),
        "copies_bitwise_exact": exact,
    }
    for p in PAYLOADS:
        many, one = raw[(shape, p, "tensor", "pinned", 1)], pin1[p]
        chunks = op[(shape, p, 1, smallest)]
        out[f"verdict_packed_faster_{p}"] = verdict_faster(many, one, f"{many['copies']} per-tensor copies")
        out[f"verdict_less_jitter_{p}"] = verdict_jitter(many, one, "per-tensor copies")
        out[f"verdict_packed_faster_than_chunks_{p}"] = verdict_faster(
            chunks, one, f"the engine's {smallest // 1024} KiB chunks ({chunks['chunks']} copies, idle engine)")
    return out


def op_statistics(ops: list[dict]) -> list[dict]:
    """Per (shape, kind, layers, chunk size): the distribution of an op's copy span (device ms)."""
    out = []
    for key in sorted({(o["shape"], o["to"], o["layers"], o["chunk_bytes"]) for o in ops}):
        mine = [o for o in ops if (o["shape"], o["to"], o["layers"], o["chunk_bytes"]) == key]
        nbytes = mine[0]["bytes"]
        out.append({"shape": key[0], "to": key[1], "layers": key[2], "chunk_bytes": key[3], "bytes": nbytes,
                    "chunks": mine[0]["chunks"], **stats([o["span_ms"] for o in mine], nbytes),
                    "copy_gbps": sr.median([sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) for o in mine]),
                    "commit_ms": sr.median([o["commit_ms"] for o in mine]),
                    "host_ms": sr.median([o["host_ms"] for o in mine])})
    return out


def group_statistics(groups: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(g["shape"], g["to"], g["layers"], g["chunk_bytes"]) for g in groups}):
        mine = [g for g in groups if (g["shape"], g["to"], g["layers"], g["chunk_bytes"]) == key]
        out.append({"shape": key[0], "to": key[1], "layers": key[2], "chunk_bytes": key[3], "bytes": mine[0]["bytes"],
                    **stats([g["wall_ms"] for g in mine], mine[0]["bytes"])})
    return out


def isolated_gbs(op_stats: list[dict], shape: str) -> dict:
    """{chunk: {"int4": GB/s, "fp16": GB/s}}: one-layer ops on the idle engine (chunks' device time)."""
    out: dict = {}
    for r in op_stats:
        if r["shape"] == shape and r["layers"] == 1:
            out.setdefault(r["chunk_bytes"], {})[r["to"]] = r["copy_gbps"]
    return out


# ----------------------------------------------------------------------------- the experiment
def run(cfg: Config) -> Result:
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    if cfg.profile == "gpu" and device.type != "cuda":
        raise MorphError("profile 'gpu' measures host-to-GPU copies on the engine and needs a CUDA GPU; "
                         "use profile='cpu' for the labelled CPU run")
    steps_plan = plan(cfg)
    total = sum(r["seconds"] for r in steps_plan)
    print(f"transfer plan: {len(steps_plan)} measurements, estimated {total:.0f} s of device time on an H200 "
          f"(limit {cfg.time_limit_s:.0f} s)")
    if total > cfg.time_limit_s:
        raise MorphError(f"the plan is estimated at {total:.0f} s, over time_limit_s={cfg.time_limit_s:.0f}: "
                         "lower repeats or condition_s, or drop a shape")
    with Stopwatch() as sw, cpu_threads(device):
        threads = torch.get_num_threads()
        ops, groups, raw_rows, exact, engine, graphs, cont = [], [], [], True, "", False, None
        for si, shape in enumerate(cfg.shapes):
            llm = build_engine(shape, cfg, device, decode=si == 0)
            sw.lap(f"{shape}: engine")
            o, g, ok = engine_ops(llm, shape, cfg)
            ops, groups, exact = ops + o, groups + g, exact and ok
            sw.lap(f"{shape}: engine ops")
            rows, ok = raw_copies(llm, shape, cfg, si == 0)
            raw_rows, exact = raw_rows + rows, exact and ok
            sw.lap(f"{shape}: raw copies")
            if si == 0:
                engine, graphs = sr.engine_text(llm), llm.runner.use_graphs
                cont = contention(llm, cfg, isolated_gbs(op_statistics(o), shape))
                sw.lap(f"{shape}: decode contention")
            llm.close()
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        op_stats, group_stats = op_statistics(ops), group_statistics(groups)
    rows, cont_ops, timeline = cont
    head = headline(engine, op_stats, group_stats, raw_rows, rows, cfg, exact, device.type == "cuda", graphs)
    head["phase_seconds"] = sw.phases
    files = {"engine_ops.json": op_stats, "engine_groups.json": group_stats, "raw_copies.json": raw_rows,
             "contention.json": rows, "contention_ops.json": cont_ops, "timeline.json": timeline, "plan.json": steps_plan}
    params = as_params(cfg, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       threads=threads, plan_seconds=total)
    return Result(params, head, files, sw.seconds)
