"""Chapter 4: decode with a KV cache while decoder layers are swapped FP16 <-> INT4.

One run decodes ``steps`` greedy tokens for a batch of ``batch`` held-out prompts of ``prompt_len``
tokens with a manual loop over ``past_key_values`` and times every step (wall clock from the step's
start to a device synchronize after it: the time per output token a serving loop sees). Every
``interval`` steps the same middle block of ``layers_swapped`` layers is swapped to INT4, then
restored, alternately. Modes:

* ``none``: no swap (the baseline);
* ``sync``: ``Morpher.swap(layers)`` at the token boundary, before the step's forward pass; on CUDA
  the copies run on the compute stream and the call synchronizes, so the step stalls for them;
* ``async`` (CUDA only): right after step *e-1*'s forward pass is enqueued, ``Morpher.swap(layers,
  stream=side)`` enqueues the copies on a side stream and ``report.wait()`` makes the compute stream
  wait for them before step *e*. The copies overlap the GPU work already queued for step *e-1*
  and the host's launch work. Both modes switch the weights before the same forward pass, so they
  must produce the same tokens (a check that the side-stream path is correctly synchronized).

Without CUDA there are no streams and a swap only re-points modules (host memory is the "device"):
the CPU fallback runs ``none`` and ``sync`` only. The gpu profile needs CUDA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, cpu_threads
from morphlib.errors import MorphError
from morphlib.eval.corpus import make_windows
from morphlib.models import load_model, num_layers, resolve_device
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.select.layersets import middle_block

MODES = ("none", "sync", "async")
DEVICES = ("auto", "cuda", "cpu")

DEFAULTS = {"gpu": dict(batch=8, prompt_len=128, steps=64, interval=8, layers_swapped=16, rounds=3),
            "cpu": dict(batch=2, prompt_len=16, steps=16, interval=4, layers_swapped=4, rounds=1)}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    model: str = "smollm2-135m"  # built-in default, a local HF folder / .gguf file, or a hub id
    group_size: int = 64  # INT4 group size (round-to-nearest, asymmetric)
    batch: int = 8  # sequences decoded together
    prompt_len: int = 128  # tokens of each held-out prompt
    steps: int = 64  # timed decode steps per run
    interval: int = 8  # a swap or a restore every `interval` steps
    layers_swapped: int = 16  # size of the middle block that is swapped
    rounds: int = 3  # each mode runs this many times, modes interleaved
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else the CPU fallback; or "cuda" / "cpu"

    def __post_init__(self):
        self.check_counts("group_size", "batch", "steps", "interval", "layers_swapped", "rounds")
        self.check_counts("prompt_len", lo=2)
        if self.steps <= self.interval:
            raise MorphError(f"need interval < steps (got interval={self.interval}, steps={self.steps})")
        if self.device not in DEVICES:
            raise MorphError(f"device {self.device!r} is not supported: use {', '.join(map(repr, DEVICES))}")


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
def decode_with_swaps(model, morpher, prompts: torch.Tensor, layers: list[int], steps: int, interval: int,
                      mode: str, round_: int = 0, side_stream=None) -> DecodeRun:
    """One timed greedy decode of ``steps`` tokens with the swap schedule of ``layers`` applied in ``mode``."""
    device = next(model.parameters()).device
    if mode not in MODES:
        raise MorphError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if mode == "async" and device.type != "cuda":
        raise MorphError("the async mode needs a CUDA device (side streams); the CPU fallback runs none and sync")
    if mode == "async" and side_stream is None:
        side_stream = torch.cuda.Stream(device)
    morpher.restore()  # every run starts from the 16-bit model
    events = schedule(steps, interval) if mode != "none" else {}
    run = DecodeRun(mode, round_)
    _sync(device)
    out = model(prompts.to(device), use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens, state = [], "fp16"
    _sync(device)
    for step in range(steps):
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


def run_modes(model, morpher, prompts: torch.Tensor, layers: list[int], cfg: Config, warmup: bool = True) -> list[DecodeRun]:
    """All modes (``async`` only on CUDA), ``cfg.rounds`` times each, interleaved in a rotating order;
    a short untimed warm-up first (when ``warmup``)."""
    device = next(model.parameters()).device
    modes = [m for m in MODES if m != "async" or device.type == "cuda"]
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if warmup:  # first-use costs (kernel selection, allocator growth) out of the measured runs
        for m in modes:
            decode_with_swaps(model, morpher, prompts, layers, 2 * cfg.interval + 1, cfg.interval, m, side_stream=side)
    order = lambda r: modes[r % len(modes):] + modes[:r % len(modes)]  # noqa: E731 - rotate: no mode always first
    return [decode_with_swaps(model, morpher, prompts, layers, cfg.steps, cfg.interval, m, r, side)
            for r in range(cfg.rounds) for m in order(r)]


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


def headline(stats: dict, events: list[dict], k: int, expected_freed: int, cuda: bool) -> dict:
    """Key figures (the values absent on CPU, e.g. the side-stream ones, are None)."""
    measured = [-e["allocated_delta"] for e in events if e["kind"] == "swap" and e["allocated_delta"] is not None]
    fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
    cpu_note = "" if cuda else " (not measured: no CUDA streams on CPU)"
    return {
        "tpot_ms_no_swap": fig(stats["none_plain_ms"], " ms", "Decode step, no swap (median)"),
        "tpot_ms_sync_swap_step": fig(stats.get("sync_swap_step_ms"), " ms", f"Step with a synchronous {k}-layer swap"),
        "tpot_ms_async_swap_step": fig(stats.get("async_swap_step_ms"), " ms",
                                       f"Step carrying a side-stream {k}-layer swap{cpu_note}"),
        "swap_ms": fig(stats.get("sync_swap_call_ms"), " ms", f"Synchronous swap call, {k} layers to INT4"),
        "restore_ms": fig(stats.get("sync_restore_call_ms"), " ms", f"Synchronous restore call, {k} layers to FP16"),
        "sync_swap_stall_ms": fig(stats.get("sync_swap_stall_ms"), " ms", "Extra time of a synchronous-swap step"),
        "async_swap_stall_ms": fig(stats.get("async_swap_stall_ms"), " ms",
                                   f"Extra time of a side-stream-swap step{cpu_note}"),
        "sync_restore_stall_ms": fig(stats.get("sync_restore_stall_ms"), " ms", "Extra time of a synchronous-restore step"),
        "async_restore_stall_ms": fig(stats.get("async_restore_stall_ms"), " ms",
                                      f"Extra time of a side-stream-restore step{cpu_note}"),
        "async_tokens_match_sync": fig(stats.get("async_tokens_match_sync"), "",
                                       f"Side-stream run tokens equal to the synchronous run's (fraction){cpu_note}"),
        "freed_mib_measured": fig(float(np.median(measured)) / 2**20 if measured else None, " MiB",
                                  "Device memory a swap released (torch.cuda.memory_allocated)"),
        "freed_mib_expected": fig(expected_freed / 2**20, " MiB", f"FP16 minus INT4 bytes of the {k} layers"),
        "layers_swapped": k,
    }


def run(cfg: Config) -> Result:
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    if cfg.profile == "gpu" and device.type != "cuda":
        raise MorphError("profile 'gpu' measures CUDA streams and needs a CUDA GPU; "
                         "use profile='cpu' for the labelled CPU fallback")
    with Stopwatch() as sw, cpu_threads(device):
        threads = torch.get_num_threads()
        torch.manual_seed(cfg.seed)
        lm, tok = load_model(cfg.model, device=device)
        morpher = prepare_morphing(lm, QuantConfig(group_size=cfg.group_size), progress=False)
        layers = middle_block(num_layers(lm), cfg.layers_swapped)
        prompts = make_windows(tok, "heldout", cfg.batch, cfg.prompt_len, seed=cfg.seed).ids
        runs = run_modes(lm, morpher, prompts, layers, cfg, warmup=device.type == "cuda")  # CPU: no kernel warm-up
        stats = summarize(runs)
        events = event_table(runs)
        head = headline(stats, events, cfg.layers_swapped, morpher.freed_bytes(layers), device.type == "cuda")
    files = {"steps.json": step_table(runs), "events.json": events, "stats.json": stats}
    return Result(as_params(cfg, device=str(device), threads=threads, layers=layers), head, files, sw.seconds)
