"""Chapter 4: swaps while the serving engine decodes, synchronous against side-stream, on a GPU-bound decode.

For each model (the Llama-2-7B shape with random weights; SmolLM2-135M with its real weights) and batch
size, a fixed batch decodes ``steps`` timed steps with CUDA graphs (``swapruns.decode_run``: same prompts in
every run, every state a fixed swap order passes through captured before the first run). Every
``interval`` steps an event is asked for, in this order and again: swap a ``block_layers`` middle block
to INT4, restore it, swap its first layer alone, restore it. Three modes, interleaved over ``rounds``
rounds (the side-stream run of a round always before its synchronous run):

* ``none``: no event (the baseline);
* ``side``: the engine's side-stream swaps (copies in paced chunks on its copy stream; each layer
  commits at the first step boundary after its bytes landed);
* ``sync``: the control. The same layers switch precision at the *same* steps as in that round's side run
  (its commits are replayed as synchronous requests at those boundaries: the copy runs on the compute
  stream and commits at once), so both runs decode under the same precision schedule and must sample the
  same greedy tokens, and the steps carrying the copies show what a swap costs when nothing hides it.

Read from the records (``swapruns``: quiet steps, same-state baselines, stalls, latencies): TPOT and its
ratio to ``none`` (mean over rounds, 95 % t interval), inter-token P50 / P99 / max, the boundary stall,
the slowdown of the steps the copies overlapped, host ms per layer, request-to-use latency against the
isolated copy time (the same ops on the idle engine, in this run: chapter 3's mechanism) plus two steps,
copy bandwidth against isolated, the 16-bit and INT4 step times at each batch (the precision factor each
number of INT4 layers multiplies a step by, from the quiet steps of the side runs against the ``none``
runs at the same step: what a swap changes in TPOT that is not overlap), and token equality of side and
sync runs. A run with any lazy graph capture, or with fewer than 95 % graph steps, is invalid: the
headline says so and no target is judged. The cpu profile runs every path on a tiny random Llama on the CPU.
"""

from __future__ import annotations

import gc
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

MODES = ("none", "side", "sync")
DEVICES = ("auto", "cuda", "cpu")
# the plan's device-time model (an H200, the engine benchmark's step times, ms): what a run costs before it runs
STEP_MS = {"llama-2-7b": {1: 4.9, 8: 5.6, 32: 8.4, 64: 12.2}, "smollm2-135m": {1: 1.3, 8: 1.35, 32: 1.7, 64: 1.9}}
H2D_PINNED = 55e9
RUN_OVERHEAD_S, ENGINE_BUILD_S, PROCESS_S = 0.1, 12.0, 12.0  # per run (reset, prefill); per engine; imports
CPU_COPY_BANDWIDTH = 2e8  # CPU only: the modelled link the copies' landing follows (bytes/s)
# the targets, fixed before any measurement: upper bounds, except the AT_LEAST ones (lower bounds)
TARGETS = dict(tpot_ratio_async_swap_ci95_high=1.03, p99_itl_ratio_async_swap=1.10, boundary_stall_ms=0.2,
               host_ms_per_layer=0.1, swap_latency_vs_copy_plus_two_steps=1.0, sync_stall_vs_copy_ratio_low=0.9,
               sync_stall_vs_copy_ratio_high=1.1, tokens_match=1.0)
AT_LEAST = frozenset({"sync_stall_vs_copy_ratio_low", "tokens_match"})

DEFAULTS = {
    "gpu": dict(models=("shape:llama-2-7b", "smollm2-135m"), batches=(1, 8, 32, 64), max_batch=(32, 64), steps=256,
                interval=32, block_layers=16, rounds=5, prompt_len=128, time_limit_s=180.0),
    "cpu": dict(models=("tiny",), batches=(1, 4), max_batch=(4,), steps=64, interval=16, block_layers=2, rounds=2,
                prompt_len=16, time_limit_s=180.0),
}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    # "shape:<morphlib.shapes name>" (random weights), a model name or folder (real weights; its shape's random
    # ones when they cannot be loaded, said so) or "tiny" (CPU); the headline is the first model's
    models: tuple[str, ...] = DEFAULTS["gpu"]["models"]
    batches: tuple[int, ...] = (1, 8, 32, 64)
    max_batch: tuple[int, ...] = (32, 64)  # per model: its largest batch (the 7B shape stops at 32: device time)
    steps: int = 256  # timed decode steps per run
    interval: int = 32  # steps from one event to the next
    block_layers: int = 16  # the middle block swapped and restored (its first layer is the single-layer event)
    rounds: int = 5
    prompt_len: int = 128
    warmup: int = 4  # untimed decode steps before each timed window
    iso_repeats: int = 5  # idle-engine swap + restore cycles of the block (the isolated copies)
    copy_chunk_bytes: int = 16 << 20  # the side copies' chunks (the engine's default)
    copy_pace: float = 0.8  # the side copies' pacing (the engine's default)
    time_limit_s: float = 180.0  # a plan estimated longer is refused before anything runs
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        models = tuple(self.models) if isinstance(self.models, (list, tuple)) else (self.models,)
        if not models:
            raise MorphError("models must name at least one model")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "batches", int_tuple("batches", self.batches))
        mb = self.max_batch if isinstance(self.max_batch, (list, tuple, str)) else (self.max_batch,)
        mb = tuple(int_tuple("max_batch", [m])[0] for m in (int_tuple("max_batch", mb) if isinstance(mb, str) else mb))
        if len(mb) != len(models):
            raise MorphError(f"max_batch gives {len(mb)} limit(s) for {len(models)} model(s): one per model")
        object.__setattr__(self, "max_batch", mb)
        self.check_counts("steps", "interval", "block_layers", "rounds", "prompt_len", "warmup", "iso_repeats",
                          "copy_chunk_bytes")
        if 4 * self.interval > self.steps:
            raise MorphError(f"steps ({self.steps}) must hold the four event kinds: at least 4 x interval ({self.interval})")
        if self.rounds < 2:
            raise MorphError(f"rounds must be at least 2 (a 95 % interval over rounds), got {self.rounds}")
        if isinstance(self.copy_pace, bool) or not isinstance(self.copy_pace, (int, float)) or not 0.01 <= self.copy_pace <= 1:
            raise MorphError(f"copy_pace must be a fraction in [0.01, 1], got {self.copy_pace!r}")
        if isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float)) or self.time_limit_s <= 0:
            raise MorphError(f"time_limit_s must be a positive number, got {self.time_limit_s!r}")
        for m, limit in zip(models, mb):
            if not any(b <= limit for b in self.batches):
                raise MorphError(f"model {m}: no batch size is at most its max_batch {limit}")
            depth = _depth(m)
            if depth is not None and self.block_layers > depth:
                raise MorphError(f"block_layers ({self.block_layers}) exceeds the {depth} layers of {m}")
        if self.device not in DEVICES:
            raise MorphError(f"device {self.device!r} is not supported: use {', '.join(map(repr, DEVICES))}")

    def batches_of(self, i: int) -> tuple[int, ...]:
        return tuple(b for b in self.batches if b <= self.max_batch[i])


def _depth(model: str) -> int | None:
    """Layers of a model named in the config (None: a real model not among the built-in shapes)."""
    from morphlib.shapes import SHAPES

    name = model[6:] if model.startswith("shape:") else model
    if model == "tiny":
        return sr.TINY["num_hidden_layers"]
    return SHAPES[name]["num_hidden_layers"] if name in SHAPES else None


def schedule(block: list[int], steps: int, interval: int) -> list[sr.Event]:
    """Events every ``interval`` steps from step 0: swap the block, restore it (newest first), swap its first
    layer, restore it, and again."""
    k = len(block)
    kinds = [("int4", tuple(block), f"swap {k}"), ("fp16", tuple(reversed(block)), f"restore {k}"),
             ("int4", (block[0],), "swap 1"), ("fp16", (block[0],), "restore 1")]
    return [sr.Event(i * interval, *kinds[i % 4], of=i) for i in range(math.ceil(steps / interval))]


def replay_events(side_run: dict) -> list[sr.Event]:
    """The side run's commits as synchronous requests at the same boundaries (each its side event's)."""
    label = {e["event"]: e["label"] for e in side_run["events"]}
    by_step: dict[tuple, list] = {}
    for op in sorted(side_run["ops"], key=lambda o: o["committed_ms"]):
        by_step.setdefault((op["commit_step"], op["event"], op["to"]), []).append(op["layer"])
    return [sr.Event(step, to, tuple(layers), label[ev], of=ev) for (step, ev, to), layers in sorted(by_step.items())]


def round_order(r: int) -> list[str]:
    """none moves through the round; side always precedes sync (sync replays it)."""
    return [["none", "side", "sync"], ["side", "none", "sync"], ["side", "sync", "none"]][r % 3]


# ----------------------------------------------------------------------------- plan
def plan(cfg: Config) -> list[dict]:
    """Estimated device seconds per (model, batch) and per engine (H200 assumptions)."""
    from morphlib.shapes import SHAPES, shape_layer_bytes

    rows = []
    for i, m in enumerate(cfg.models):
        name = m[6:] if m.startswith("shape:") else m
        known = STEP_MS.get(name, {})
        for b in cfg.batches_of(i):
            step_ms = known.get(b, max(known.values(), default=5.0))
            seconds = cfg.rounds * len(MODES) * ((cfg.steps + cfg.warmup + 2) * step_ms * 1e-3 + RUN_OVERHEAD_S)
            if name in SHAPES:  # a synchronous run's stalls: every event's bytes on the compute stream
                nb = shape_layer_bytes(name)
                cycle_bytes = (cfg.block_layers + 1) * (nb["int4_bytes"] + nb["fp16_bytes"])  # swap + restore, k and 1
                seconds += cfg.rounds * (cfg.steps / cfg.interval / 4) * cycle_bytes / H2D_PINNED
            rows.append({"model": m, "what": f"batch {b}: {cfg.rounds} rounds x {len(MODES)} modes x {cfg.steps} steps",
                         "seconds": seconds})
        rows.append({"model": m, "what": "engine construction, graph captures, isolated copies", "seconds": ENGINE_BUILD_S})
    rows.append({"model": "", "what": "process start, imports, CUDA context", "seconds": PROCESS_S})
    return rows


# ----------------------------------------------------------------------------- one model
def build_engine(model: str, cfg: Config, batches: tuple[int, ...], device: torch.device) -> tuple[LLM, str]:
    """The engine for one model: its middle block swappable and restorable, graph buckets at the batch
    sizes, a KV pool just large enough. Returns (engine, which weights)."""
    source, depth, weights = sr.engine_source(model, cfg.seed, str(device))
    if cfg.block_layers > depth:
        raise MorphError(f"block_layers ({cfg.block_layers}) exceeds the {depth} layers of {model}")
    block = tuple(middle_block(depth, cfg.block_layers))
    max_len = 1 << (cfg.prompt_len + 1 + cfg.warmup + cfg.steps + sr.DRAIN_TOKENS - 1).bit_length()
    econf = EngineConfig(device=str(device), max_num_seqs=max(batches), graph_buckets=batches, max_model_len=max_len,
                         max_num_batched_tokens=max(2048, max(batches)) if device.type == "cuda" else 256,
                         kv_blocks=max(batches) * -(-max_len // 16) + 64, swappable=block, restorable=block,
                         copy_chunk_bytes=cfg.copy_chunk_bytes, copy_pace=cfg.copy_pace,
                         copy_bandwidth=None if device.type == "cuda" else CPU_COPY_BANDWIDTH, seed=cfg.seed)
    return LLM(source, econf), weights


def isolated(llm: LLM, block: list[int], repeats: int) -> dict:
    """The block's ops on the idle engine: per kind, the median device copy ms and GB/s of one layer's op."""
    ops, _ = sr.idle_morphs(llm, block, repeats)
    out = {}
    for to in ("int4", "fp16"):
        mine = [o for o in ops if o["to"] == to]
        out[to] = {"copy_ms": sr.median([o["copy_ms"] for o in mine]), "span_ms": sr.median([o["span_ms"] for o in mine]),
                   "gbs": sr.median([sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) for o in mine]),
                   "bytes": mine[0]["bytes"], "ops": len(mine)}
    return out


def model_runs(llm: LLM, cfg: Config, batches: tuple[int, ...]) -> dict:
    """{batch: {mode: [run per round]}} (module doc)."""
    block = middle_block(llm.spec.num_layers, cfg.block_layers)
    events = schedule(block, cfg.steps, cfg.interval)
    out = {}
    for b in batches:
        prompts = sr.random_prompts(llm.spec.vocab, b, cfg.prompt_len, cfg.seed + b)
        runs = {m: [] for m in MODES}
        for r in range(cfg.rounds):
            for mode in round_order(r):
                if mode == "none":
                    run = sr.decode_run(llm, prompts, cfg.steps, (), cfg.warmup)
                else:
                    llm.configure_copies(swap_mode=mode)
                    todo = events if mode == "side" else replay_events(runs["side"][r])
                    run = sr.decode_run(llm, prompts, cfg.steps, todo, cfg.warmup)
                runs[mode].append(run)
        out[b] = runs
    llm.configure_copies(swap_mode="side")
    return out


# ----------------------------------------------------------------------------- analysis
def precision_factors(side: list[dict], none: list[dict], n: int) -> dict[int, float]:
    """{INT4 layers: median of (quiet side-run step / the none run's step at the same index, same round)}."""
    ratios: dict[int, list] = {}
    for s_run, z_run in zip(side, none):
        z = {s["index"]: s["ms"] for s in z_run["steps"]}
        for s in s_run["steps"]:
            if 0 <= s["index"] < n and sr.quiet(s) and s["index"] in z:
                ratios.setdefault(s["int4_layers"], []).append(s["ms"] / z[s["index"]])
    return {j: sr.median(v) for j, v in sorted(ratios.items())}


def factor_at(factors: dict[int, float], j: int) -> float:
    """The precision factor at ``j`` INT4 layers, linear between the measured ones (1 at 0 if unmeasured)."""
    pts = {0: 1.0, **factors}
    if j in pts:
        return pts[j]
    lo = max((k for k in pts if k < j), default=None)
    hi = min((k for k in pts if k > j), default=None)
    if lo is None or hi is None:
        return pts[lo if hi is None else hi]
    return pts[lo] + (j - lo) / (hi - lo) * (pts[hi] - pts[lo])


def tpot_ms(run: dict, n: int) -> float:
    return float(np.mean(sr.inter_token_ms(run["steps"], n)))


def tokens_match(a: dict, b: dict) -> float:
    x, y = np.array(a["tokens"]), np.array(b["tokens"])
    return float((x == y).mean()) if x.shape == y.shape else 0.0


def event_stalls(run: dict, n: int) -> dict[int, float]:
    """{logical event: the stall it caused (the sum over the steps its layers committed at)} for one run."""
    stalls = [s for s in sr.commit_stalls(run["steps"], sr.baselines(run["steps"])) if s["index"] < n]
    out: dict[int, float] = {}
    for e in run["events"]:
        v = sr.event_stall_ms(e, stalls)
        if v is not None:
            out[e["of"]] = out.get(e["of"], 0.0) + v
    return out


def analyse(runs: dict, n: int, iso: dict, labels: dict[int, str]) -> dict:
    """Everything the chapter reads for one (model, batch) from its runs (see the module doc)."""
    none, side, sync = runs["none"], runs["side"], runs["sync"]
    tp = {m: [tpot_ms(r, n) for r in runs[m]] for m in MODES}
    itl = {m: [x for r in runs[m] for x in sr.inter_token_ms(r["steps"], n)] for m in MODES}
    quiet_fp16 = sr.median([s["ms"] for r in none for s in r["steps"] if 0 <= s["index"] < n])
    factors = precision_factors(side, none, n)
    expected = []
    for s_run, z_run in zip(side, none):
        z = {s["index"]: s["ms"] for s in z_run["steps"]}
        pairs = [(s["ms"], z[s["index"]] * factor_at(factors, s["int4_layers"]), z[s["index"]])
                 for s in s_run["steps"] if 0 <= s["index"] < n and s["index"] in z]
        got, want, plain = (sum(p[i] for p in pairs) for i in range(3))
        expected.append((got / want, want / plain))
    side_stalls = [s for r in side for s in sr.commit_stalls(r["steps"], sr.baselines(r["steps"])) if s["index"] < n]
    slow = sr.slowdown(side, n)
    row = {
        "tpot_ms": {m: sr.mean_ci(tp[m]) for m in MODES},
        "tpot_ratio_side": sr.mean_ci([s / z for s, z in zip(tp["side"], tp["none"])]),
        "tpot_ratio_sync": sr.mean_ci([s / z for s, z in zip(tp["sync"], tp["none"])]),
        "tpot_ratio_side_overlap_only": sr.mean_ci([e[0] for e in expected]),
        "tpot_ratio_side_precision_only": sr.mean_ci([e[1] for e in expected]),
        "itl_ms": {m: {"p50": sr.percentile(itl[m], 50), "p99": sr.percentile(itl[m], 99), "max": max(itl[m])}
                   for m in MODES},
        "fp16_step_ms": quiet_fp16, "precision_factors": factors,
        "int4_step_ms": {j: quiet_fp16 * f for j, f in factors.items()},
        "boundary_stall_ms": {"median": sr.median([s["stall_ms"] for s in side_stalls]),
                              "p99": sr.percentile([s["stall_ms"] for s in side_stalls], 99),
                              "max": max((s["stall_ms"] for s in side_stalls), default=None), "n": len(side_stalls)},
        "overlapped_slowdown": slow,
        "tokens_match": [tokens_match(a, b) for a, b in zip(side, sync)],
        "valid": all(r["valid"] for m in MODES for r in runs[m]),
        "problems": sorted({p for m in MODES for r in runs[m] for p in r["problems"]}),
        "dropped_events": sum(len(r["dropped_events"]) for m in MODES for r in runs[m]),
        "graph_share": min(r["graph_share"] for m in MODES for r in runs[m]),
    }
    row["p99_itl_ratio_side"] = row["itl_ms"]["side"]["p99"] / row["itl_ms"]["none"]["p99"]
    row["p99_itl_ratio_sync"] = row["itl_ms"]["sync"]["p99"] / row["itl_ms"]["none"]["p99"]
    ops = [o for r in side for o in r["ops"]]
    row["host_ms_per_layer"] = {to: sr.median([o["host_ms"] for o in ops if o["to"] == to]) for to in ("int4", "fp16")}
    row["copy_bw_vs_isolated"] = {to: sr.median([sr.bandwidth_gbs(o["bytes"], o["copy_ms"]) / iso[to]["gbs"]
                                                 for o in ops if o["to"] == to and o["copy_ms"]]) for to in ("int4", "fp16")}
    per_event = {}
    for of, label in labels.items():
        layers = int(label.split()[-1])
        to = "int4" if label.startswith("swap") else "fp16"
        copy = layers * iso[to]["copy_ms"]
        lat = [e["latency_ms"] for r in side for e in r["events"] if e["of"] == of and e["latency_ms"] is not None]
        sync_st = [event_stalls(r, n).get(of) for r in sync]
        side_st = [event_stalls(r, n).get(of) for r in side]
        per_event[of] = {"label": label, "layers": layers, "to": to, "isolated_copy_ms": copy,
                         "latency_ms": sr.median(lat), "copy_plus_one_step_ms": copy + quiet_fp16,
                         "copy_plus_two_steps_ms": copy + 2 * quiet_fp16, "sync_stall_ms": sr.median(sync_st),
                         "side_stall_ms": sr.median(side_st),
                         "sync_stall_vs_copy": None if sr.median(sync_st) is None else sr.median(sync_st) / copy}
    row["events"] = per_event
    return row


def by_label(row: dict) -> dict[str, dict]:
    """The per-event analysis merged by event kind ("swap 16", ...: medians of the repeats)."""
    out: dict[str, dict] = {}
    for e in row["events"].values():
        out.setdefault(e["label"], []).append(e)
    merged = {}
    for label, es in out.items():
        merged[label] = {k: (sr.median([e[k] for e in es]) if isinstance(es[0][k], (int, float)) or es[0][k] is None else es[0][k])
                         for k in es[0]}
    return merged


# ----------------------------------------------------------------------------- headline
def _stalls(row: dict, label: str) -> dict:
    """The synchronous and side-stream stalls of one event kind and its isolated copy time (ms)."""
    e = by_label(row)[label]
    return {"sync_stall_ms": e["sync_stall_ms"], "side_stall_ms": e["side_stall_ms"], "copy_ms": e["isolated_copy_ms"]}


def _fig(value, unit: str, label: str, key: str | None = None, judged: bool = True, **extra) -> dict:
    """A headline figure; with ``key``, its target and whether it was met (None: not judged, because the run is
    invalid or not on a GPU, where the targets apply)."""
    out = {"value": value, "unit": unit, "label": label, **extra}
    if key is not None:
        goal, lower = TARGETS[key], key in AT_LEAST
        out["target"] = f"{'>=' if lower else '<='} {goal:g}"
        out["met"] = None if value is None or not judged else bool(value >= goal if lower else value <= goal)
    return out


def headline(engine: str, model: str, weights: str, rows: dict[int, dict], block_layers: int, cuda: bool,
             graphs: bool) -> dict:
    """The first model's figures, each at its worst batch (the largest value for an upper target, the furthest
    from 1 for the synchronous control); ``rows``: {batch: analyse(...)}. Targets are judged on a GPU only."""
    valid = all(r["valid"] for r in rows.values())
    judged = valid and cuda
    problems = sorted({p for r in rows.values() for p in r["problems"]})
    worst = lambda fn: max(rows, key=lambda b: fn(rows[b]) if fn(rows[b]) is not None else -math.inf)  # noqa: E731
    b_t = worst(lambda r: (r["tpot_ratio_side"]["ci95"] or [None, None])[1])
    t = rows[b_t]["tpot_ratio_side"]
    b_p = worst(lambda r: r["p99_itl_ratio_side"])
    b_s = worst(lambda r: r["boundary_stall_ms"]["median"])
    b_h = worst(lambda r: max(v for v in r["host_ms_per_layer"].values() if v is not None))
    big_swap, big_restore = f"swap {block_layers}", f"restore {block_layers}"
    lat = {b: by_label(r)[big_swap] for b, r in rows.items()}
    b_l = worst(lambda r: by_label(r)[big_swap]["latency_ms"] / by_label(r)[big_swap]["copy_plus_two_steps_ms"]
                if by_label(r)[big_swap]["latency_ms"] is not None else None)
    sync_dev = {(b, label): by_label(r)[label]["sync_stall_vs_copy"] for b, r in rows.items()
                for label in (big_swap, big_restore)}
    dev = {k: v for k, v in sync_dev.items() if v is not None}
    k_sync = max(dev, key=lambda k: abs(dev[k] - 1)) if dev else None
    ratio = dev[k_sync] if k_sync else None
    match = min(min(r["tokens_match"]) for r in rows.values())
    host = {to: v if v is not None else float("nan") for to, v in rows[b_h]["host_ms_per_layer"].items()}
    h = {
        "engine": engine, "model": model, "weights": weights, "valid": valid, "invalid_because": problems,
        "targets_judged": judged, "cuda_graphs": graphs,
        "tpot_ratio_async_swap": _fig(t["mean"], "x", f"Side-stream swaps: TPOT / no swap, mean over rounds (batch {b_t})",
                                      batch=b_t, rounds=t["n"]),
        "tpot_ratio_async_swap_ci95": t["ci95"],
        "tpot_ratio_async_swap_ci95_high": _fig(t["ci95"][1] if t["ci95"] else None, "x",
                                                f"Upper end of its 95 % interval (batch {b_t})",
                                                "tpot_ratio_async_swap_ci95_high", judged),
        "p99_itl_ratio_async_swap": _fig(rows[b_p]["p99_itl_ratio_side"], "x",
                                         f"Side-stream swaps: P99 inter-token latency / no swap (batch {b_p})",
                                         "p99_itl_ratio_async_swap", judged, batch=b_p),
        "boundary_stall_ms": _fig(rows[b_s]["boundary_stall_ms"]["median"], " ms",
                                  f"Side-stream commit step minus its same-state baseline, median (batch {b_s})",
                                  "boundary_stall_ms", judged, p99=rows[b_s]["boundary_stall_ms"]["p99"], batch=b_s),
        "host_ms_per_layer": _fig(max(host.values()), " ms",
                                  f"Host time of one layer's op (issue, sending its chunks, commit), the larger of swap "
                                  f"{host['int4']:.3f} / restore {host['fp16']:.3f} ms (batch {b_h})",
                                  "host_ms_per_layer", judged, batch=b_h),
        "swap_latency_ms": _fig(lat[b_l]["latency_ms"], " ms", f"{block_layers}-layer side-stream swap: request to the "
                                f"end of the first step computing with all of it, median (batch {b_l})",
                                copy_ms=lat[b_l]["isolated_copy_ms"], copy_plus_two_steps_ms=lat[b_l]["copy_plus_two_steps_ms"],
                                batch=b_l),
        "swap_latency_vs_copy_plus_two_steps": _fig(
            None if lat[b_l]["latency_ms"] is None else lat[b_l]["latency_ms"] / lat[b_l]["copy_plus_two_steps_ms"], "x",
            f"That latency / (isolated copy time + 2 steps) (batch {b_l})", "swap_latency_vs_copy_plus_two_steps", judged),
        "sync_stall_vs_copy_ratio": _fig(ratio, "x", "Synchronous control: the stall of a "
                                         f"{block_layers}-layer event / the isolated copy time of its bytes, the furthest "
                                         f"from 1 ({k_sync[1]} at batch {k_sync[0]})" if k_sync else "Synchronous control",
                                         batch=k_sync[0] if k_sync else None, event=k_sync[1] if k_sync else None,
                                         **(_stalls(rows[k_sync[0]], k_sync[1]) if k_sync else {})),
        "sync_stall_vs_copy_ratio_low": _fig(ratio, "x", "Synchronous control: stall / isolated copy time, lower bound",
                                             "sync_stall_vs_copy_ratio_low", judged),
        "sync_stall_vs_copy_ratio_high": _fig(ratio, "x", "Synchronous control: stall / isolated copy time, upper bound",
                                              "sync_stall_vs_copy_ratio_high", judged),
        "tokens_match": _fig(match, "", "Greedy tokens of the side-stream runs equal to the synchronous runs' "
                             "(fraction, worst round)", "tokens_match", judged),
    }
    return h


# ----------------------------------------------------------------------------- the experiment
def run(cfg: Config) -> Result:
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    if cfg.profile == "gpu" and device.type != "cuda":
        raise MorphError("profile 'gpu' measures CUDA streams and graphs on the engine and needs a CUDA GPU; "
                         "use profile='cpu' for the labelled CPU run")
    steps_plan = plan(cfg)
    total = sum(r["seconds"] for r in steps_plan)
    print(f"overlap plan: estimated {total:.0f} s of device time on an H200 (limit {cfg.time_limit_s:.0f} s)")
    if total > cfg.time_limit_s:
        raise MorphError(f"the plan is estimated at {total:.0f} s, over time_limit_s={cfg.time_limit_s:.0f}: "
                         "fewer rounds, steps or batch sizes")
    with Stopwatch() as sw, cpu_threads(device):
        threads = torch.get_num_threads()
        models, run_rows, timeline, head = [], [], {}, None
        for i, name in enumerate(cfg.models):
            batches = cfg.batches_of(i)
            llm, weights = build_engine(name, cfg, batches, device)
            block = middle_block(llm.spec.num_layers, cfg.block_layers)
            t = time.perf_counter()
            capture_s = llm.precapture(block)
            iso = isolated(llm, block, cfg.iso_repeats)
            sw.lap(f"{name}: engine, captures, isolated copies")
            runs = model_runs(llm, cfg, batches)
            sw.lap(f"{name}: runs")
            labels = {e.of: e.label for e in schedule(block, cfg.steps, cfg.interval)}
            rows = {b: analyse(runs[b], cfg.steps, iso, labels) for b in batches}
            models.append({"model": name, "weights": weights, "engine": sr.engine_text(llm), "block": block,
                           "capture_s": capture_s, "prepare_s": time.perf_counter() - t, "isolated": iso,
                           "memory": llm.memory_report(), "batches": {str(b): rows[b] for b in batches}})
            for b in batches:
                for mode in MODES:
                    for r, run_ in enumerate(runs[b][mode]):
                        run_rows.append({"model": name, "batch": b, "mode": mode, "round": r, "valid": run_["valid"],
                                         "problems": run_["problems"], "dropped_events": run_["dropped_events"],
                                         "tpot_ms": tpot_ms(run_, cfg.steps), **sr.compact(run_, cfg.steps)})
            if i == 0:
                b = batches[len(batches) // 2]
                timeline = {"model": name, "batch": b, "round": 0,
                            **{mode: {"steps": runs[b][mode][0]["steps"], "ops": runs[b][mode][0]["ops"]}
                               for mode in ("side", "sync")}}
                head = headline(sr.engine_text(llm), name, weights, rows, cfg.block_layers, device.type == "cuda",
                                llm.runner.use_graphs)
            llm.close()
            del llm, runs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    head["phase_seconds"] = sw.phases
    files = {"models.json": models, "runs.json": run_rows, "timeline.json": timeline, "plan.json": steps_plan}
    params = as_params(cfg, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       threads=threads, plan_seconds=total)
    return Result(params, head, files, sw.seconds)
