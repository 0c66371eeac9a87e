"""Decode with a KV cache while decoder layers are swapped FP16 <-> INT4 (chapter 4).

One run decodes ``steps`` greedy tokens for a batch of prompts with a manual loop over
``past_key_values`` and times every step (wall clock from the step's start to a device synchronize
after it: the time per output token a serving loop sees). Every ``interval`` steps the same block of
layers is swapped to INT4, then restored, alternately. Modes:

* ``none``: no swap (the baseline);
* ``sync``: ``Morpher.swap(layers)`` at the token boundary, before the step's forward pass; on CUDA
  the copies run on the compute stream and the call synchronizes, so the step stalls for them;
* ``async`` (CUDA only): right after step *e-1*'s forward pass is enqueued, ``Morpher.swap(layers,
  stream=side)`` enqueues the copies on a side stream and ``report.wait()`` makes the compute stream
  wait for them before step *e*. The copies overlap the GPU work already queued for step *e-1*
  and the host's launch work. Both modes switch the weights before the same forward pass, so they
  must produce the same tokens (a check that the side-stream path is correctly synchronized).

Without CUDA there are no streams and a swap only re-points modules (host memory is the "device"):
the CPU fallback runs ``none`` and ``sync`` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from morphlib.errors import MorphError

MODES = ("none", "sync", "async")


@dataclass(frozen=True)
class OverlapConfig:
    batch: int = 4
    prompt_len: int = 32
    steps: int = 24
    interval: int = 6  # a swap or a restore every `interval` steps
    layers: tuple[int, ...] = (11, 12, 13, 14, 15, 16, 17, 18)
    rounds: int = 1  # each mode runs this many times, modes interleaved
    modes: tuple[str, ...] = MODES

    def __post_init__(self):
        if self.interval < 1 or self.steps <= self.interval:
            raise MorphError(f"need 1 <= interval < steps (got interval={self.interval}, steps={self.steps})")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise MorphError(f"unknown mode {bad[0]!r}: use {', '.join(MODES)}")


def schedule(steps: int, interval: int) -> dict[int, str]:
    """{step: "swap" | "restore"}: the weights change before that step's forward pass."""
    return {e: ("swap" if i % 2 == 0 else "restore") for i, e in enumerate(range(interval, steps, interval))}


@dataclass
class DecodeRun:
    mode: str
    round: int
    step_ms: list[float] = field(default_factory=list)
    state: list[str] = field(default_factory=list)  # precision of the swapped layers in each step's forward
    carried: list[str] = field(default_factory=list)  # "swap" / "restore" if the step carried one, else ""
    events: list[dict] = field(default_factory=list)
    tokens: torch.Tensor | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _switch(morpher, kind: str, layers, stream=None):
    return morpher.swap(layers, stream=stream) if kind == "swap" else morpher.restore(layers, stream=stream)


@torch.no_grad()
def decode_with_swaps(model, morpher, prompts: torch.Tensor, cfg: OverlapConfig, mode: str, round_: int = 0,
                      side_stream=None) -> DecodeRun:
    """One timed greedy decode of ``cfg.steps`` tokens with the swap schedule applied in ``mode``."""
    device = next(model.parameters()).device
    if mode == "async" and device.type != "cuda":
        raise MorphError("the async mode needs a CUDA device (side streams); the CPU fallback runs none and sync")
    if mode == "async" and side_stream is None:
        side_stream = torch.cuda.Stream(device)
    morpher.restore()  # every run starts from the 16-bit model
    events = schedule(cfg.steps, cfg.interval) if mode != "none" else {}
    layers = list(cfg.layers)
    run = DecodeRun(mode, round_)
    _sync(device)
    out = model(prompts.to(device), use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens, state = [], "fp16"
    _sync(device)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        carried = ""
        if mode == "sync" and step in events:
            rep = _switch(morpher, events[step], layers)
            state, carried = ("int4" if events[step] == "swap" else "fp16"), events[step]
            run.events.append({"step": step, "kind": carried, "host_ms": rep.seconds * 1e3,
                               "allocated_delta": rep.device_allocated_delta, "freed_bytes": rep.freed_bytes})
        run.state.append(state)
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        if mode == "async" and step + 1 in events:  # this step's work is enqueued: overlap the copies with it
            rep = _switch(morpher, events[step + 1], layers, stream=side_stream)
            rep.wait()  # the compute stream (next forward pass) waits for the copies; the host does not
            state, carried = ("int4" if events[step + 1] == "swap" else "fp16"), events[step + 1]
            run.events.append({"step": step, "kind": carried, "host_ms": rep.seconds * 1e3,
                               "allocated_delta": None, "freed_bytes": rep.freed_bytes})
        _sync(device)
        run.step_ms.append((time.perf_counter() - t0) * 1e3)
        run.carried.append(carried)
    run.tokens = torch.cat(tokens, dim=1).cpu()
    morpher.restore()
    _sync(device)
    return run


def run_overlap(model, morpher, prompts: torch.Tensor, cfg: OverlapConfig, warmup: bool = True) -> list[DecodeRun]:
    """All modes (``async`` only on CUDA), ``cfg.rounds`` times each, interleaved in a rotating order;
    a short untimed warm-up first."""
    device = next(model.parameters()).device
    modes = [m for m in cfg.modes if m != "async" or device.type == "cuda"]
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if warmup:  # first-use costs (kernel selection, allocator growth) out of the measured runs
        short = OverlapConfig(cfg.batch, cfg.prompt_len, 2 * cfg.interval + 1, cfg.interval, cfg.layers, 1, cfg.modes)
        for m in modes:
            decode_with_swaps(model, morpher, prompts, short, m, side_stream=side)
    order = lambda r: modes[r % len(modes):] + modes[:r % len(modes)]  # noqa: E731 - rotate: no mode always first
    return [decode_with_swaps(model, morpher, prompts, cfg, m, r, side) for r in range(cfg.rounds) for m in order(r)]


def step_table(runs: list[DecodeRun]) -> list[dict]:
    return [{"mode": r.mode, "round": r.round, "step": i, "ms": ms, "state": st, "carried": c}
            for r in runs for i, (ms, st, c) in enumerate(zip(r.step_ms, r.state, r.carried))]


def event_table(runs: list[DecodeRun]) -> list[dict]:
    return [{"mode": r.mode, "round": r.round, **e} for r in runs for e in r.events]


def summarize(runs: list[DecodeRun]) -> dict:
    """Median step times by mode and event kind, and each carrying step's excess over the median
    of the same run's uneventful steps whose forward used the same precision (the stall)."""
    out: dict = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        if not mine:
            continue
        plain = [ms for r in mine for i, ms in enumerate(r.step_ms) if i > 0 and not r.carried[i]]
        out[f"{mode}_plain_ms"] = float(np.median(plain))
        for kind in ("swap", "restore"):
            carrying, stall = [], []
            for r in mine:
                for i, c in enumerate(r.carried):
                    if c != kind:
                        continue
                    same = [ms for j, ms in enumerate(r.step_ms) if j > 0 and not r.carried[j] and r.state[j] == r.state[i]]
                    carrying.append(r.step_ms[i])
                    stall.append(r.step_ms[i] - float(np.median(same)))
            if carrying:
                out[f"{mode}_{kind}_step_ms"] = float(np.median(carrying))
                out[f"{mode}_{kind}_stall_ms"] = float(np.median(stall))
        host = [e["host_ms"] for r in mine for e in r.events if e["kind"] == "swap"]
        if host:
            out[f"{mode}_swap_call_ms"] = float(np.median(host))
        host = [e["host_ms"] for r in mine for e in r.events if e["kind"] == "restore"]
        if host:
            out[f"{mode}_restore_call_ms"] = float(np.median(host))
    sync = [r.tokens for r in runs if r.mode == "sync"]
    asyn = [r.tokens for r in runs if r.mode == "async"]
    if sync and asyn:
        out["async_tokens_match_sync"] = float(np.mean([(a == sync[0]).float().mean().item() for a in asyn]))
    return out
