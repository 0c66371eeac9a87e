"""Decode runs with scheduled swaps on the serving engine, and what chapters 3 and 4 read from their records.

A *run* (``decode_run``) resets an ``LLM``, admits a fixed batch (the same prompts in every run), lets every
sequence finish its prompt, decodes ``warmup`` untimed steps and then ``steps`` timed decode steps, asking for
morph *events* (a swap or a restore of some layers) at given step boundaries. It returns plain records:
every decode step, every morph op (its chunks' device times on the steps' time base), every event, the
sampled tokens, and whether the run is valid (no lazy CUDA-graph capture anywhere in it; at least 95 % of its
timed steps replayed a graph, where the engine captures graphs at all). An idle engine's swap-then-restore
cycles (``idle_morphs``) give the isolated copies the chapters compare against.

The analysis is a few pure functions of those records, fixed before any number was measured:

* a step is *quiet* when no morph copy is in flight, nothing commits at its boundary and nothing is copied
  on the compute stream;
* the *baseline* of a step is the median of the ``NEIGHBOURS`` nearest (by step index) quiet steps of the
  same morph state in the same run. A state without quiet steps (the intermediate states of a multi-layer
  side-stream swap, which commits layers a few at a time while the next copies run, last one step each)
  gets the line through the baselines of the nearest quiet states with fewer and with more INT4 layers,
  read at its number of INT4 layers (each layer's INT4 cost is its own);
* *overlapped* steps carry copies and no commit; their slowdown is sum(time) / sum(baseline) - 1;
* the *stall* of a commit step is its time minus its baseline;
* an event's *latency* runs from its request to the end of the first step that computes with all of its
  layers (the step at whose boundary the last of them committed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from morphlib.engine import LLM, SamplingParams
from morphlib.engine.copies import HostEvent
from morphlib.errors import MorphError

NEIGHBOURS = 4  # quiet steps a baseline is the median of
MIN_GRAPH_SHARE = 0.95  # of the timed steps, where the engine captures graphs (the issue's validity rule)
DRAIN_TOKENS = 64  # tokens each sequence may still decode after the timed window (ops still copying finish)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)  # the CPU profile's model


@dataclass(frozen=True)
class Event:
    """A morph request asked for at the boundary of timed step ``step`` (or at the first later boundary at
    which no other op is pending)."""

    step: int
    to: str  # "int4" (swap) or "fp16" (restore)
    layers: tuple[int, ...]
    label: str = ""
    of: int = -1  # the logical event it belongs to (a replay of another run's commits: that run's event)


def engine_source(name: str, seed: int = 0, device: str = "cpu") -> tuple[object, int, str]:
    """(what an ``LLM`` is built from, its number of layers, which weights) for ``"tiny"`` (a random 4-layer
    Llama made here: the CPU profiles), ``"shape:<name>"`` (random weights made in the engine's arena) or a
    model name or folder (its real weights, loaded here on ``device``, sanity-checked; a built-in shape's random
    weights when they cannot be loaded, and the weights say so)."""
    from morphlib.shapes import SHAPES

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
        model.morphlib_name = "tiny"
        return model, TINY["num_hidden_layers"], "random N(0, 0.02)"
    if name.startswith("shape:"):
        if name[6:] not in SHAPES:
            raise MorphError(f"unknown model shape {name[6:]!r}: choose one of {', '.join(SHAPES)}")
        return name, SHAPES[name[6:]]["num_hidden_layers"], "random N(0, 0.02)"
    from morphlib.assets import cache_dir
    from morphlib.models import ALIASES, load_model

    why = None
    if ALIASES.get(name) == "smollm2-135m" and not (cache_dir() / "smollm2" / "hf" / ".complete").exists():
        why = "not converted in the morphlib cache; converting would take ~30 s of the device-time budget"
    else:
        try:
            model, _ = load_model(name, device=device)
            return model, model.config.num_hidden_layers, "real"
        except (MorphError, OSError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if name not in SHAPES:
        raise MorphError(f"cannot load model {name!r}: {why}")
    return f"shape:{name}", SHAPES[name]["num_hidden_layers"], f"random N(0, 0.02) (its real weights: {why})"


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(batch)]


def engine_text(llm: LLM) -> str:
    """What executes the steps, in words (the chapters' ``engine`` headline)."""
    dev = llm.device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    graphs = ("CUDA graphs per (morph state, batch bucket)" if llm.runner.use_graphs
              else "eager steps (no CUDA graphs)")
    attn = "Triton attention" if llm.use_triton else "torch reference attention"
    copies = "copy stream and CUDA events" if dev.type == "cuda" else "synchronous memcpy, host timestamps"
    return f"morphlib.engine LLM on {where}: {graphs}, {attn}, {llm.dtype}, morph copies by {copies}"


def _time_base(device):
    """(wall time, event) recorded together: chunk events are placed on the steps' wall clock through it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return t, ev
    ev = HostEvent()
    return ev.t, ev


def _settle(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- runs
def decode_run(llm: LLM, prompts: list[list[int]], steps: int, events=(), warmup: int = 4) -> dict:
    """One run (see the module doc): {"steps", "ops", "events", "tokens", "valid", "problems"}."""
    if steps < 1 or warmup < 1:
        raise MorphError(f"a decode run needs steps >= 1 and warmup >= 1 (got {steps}, {warmup})")
    llm.reset()
    params = SamplingParams(max_tokens=1 + warmup + steps + DRAIN_TOKENS, ignore_eos=True)
    seqs = [llm.add_request(p, params) for p in prompts]
    while not all(s.output for s in seqs):
        llm.step()
    for _ in range(warmup):
        llm.step()
    t_ref, ref = _time_base(llm.device)
    t0 = llm.core.num_steps
    todo = sorted(events, key=lambda e: e.step)
    made = []  # (event, timed step of the request, ops)
    for i in range(steps):
        while todo and todo[0].step <= i and not llm.core.morph.busy:
            ev = todo.pop(0)
            ops = llm.swap(ev.layers) if ev.to == "int4" else llm.restore(ev.layers)
            made.append((ev, i, ops))
        llm.step()
    llm.wait_morph()  # ops still copying finish on untimed steps; events never reached are dropped
    _settle(llm.device)
    step_rows = [_step_row(r, t0, t_ref) for r in llm.steps
                 if r.index >= t0 - warmup and r.num_seqs and r.decode_seqs == r.num_seqs]  # decode steps only
    end = {s["index"]: s["end_ms"] for s in step_rows}
    op_rows, event_rows = [], []
    for k, (ev, asked, ops) in enumerate(made):
        rows = [_op_row(op, k, t0, t_ref, ref) for op in ops]
        op_rows += rows
        commits = sorted({r["commit_step"] for r in rows})
        last = commits[-1] if commits else None
        event_rows.append({"event": k, "of": ev.of, "label": ev.label, "to": ev.to, "layers": list(ev.layers),
                           "planned_step": ev.step, "request_step": asked, "commit_steps": commits,
                           "ops": len(rows), "bytes": sum(r["bytes"] for r in rows),
                           "latency_ms": end[last] - rows[0]["requested_ms"] if rows and last in end else None})
    window = [s for s in step_rows if 0 <= s["index"] < steps]
    problems = [f"lazy CUDA-graph capture at step {r.index - t0} ({1e3 * r.capture_s:.0f} ms)"
                for r in llm.steps if r.capture_s > 0]
    share = sum(s["path"] == "graph" for s in window) / len(window)
    if llm.runner.use_graphs and share < MIN_GRAPH_SHARE:
        problems.append(f"only {share:.0%} of the timed steps replayed a CUDA graph (< {MIN_GRAPH_SHARE:.0%})")
    return {"steps": step_rows, "ops": op_rows, "events": event_rows, "dropped_events": [e.label for e in todo],
            "tokens": [s.output[:1 + warmup + steps] for s in seqs], "graph_share": share,
            "valid": not problems, "problems": problems}


def _step_row(r, t0: int, t_ref: float) -> dict:
    return {"index": r.index - t0, "ms": 1e3 * r.seconds, "start_ms": 1e3 * (r.start - t_ref),
            "end_ms": 1e3 * (r.end - t_ref), "state": list(r.state), "int4_layers": len(r.state),
            "committed": [op.layer for op in r.committed], "copy_bytes": r.copy_bytes,
            "sync_copy_bytes": r.sync_copy_bytes, "copy_in_flight": r.copy_in_flight, "path": r.path,
            "capture_s": r.capture_s, "batch": r.num_seqs, "host_ms": r.host_ms}


def _op_row(op, event: int, t0: int, t_ref: float, ref) -> dict:
    return {"event": event, "layer": op.layer, "to": op.to, "bytes": op.copy_bytes,
            "request_step": op.request_step - t0, "issue_step": op.issue_step - t0,
            "commit_step": op.commit_step - t0, "requested_ms": 1e3 * (op.requested - t_ref),
            "committed_ms": 1e3 * (op.committed - t_ref), "copy_ms": op.copy_ms(), "span_ms": op.span_ms(),
            "commit_ms": op.commit_ms(), "host_ms": op.host_ms, "migrated_blocks": op.migrated,
            "preempted": op.preempted, "chunks": [[ref.elapsed_time(s), ref.elapsed_time(e)] for s, e in op.events]}


def idle_morphs(llm: LLM, layers, repeats: int) -> tuple[list[dict], list[dict]]:
    """``repeats`` cycles of swapping ``layers`` to INT4 and restoring them on an idle engine (the engine's
    own mechanism: copy backend, staging slots, commits; nothing else runs). Returns (one row per op:
    bytes, copy / span / commit device ms, host ms; one row per swap or restore: wall ms from the request
    to the last commit, and whether the copied bytes equal the host bytes)."""
    llm.reset()
    op_rows, group_rows = [], []
    for rep in range(repeats):
        for to in ("int4", "fp16"):
            t = time.perf_counter()
            ops = llm.swap(layers, wait=True) if to == "int4" else llm.restore(list(reversed(layers)), wait=True)
            _settle(llm.device)
            group_rows.append({"repeat": rep, "to": to, "layers": len(layers), "wall_ms": 1e3 * (time.perf_counter() - t),
                               "bytes": sum(op.copy_bytes for op in ops)})
            op_rows += [{"repeat": rep, "to": to, "layers": len(layers), "bytes": op.copy_bytes,
                         "copy_ms": op.copy_ms(), "span_ms": op.span_ms(), "commit_ms": op.commit_ms(),
                         "host_ms": op.host_ms, "chunks": len(op.events)} for op in ops]
        llm.reset()  # forget the history (and its events) before the next cycle
    return op_rows, group_rows


def same_bytes(device_bytes: torch.Tensor, host_bytes: torch.Tensor, piece: int = 16 << 20) -> bool:
    """Whether a byte range on the device equals one in host memory, compared ``piece`` bytes at a time (no
    temporary the size of a layer inside an engine's capped allocator)."""
    if device_bytes.numel() != host_bytes.numel():
        return False
    dev = device_bytes.device
    return all(torch.equal(device_bytes[i:i + piece], host_bytes[i:i + piece].to(dev))
               for i in range(0, device_bytes.numel(), piece))


def arena_matches_host(llm: LLM, layers, to: str) -> bool:
    """Whether each layer's bytes in the arena equal its host copy: the INT4 head (``to="int4"``) or the
    whole 16-bit region."""
    lay, copies = llm.layout, llm.copies
    for li in layers:
        home = lay.home(li)
        if to == "int4":
            got, want = llm.arena.bytes(home, lay.head_bytes), copies.int4_host[li]
        else:
            got, want = llm.arena.bytes(home, lay.region_bytes), copies.fp16_host[li]
        if not same_bytes(got, want):
            return False
    return True


# ----------------------------------------------------------------------------- analysis
def quiet(step: dict) -> bool:
    return not (step["copy_in_flight"] or step["committed"] or step["sync_copy_bytes"])


def _near(group: list[tuple[int, float]], index: int) -> tuple[float, int]:
    """(median of the NEIGHBOURS quiet times nearest to ``index``, distance to the nearest)."""
    near = sorted(group, key=lambda p: (abs(p[0] - index), p[0]))[:NEIGHBOURS]
    return float(np.median([ms for _, ms in near])), abs(near[0][0] - index)


def baselines(steps: list[dict]) -> list[float | None]:
    """Each step's baseline (module doc); None when the run has no quiet step to read one from."""
    groups: dict[tuple, list] = {}
    for s in steps:
        if quiet(s):
            groups.setdefault(tuple(s["state"]), []).append((s["index"], s["ms"]))
    out = []
    for s in steps:
        key, i, j = tuple(s["state"]), s["index"], s["int4_layers"]
        if key in groups:
            out.append(_near(groups[key], i)[0])
            continue
        sides = []
        for fewer in (True, False):
            cands = [(_near(g, i), len(k)) for k, g in groups.items() if (len(k) < j) == fewer and len(k) != j]
            if cands:
                (ms, _), n = min(cands, key=lambda c: c[0][1])
                sides.append((n, ms))
        if len(sides) == 2:
            (n0, b0), (n1, b1) = sides
            out.append(b0 + (j - n0) / (n1 - n0) * (b1 - b0))
        else:
            out.append(sides[0][1] if sides else None)
    return out


def timed(steps: list[dict], n: int) -> list[int]:
    """Positions (in ``steps``) of the timed steps 0 .. n-1."""
    return [k for k, s in enumerate(steps) if 0 <= s["index"] < n]


def overlapped(step: dict) -> bool:
    return bool(step["copy_in_flight"] and not step["committed"])


def slowdown(runs: list[dict], n: int, select=None) -> dict:
    """sum(time) / sum(baseline) - 1 over the overlapped timed steps (0 .. n-1) of ``runs`` (each with its own
    baselines) that ``select(step, event, run)`` keeps, and a 95 % interval from resampling whole events
    (all the steps one event's copies overlapped) with replacement."""
    ms, bs, gs = [], [], []
    for ri, run in enumerate(runs):
        event_of = step_event(run)
        for s, b in zip(run["steps"], baselines(run["steps"])):
            if 0 <= s["index"] < n and b is not None and overlapped(s) and (select is None or select(s, event_of(s), run)):
                ms.append(s["ms"])
                bs.append(b)
                gs.append(ri * 100000 + event_of(s))
    if not ms:
        return {"value": None, "ci95": None, "steps": 0}
    ms, bs, gs = np.array(ms), np.array(bs), np.array(gs)
    ci = cluster_ratio_ci(ms, bs, gs) if len(set(gs.tolist())) > 1 else None
    return {"value": float(ms.sum() / bs.sum() - 1), "ci95": None if ci is None else [ci[0] - 1, ci[1] - 1],
            "steps": int(len(ms))}


def cluster_ratio_ci(num: np.ndarray, den: np.ndarray, groups: np.ndarray, n_boot: int = 2000,
                     seed: int = 0) -> list[float]:
    """95 % percentile interval of sum(num) / sum(den) resampling whole groups with replacement."""
    keys = sorted(set(groups.tolist()))
    sums = np.array([[num[groups == g].sum(), den[groups == g].sum()] for g in keys])
    idx = np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))
    boot = sums[idx, 0].sum(1) / sums[idx, 1].sum(1)
    return [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def step_event(run: dict):
    """step index -> the event whose ops were issued and not yet committed at that step (for grouping)."""
    spans = {}
    for op in run["ops"]:
        for i in range(op["issue_step"], op["commit_step"] + 1):
            spans.setdefault(i, op["event"])
    return lambda s: spans.get(s["index"], -1)


def commit_stalls(steps: list[dict], base: list) -> list[dict]:
    """{index, stall_ms, committed, int4_layers} for every step with a commit at its boundary."""
    return [{"index": s["index"], "stall_ms": s["ms"] - b, "committed": s["committed"], "int4_layers": s["int4_layers"],
             "sync_copy_bytes": s["sync_copy_bytes"]} for s, b in zip(steps, base) if s["committed"] and b is not None]


def event_stall_ms(event: dict, stalls: list[dict]) -> float | None:
    """The stall an event caused: the sum of the stalls of the steps its layers committed at."""
    hit = [s["stall_ms"] for s in stalls if s["index"] in event["commit_steps"]]
    return float(sum(hit)) if hit else None


def inter_token_ms(steps: list[dict], n: int) -> list[float]:
    """Gaps between the ends of consecutive decode steps over timed steps 0 .. n-1 (each step gives every
    sequence one token, so these are the inter-token latencies the sequences see)."""
    end = {s["index"]: s["end_ms"] for s in steps}
    return [end[i] - end[i - 1] for i in range(n) if i in end and i - 1 in end]


def bandwidth_gbs(nbytes: int, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def mean_ci(values) -> dict:
    """Mean and its 95 % t interval (n >= 2; a single value has no interval)."""
    from scipy import stats as sps

    x = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(x):
        return {"mean": None, "ci95": None, "n": 0}
    m = float(x.mean())
    if len(x) < 2:
        return {"mean": m, "ci95": None, "n": 1}
    h = float(sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": m, "ci95": [m - h, m + h], "n": int(len(x))}


def median(values) -> float | None:
    x = [v for v in values if v is not None]
    return float(np.median(x)) if x else None


def percentile(values, p: float) -> float | None:
    x = [v for v in values if v is not None]
    return float(np.percentile(x, p)) if x else None


def step_kind(step: dict) -> str:
    """"c": a commit at its boundary, "o": overlapped by copies, "q": quiet."""
    return "c" if step["committed"] else ("o" if overlapped(step) else "q")


def compact(run: dict, n: int, digits: int = 4) -> dict:
    """A run's timed steps as arrays (ms to ``digits`` decimals): step time, inter-token gap, INT4 layers, kind."""
    steps = [run["steps"][k] for k in timed(run["steps"], n)]
    return {"step_ms": [round(s["ms"], digits) for s in steps],
            "itl_ms": [round(x, digits) for x in inter_token_ms(run["steps"], n)],
            "int4_layers": [s["int4_layers"] for s in steps], "kind": "".join(step_kind(s) for s in steps)}
