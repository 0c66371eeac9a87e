"""Chapter 3: host -> device copies of whole decoder layers into real weight storage.

A :class:`LayerSlab` holds one precision (FP16 or INT4) of every decoder layer twice, with the same
byte layout: in one host buffer (pinned when CUDA is used) and in one device buffer. The model's
tensors (linear weights, or the INT4 twins' buffers) are *views* into the device buffer, so a copy
lands in the storage the model computes with. A layer's tensors are adjacent (256-byte aligned),
and so are the layers, in order.

``copy_to_device(layers, packing)`` copies the given layers with one of three packings:

* ``"tensor"``: one copy per tensor (7 weights per FP16 layer; 14 buffers per INT4 layer);
* ``"layer"``:  one copy per layer (its tensors are one contiguous range in both buffers);
* ``"run"``:    one copy per run of adjacent layers (a contiguous block of k layers is one copy).

On CUDA every copy is one ``cudaMemcpyAsync`` from pinned memory on the given stream. Without CUDA
the same code copies between two host buffers (a memcpy: no PCIe is involved), timed by wall clock.

``run(Config.for_profile("gpu"))`` times, for each model shape, payload (FP16 / INT4) and layer count,
a middle block and the same number of spread-out layers with each packing, plus the ceiling (one big
contiguous copy at several sizes), and checks that the copied bytes equal the host bytes. The gpu
profile needs CUDA; the cpu profile is the labelled CPU fallback (host memcpy).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, cpu_threads, int_tuple
from morphlib.errors import MorphError
from morphlib.models import layer_linears, resolve_device
from morphlib.quant.int4 import Int4Linear
from morphlib.select.layersets import middle_block, runs, spread
from morphlib.shapes import shape_config, shape_layer_bytes

ALIGN = 256
PACKINGS = ("tensor", "layer", "run")
PAYLOADS = ("fp16", "int4")
DEVICES = ("auto", "cuda", "cpu")

DEFAULTS = {"gpu": dict(shapes=("tinyllama-1.1b", "llama-2-7b"), repeats=40, warmup=3,
                        ceiling_mb=(1, 4, 16, 64, 256, 1024)),
            "cpu": dict(shapes=("smollm2-135m",), repeats=10, warmup=2, ceiling_mb=(1, 4, 16, 64))}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# ----------------------------------------------------------------------------- the slab
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # byte offset in the slab
    nbytes: int


class LayerSlab:
    """One host buffer and one device buffer with identical layouts; tensors are views into them."""

    def __init__(self, layouts: list[dict[str, tuple[tuple[int, ...], torch.dtype]]], device="cpu",
                 pin: bool | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MorphError("a CUDA slab was asked for but no CUDA GPU is available here")
        self.specs: list[dict[str, TensorSpec]] = []
        self.ranges: list[tuple[int, int]] = []  # byte range [start, end) of each layer
        offset = 0
        for layout in layouts:
            start, specs = offset, {}
            for name, (shape, dtype) in layout.items():
                nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
                specs[name] = TensorSpec(name, tuple(shape), dtype, offset, nbytes)
                offset = _align(offset + nbytes)
            self.specs.append(specs)
            self.ranges.append((start, offset))
        self.nbytes = offset
        pin = self.device.type == "cuda" if pin is None else pin
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.device_buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        if pin and not self.host.is_pinned():
            raise MorphError("the host buffer could not be pinned")

    @classmethod
    def from_tensors(cls, tensors: list[dict[str, torch.Tensor]], device="cpu", pin: bool | None = None) -> "LayerSlab":
        """A slab holding copies of ``tensors`` (one dict per layer), on host and device."""
        slab = cls([{n: (tuple(t.shape), t.dtype) for n, t in layer.items()} for layer in tensors], device, pin)
        for li, layer in enumerate(tensors):
            for name, t in layer.items():
                slab.view(li, name, host=True).copy_(t)
        slab.device_buffer.copy_(slab.host)
        return slab

    num_layers = property(lambda self: len(self.specs))

    def _view(self, buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        return buf[spec.offset:spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)

    def view(self, layer: int, name: str, host: bool = False) -> torch.Tensor:
        """The tensor ``name`` of ``layer``, as a view into the device (or host) buffer."""
        self._check([layer])
        return self._view(self.host if host else self.device_buffer, self.specs[layer][name])

    def payload_bytes(self, layers) -> int:
        """Bytes of the tensors themselves (no alignment padding)."""
        return sum(s.nbytes for li in self._check(layers) for s in self.specs[li].values())

    def _check(self, layers) -> list[int]:
        out = [int(li) for li in layers]
        for li in out:
            if not 0 <= li < self.num_layers:
                raise MorphError(f"layer {li} is out of range: the slab holds {self.num_layers} layers (0..{self.num_layers - 1})")
        return out

    def plan(self, layers, packing: str = "layer") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (device destination, host source) pairs that copy ``layers`` with ``packing``."""
        layers = sorted(self._check(layers))
        if len(set(layers)) != len(layers):
            raise MorphError(f"duplicate layer indices in {layers}")
        if packing == "tensor":
            return [(self._view(self.device_buffer, s), self._view(self.host, s))
                    for li in layers for s in self.specs[li].values()]
        if packing == "layer":
            spans = [self.ranges[li] for li in layers]
        elif packing == "run":
            spans = [(self.ranges[a][0], self.ranges[b][1]) for a, b in runs(layers)]
        else:
            raise MorphError(f"unknown packing {packing!r}: use one of {PACKINGS}")
        return [(self.device_buffer[a:b], self.host[a:b]) for a, b in spans]

    def copy_to_device(self, layers=None, packing: str = "layer", stream=None) -> int:
        """Copy ``layers`` (default all) host -> device; asynchronous on ``stream`` when CUDA. Returns the copy count."""
        if stream is not None and self.device.type != "cuda":
            raise MorphError("a CUDA stream was given but the slab is not on a CUDA device")
        return run_plan(self.plan(range(self.num_layers) if layers is None else layers, packing), stream)

    def matches_host(self, layers=None) -> bool:
        """True when the device bytes of every tensor of ``layers`` equal the host bytes exactly."""
        layers = range(self.num_layers) if layers is None else self._check(layers)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        spans = [(s.offset, s.offset + s.nbytes) for li in layers for s in self.specs[li].values()]
        return all(torch.equal(self.device_buffer[a:b], self.host[a:b].to(self.device)) for a, b in spans)


def run_plan(plan, stream=None) -> int:
    """Issue the copies of a plan (non-blocking on CUDA; on ``stream`` when given, else the current stream)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for dst, src in plan:
            dst.copy_(src, non_blocking=dst.is_cuda)
    return len(plan)


# ----------------------------------------------------------------------------- a model in slabs
@dataclass
class SlabModel:
    """The decoder layers of a built-in shape whose linear weights (FP16 slab) and INT4 twins
    (INT4 slab) live in slabs. Norms and embeddings are not materialised (they are never swapped)."""

    shape: str
    layers: nn.ModuleList
    fp16: LayerSlab
    int4: LayerSlab
    twins: list[dict[str, Int4Linear]] = field(repr=False)

    def slab(self, payload: str) -> LayerSlab:
        if payload not in PAYLOADS:
            raise MorphError(f"unknown payload {payload!r}: use one of {PAYLOADS}")
        return {"fp16": self.fp16, "int4": self.int4}[payload]

    @classmethod
    @torch.no_grad()
    def build(cls, shape: str, device="cpu", group_size: int = 64, seed: int = 0) -> "SlabModel":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        device = torch.device(device)
        config = LlamaConfig(**shape_config(shape))
        with torch.device("meta"):
            layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        names = list(layer_linears(layers[0]))
        fp16 = LayerSlab([{n: (tuple(lin.weight.shape), torch.bfloat16) for n, lin in layer_linears(layer).items()}
                          for layer in layers], device)
        gen = torch.Generator(device=device).manual_seed(seed)
        fp16.device_buffer.view(torch.bfloat16).normal_(0.0, 0.02, generator=gen)  # random weights, as synthetic_model
        fp16.host.copy_(fp16.device_buffer)
        twins, int4_tensors = [], []
        for li, layer in enumerate(layers):
            lins = layer_linears(layer)
            for name in names:  # the model's weights ARE views into the device slab
                lins[name].weight = nn.Parameter(fp16.view(li, name), requires_grad=False)
            layer_twins = {n: Int4Linear.from_weight(lins[n].weight, group_size=group_size, name=f"layer {li} {n}")
                           for n in names}
            twins.append(layer_twins)
            int4_tensors.append({f"{n}.{b}": layer_twins[n]._buffers[b] for n in names for b in ("packed", "scale_zero")})
        int4 = LayerSlab.from_tensors(int4_tensors, device)
        del int4_tensors
        for li, n, b in ((li, n, b) for li in range(len(twins)) for n in names for b in ("packed", "scale_zero")):
            twins[li][n]._buffers[b] = int4.view(li, f"{n}.{b}")  # the twins' buffers: views into the INT4 slab
        return cls(shape, layers, fp16, int4, twins)


# ----------------------------------------------------------------------------- the experiment
@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    shapes: tuple[str, ...] = ("tinyllama-1.1b", "llama-2-7b")  # built-in shapes (random weights); headline: the last
    layer_counts: tuple[int, ...] = (1, 2, 4, 8)
    group_size: int = 64  # INT4 group size of the INT4 payload
    repeats: int = 40  # timed rounds (every condition once per round, random order)
    warmup: int = 3  # untimed rounds first
    ceiling_mb: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)  # sizes of the one-big-copy ceiling (those that fit)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else the CPU fallback; or "cuda" / "cpu"

    def __post_init__(self):
        shapes = tuple(self.shapes) if isinstance(self.shapes, (list, tuple)) else (self.shapes,)
        if not shapes:
            raise MorphError("shapes must name at least one model shape")
        for s in shapes:
            shape_config(s)  # a one-line error naming the built-in shapes
        counts = int_tuple("layer_counts", self.layer_counts, distinct=True)
        for s in shapes:
            n = shape_config(s)["num_hidden_layers"]
            if max(counts) > n:
                raise MorphError(f"layer count {max(counts)} is larger than {s}'s {n} layers")
        self.check_counts("group_size", "repeats")
        self.check_counts("warmup", lo=0)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "layer_counts", counts)
        object.__setattr__(self, "ceiling_mb", int_tuple("ceiling_mb", self.ceiling_mb))
        if self.device not in DEVICES:
            raise MorphError(f"device {self.device!r} is not supported: use {', '.join(map(repr, DEVICES))}")


class CopyTimer:
    """Times one plan: CUDA events around the copies on a side stream, or wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.label = "CUDA events, pinned host -> device" if self.cuda else "wall clock, host memcpy (CPU fallback)"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, plan) -> float:
        """Milliseconds of one execution of ``plan``."""
        if self.cuda:
            torch.cuda.synchronize()  # nothing else in flight (e.g. a zero_ on the default stream)
            self.start.record(self.stream)
            run_plan(plan, self.stream)
            self.end.record(self.stream)
            self.end.synchronize()
            return float(self.start.elapsed_time(self.end))
        t0 = time.perf_counter()
        run_plan(plan)
        return (time.perf_counter() - t0) * 1e3


def _interleaved(timer: CopyTimer, plans: dict, repeats: int, warmup: int, seed: int) -> dict:
    """Run every plan once per round, in a fresh random order each round (so drift hits all alike)."""
    rng, keys = np.random.default_rng(seed), list(plans)
    samples = {k: [] for k in keys}
    for r in range(warmup + repeats):
        for i in rng.permutation(len(keys)):
            ms = timer(plans[keys[i]])
            if r >= warmup:
                samples[keys[i]].append(ms)
    return {k: np.asarray(v) for k, v in samples.items()}


def _stats(ms: np.ndarray, nbytes: int) -> dict:
    med = float(np.median(ms))
    return {"median_ms": med, "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "n": int(ms.size), "gbps": nbytes / (med * 1e-3) / 1e9}


def measure_ceiling(slab: LayerSlab, timer: CopyTimer, sizes_mb, repeats: int, warmup: int, seed: int) -> list[dict]:
    """One contiguous copy of the first N MB of a slab, for each size that fits."""
    sizes = [mb << 20 for mb in sizes_mb if (mb << 20) <= slab.nbytes] or [slab.nbytes]
    plans = {n: [(slab.device_buffer[:n], slab.host[:n])] for n in sizes}
    samples = _interleaved(timer, plans, repeats, warmup, seed)
    return [{"bytes": n, "mb": n / 2**20, **_stats(samples[n], n)} for n in sizes]


def measure_shape(sm: SlabModel, timer: CopyTimer, cfg: Config) -> list[dict]:
    """The 2x2(x3) design for one shape: payload x layer count x contiguity x packing."""
    num = len(sm.layers)
    plans, meta = {}, {}
    for payload in PAYLOADS:
        slab = sm.slab(payload)
        for k in cfg.layer_counts:
            sets = {"block": middle_block(num, k)}
            if k > 1:  # one layer is one layer: there is no scattered variant
                sets["scattered"] = spread(num, k)
            for contiguity, layers in sets.items():
                for packing in PACKINGS:
                    key = (payload, k, contiguity, packing)
                    plans[key] = slab.plan(layers, packing)
                    meta[key] = {"shape": sm.shape, "payload": payload, "layers": k, "contiguity": contiguity,
                                 "packing": packing, "copies": len(plans[key]), "bytes": slab.payload_bytes(layers),
                                 "layer_ids": " ".join(map(str, layers))}
    for payload in PAYLOADS:  # the device copies start empty, so the exactness check means something
        sm.slab(payload).device_buffer.zero_()
    samples = _interleaved(timer, plans, cfg.repeats, cfg.warmup, cfg.seed)
    return [{**meta[key], **_stats(ms, meta[key]["bytes"])} for key, ms in samples.items()]


def _median(rows, **where) -> float:
    hits = [r["median_ms"] for r in rows if all(r[k] == v for k, v in where.items())]
    if len(hits) != 1:
        raise MorphError(f"expected one timing for {where}, found {len(hits)}")
    return hits[0]


def headline(timings: list[dict], ceiling_gbps: float, timer: str, fallback: bool, exact: bool, shape: str,
             counts: tuple[int, ...]) -> dict:
    """Key figures for ``shape``; every ratio is (time of the second-named variant) / (time of the first)."""
    rows = [r for r in timings if r["shape"] == shape]
    lo, hi = min(counts), max(counts)
    t = lambda p, k, c="block", pk="layer": _median(rows, payload=p, layers=k, contiguity=c, packing=pk)  # noqa: E731
    fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
    n = lambda k: f"{k}_layer" + ("s" if k > 1 else "")  # noqa: E731
    big = next(r for r in rows if (r["payload"], r["layers"], r["contiguity"], r["packing"]) == ("fp16", hi, "block", "layer"))
    out = {"shape": shape, "timer": timer,
           "ceiling_gbps": fig(ceiling_gbps, " GB/s", "One big memcpy (CPU fallback ceiling)" if fallback
                               else "One big pinned host-to-device copy (ceiling)"),
           "fp16_layer_ms": fig(t("fp16", lo), " ms", f"FP16 copy of {lo} layer, median"),
           "int4_layer_ms": fig(t("int4", lo), " ms", f"INT4 copy of {lo} layer, median"),
           f"fp16_{n(hi)}_gbps": fig(big["gbps"], " GB/s", f"FP16, {hi} layers, one copy per layer"),
           f"fp16_{n(hi)}_p99_ms": fig(big["p99_ms"], " ms", f"FP16, {hi} layers, one copy per layer, p99")}
    for p in PAYLOADS:
        for k in sorted({lo, hi}):
            out[f"packed_vs_pertensor_speedup_{p}_{n(k)}"] = fig(
                t(p, k, pk="tensor") / t(p, k), "x", f"{p.upper()}, {k} layer(s): one copy per tensor / per layer")
        if hi > 1:
            out[f"scattered_vs_block_ratio_{p}_{n(hi)}"] = fig(
                t(p, hi, c="scattered") / t(p, hi), "x", f"{p.upper()}, {hi} layers: scattered / block (same copies)")
            out[f"block_one_copy_speedup_{p}_{n(hi)}"] = fig(
                t(p, hi) / t(p, hi, pk="run"), "x", f"{p.upper()}, {hi}-layer block: one copy per layer / one copy")
    out["copies_bitwise_exact"] = exact
    return out


def run(cfg: Config) -> Result:
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    if cfg.profile == "gpu" and device.type != "cuda":
        raise MorphError("profile 'gpu' measures host-to-GPU copies and needs a CUDA GPU; "
                         "use profile='cpu' for the labelled CPU fallback")
    with Stopwatch() as sw, cpu_threads(device):
        threads = torch.get_num_threads()
        timer = CopyTimer(device)
        timings, ceiling, layer_bytes, exact = [], [], [], True
        for shape in cfg.shapes:
            sm = SlabModel.build(shape, device, cfg.group_size, cfg.seed)
            expected = shape_layer_bytes(shape, cfg.group_size)
            got = {"fp16": sm.fp16.payload_bytes([0]), "int4": sm.int4.payload_bytes([0])}
            if got["fp16"] != expected["fp16_bytes"] or got["int4"] != expected["int4_bytes"]:
                raise MorphError(f"{shape}: slab bytes per layer {got} differ from shape_layer_bytes {expected}")
            layer_bytes.append({"shape": shape, "layers": len(sm.layers), "fp16_bytes": got["fp16"],
                                "int4_bytes": got["int4"], "int4_ratio": got["int4"] / got["fp16"]})
            rows = measure_shape(sm, timer, cfg)
            copied = sorted({int(i) for r in rows for i in r["layer_ids"].split()})
            exact &= sm.fp16.matches_host(copied) and sm.int4.matches_host(copied)
            if not ceiling:  # measured once, on the first shape's FP16 slab (the buffers themselves don't matter)
                ceiling = measure_ceiling(sm.fp16, timer, cfg.ceiling_mb, cfg.repeats, cfg.warmup, cfg.seed)
            timings += rows
            del sm
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ceiling_gbps = max(ceiling, key=lambda r: r["bytes"])["gbps"]
        for r in timings:
            r["ceiling_ratio"] = r["gbps"] / ceiling_gbps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = headline(timings, ceiling_gbps, timer.label, not timer.cuda, exact, cfg.shapes[-1], cfg.layer_counts)
    files = {"timings.json": timings, "ceiling.json": ceiling, "layer_bytes.json": layer_bytes}
    return Result(as_params(cfg, device=name, threads=threads), head, files, sw.seconds)
