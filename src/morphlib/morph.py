"""Per-layer precision state of a loaded model: swap decoder layers to INT4 and back, in place.

    morpher = prepare_morphing(model, QuantConfig(group_size=64, method="awq"), calibration=ids)
    report = morpher.swap([10, 11, 12])      # those layers now run on packed INT4 weights
    report.freed_bytes                       # 16-bit weight bytes released on the device
    morpher.restore()                        # bitwise-identical 16-bit weights again

How it works. Every linear of every decoder layer gets an ``Int4Linear`` twin, quantized once.
On CUDA the 16-bit weights and the INT4 twins wait in pinned host memory; a swap copies the INT4
bytes to the device, points the layer at the twin and drops the 16-bit device tensor (the memory
returns to PyTorch's allocator: that is the memory a serving engine can give to its KV cache);
a restore copies the 16-bit bytes back. On CPU the "device" is host memory, so a swap only
re-points modules and the reported bytes are the weight bytes the layer holds.

Swaps happen between forward passes. ``swap``/``restore`` accept a CUDA ``stream``: copies are then
enqueued on that stream with ``non_blocking=True`` and the report carries an event; call
``report.wait()`` (makes the current stream wait) before the next forward pass that uses the layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from morphlib.assets import cache_dir
from morphlib.awq import awq_scales
from morphlib.errors import MorphError, check_int
from morphlib.producer import producing, reuse, stale_reason, versions
from morphlib.quant.int4 import Int4Linear, check_group_size
from morphlib.structure import check_layers, decoder_layers, layer_linears


@dataclass(frozen=True)
class QuantConfig:
    group_size: int = 64
    symmetric: bool = False
    method: str = "rtn"  # "rtn" (round to nearest) or "awq" (activation-aware scales)
    awq_grid: int = 20
    awq_tokens: int = 2048

    def __post_init__(self):
        if self.method not in ("rtn", "awq"):
            raise MorphError(f"unknown quantization method {self.method!r}: use 'rtn' or 'awq'")
        check_int("AWQ grid", self.awq_grid)
        check_int("AWQ calibration tokens", self.awq_tokens)

    @property
    def label(self) -> str:
        return f"{self.method.upper()} g{self.group_size} {'sym' if self.symmetric else 'asym'}"


@dataclass
class SwapReport:
    layers: list[int]
    to: str  # "int4" or "fp16"
    fp16_bytes: int  # 16-bit weight bytes of these layers
    int4_bytes: int  # packed INT4 bytes (with scales) of these layers
    seconds: float  # host wall time of the call (copies may still run when a stream is used)
    device_allocated_delta: int | None = None  # measured change of torch.cuda.memory_allocated
    event: object | None = field(default=None, repr=False)

    @property
    def freed_bytes(self) -> int:
        """Device bytes released by this call (negative for a restore)."""
        diff = self.fp16_bytes - self.int4_bytes
        return diff if self.to == "int4" else -diff

    def wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def _parent(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


class Morpher:
    """Holds both precisions of every decoder layer and switches between them (see module doc)."""

    def __init__(self, model: nn.Module, config: QuantConfig = QuantConfig(),
                 scales: dict[int, dict[str, torch.Tensor]] | None = None, progress: bool = True):
        self.model, self.config = model, config
        self.layers = decoder_layers(model)
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self._linear: list[dict[str, nn.Linear]] = []
        self._fp16_host: list[dict[str, torch.Tensor]] = []
        self._int4: list[dict[str, Int4Linear]] = []
        self._int4_host: list[dict[str, dict[str, torch.Tensor]]] = []
        self._state = ["fp16"] * len(self.layers)
        for li, layer in enumerate(tqdm(self.layers, desc=f"quantizing ({config.label})",
                                        disable=not progress, leave=False)):
            lins, hosts, twins, twin_hosts = {}, {}, {}, {}
            for name, lin in layer_linears(layer).items():
                if not isinstance(lin, nn.Linear):
                    raise MorphError(f"layer {li} is already morphed; build the Morpher on a 16-bit model")
                check_group_size(lin.in_features, config.group_size, f"layer {li} {name}")
                s = None if scales is None else scales.get(li, {}).get(name)
                twin = Int4Linear.from_weight(lin.weight, group_size=config.group_size,
                                              symmetric=config.symmetric, bias=lin.bias, input_scale=s,
                                              name=f"layer {li} {name}")
                lins[name], twins[name] = lin, twin
                if self.cuda:  # both precisions wait in pinned host memory
                    hosts[name] = lin.weight.detach().to("cpu").pin_memory()
                    twin_hosts[name] = {k: b.to("cpu").pin_memory() for k, b in twin._buffers.items() if b is not None}
                    for k in twin_hosts[name]:
                        twin._buffers[k] = twin_hosts[name][k]
                else:
                    hosts[name] = lin.weight.data
            self._linear.append(lins)
            self._fp16_host.append(hosts)
            self._int4.append(twins)
            self._int4_host.append(twin_hosts)
        self._bytes = [{"fp16": sum(h.numel() * h.element_size() for h in hosts.values()),
                        "int4": sum(t.nbytes for t in twins.values())}
                       for hosts, twins in zip(self._fp16_host, self._int4)]

    # ------------------------------------------------------------------ state

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def int4_layers(self) -> list[int]:
        return [i for i, s in enumerate(self._state) if s == "int4"]

    def layer_bytes(self, layer: int) -> dict[str, int]:
        """{"fp16", "int4"}: the layer's 16-bit weight bytes and its packed INT4 bytes (with scales)."""
        (layer,) = check_layers(self.model, [layer])
        return dict(self._bytes[layer])

    def freed_bytes(self, layers) -> int:
        """Device bytes that swapping ``layers`` to INT4 frees (16-bit bytes minus INT4 bytes)."""
        return sum(self._bytes[i]["fp16"] - self._bytes[i]["int4"] for i in check_layers(self.model, layers))

    # ------------------------------------------------------------------ switching

    def _measure(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return None

    def _switch(self, layers, to: str, stream=None) -> SwapReport:
        layers = check_layers(self.model, layers)
        if stream is not None and not self.cuda:
            raise MorphError("a CUDA stream was given but the model is not on a CUDA device")
        t0 = time.perf_counter()
        before = self._measure() if stream is None else None
        fp16_bytes = int4_bytes = 0
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for li in layers:
                b = self._bytes[li]
                fp16_bytes, int4_bytes = fp16_bytes + b["fp16"], int4_bytes + b["int4"]
                if self._state[li] == to:
                    continue
                for name, lin in self._linear[li].items():
                    twin = self._int4[li][name]
                    parent, leaf = _parent(self.layers[li], name)
                    if to == "int4":
                        if self.cuda:
                            for k, host in self._int4_host[li][name].items():
                                dev = torch.empty_like(host, device=self.device)
                                dev.copy_(host, non_blocking=True)
                                if stream is not None:
                                    dev.record_stream(compute)
                                twin._buffers[k] = dev
                            lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=self.device)
                        setattr(parent, leaf, twin)
                    else:
                        if self.cuda:
                            host = self._fp16_host[li][name]
                            dev = torch.empty_like(host, device=self.device)
                            dev.copy_(host, non_blocking=True)
                            if stream is not None:
                                dev.record_stream(compute)
                            lin.weight.data = dev
                            for k, hostbuf in self._int4_host[li][name].items():
                                twin._buffers[k] = hostbuf
                        else:
                            lin.weight.data = self._fp16_host[li][name]
                        setattr(parent, leaf, lin)
                self._state[li] = to
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        after = self._measure() if stream is None else None
        delta = None if before is None else after - before
        return SwapReport(layers, to, fp16_bytes, int4_bytes, time.perf_counter() - t0, delta, event)

    def swap(self, layers, *, stream=None) -> SwapReport:
        """Run ``layers`` on INT4 weights from the next forward pass on."""
        return self._switch(layers, "int4", stream)

    def restore(self, layers=None, *, stream=None) -> SwapReport:
        """Back to the exact 16-bit weights (all INT4 layers when ``layers`` is None)."""
        return self._switch(self.int4_layers() if layers is None else layers, "fp16", stream)

    def set_int4(self, layers) -> None:
        """Make exactly ``layers`` INT4 (restoring the others); cheap when the set barely changes."""
        target = set(check_layers(self.model, layers))
        current = set(self.int4_layers())
        if current - target:
            self.restore(sorted(current - target))
        if target - current:
            self.swap(sorted(target - current))

    @contextmanager
    def morphed(self, layers):
        """Context manager: ``layers`` INT4 inside, the previous state restored on exit."""
        previous = self.int4_layers()
        self.set_int4(layers)
        try:
            yield self
        finally:
            self.set_int4(previous)


def prepare_morphing(model: nn.Module, config: QuantConfig = QuantConfig(), calibration: torch.Tensor | None = None,
                     progress: bool = True) -> Morpher:
    """Quantize every decoder layer once (AWQ needs ``calibration`` token ids [n, T]) and return a Morpher."""
    for li, layer in enumerate(decoder_layers(model)):  # validate before any (slow) work
        for name, lin in layer_linears(layer).items():
            check_group_size(lin.in_features, config.group_size, f"layer {li} {name}")
    scales = None
    if config.method == "awq":
        if calibration is None:
            raise MorphError("method 'awq' needs calibration token ids (e.g. corpus.make_windows(...).ids)")
        scales = _cached_awq_scales(model, config, calibration, progress)
    return Morpher(model, config, scales, progress=progress)


AWQ_DISTS = ("torch", "transformers")  # an AWQ cache made with other versions of these is not reused


def _cached_awq_scales(model, config: QuantConfig, calibration: torch.Tensor, progress: bool):
    """AWQ scales, cached on disk by (model, quant config, calibration tokens, ``AWQ_DISTS`` versions) when the
    model is named, and reused only while the code that computed them is unchanged (``morphlib.producer``);
    a reuse adds that code to the running result's fingerprint."""
    def compute():
        return awq_scales(model, calibration, config.group_size, config.symmetric, grid=config.awq_grid,
                          max_tokens=config.awq_tokens, progress=progress)

    # a local folder (built-in conversions too) is named with its files' sizes and times (set by load_model)
    name = getattr(model, "morphlib_cache_key", None) or getattr(model, "morphlib_name", None)
    if name is None or name.startswith("shape:"):
        return compute()
    key = hashlib.sha256(repr((name, config, str(next(model.parameters()).dtype), versions(*AWQ_DISTS))).encode()
                         + calibration.cpu().numpy().tobytes()).hexdigest()[:20]
    path = cache_dir() / "awq" / f"{key}.pt"
    entry = _load_entry(path)
    if entry is not None and stale_reason(entry["meta"], *AWQ_DISTS) is None:
        reuse(entry["meta"])
        return entry["scales"]
    with producing(*AWQ_DISTS) as meta:
        scales = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    torch.save({"scales": scales, "meta": meta}, tmp)
    tmp.replace(path)
    return scales


def _load_entry(path: Path) -> dict | None:
    """A cached {"scales", "meta"} entry, or None when there is none or it cannot be read (then recomputed)."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    return entry if isinstance(entry, dict) and {"scales", "meta"} <= set(entry) else None
