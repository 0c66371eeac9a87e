"""Serving one replay window under one policy, on the real engine or on the simulator, as a compact record;
the simulator's runs in parallel worker processes; a record's metrics on its measured requests.

    payload = serve(engine, trace, measured, controller={"name": "reactive", "order": [...]}, warmup=8)
    payloads = run_sweep([task, ...], workers=8)       # each task: simulate(task) in a worker process
    m = metrics(payload, slo_ttft_s=1.2, slo_tpot_s=0.1, length_s=72)

``serve`` is the one way a window is replayed, so that every policy, on the engine or the simulator, gets
identical arrivals and prompts (the prompts' seed is the window's): the engine is reset, a static INT4 set
is swapped in before the start, the trace's first shapes are served as a warm-up before the controller is
attached, then the replay runs to a full drain (idle ticks call the controller). The payload holds every
request (arrival, first scheduled, first token, finish, lengths, preemptions; times from the replay's
start), every step (``steptime.ROW_FIELDS``, columnar), the morph operations, the controller's log, the
number of requests clipped to the context and the engine's KV sizing.

A simulator task is a plain dict (picklable, JSON-able): ``model`` (a shape name or an HF config dict),
``engine`` (``EngineConfig`` fields), ``step_time`` (``StepTimeFit.to_dict()``), ``trace`` (``arrival_s``,
``context_tokens``, ``generated_tokens``, ``name``), ``measured`` (a mask), ``serve``'s options, and
``workspace_bytes`` when the KV pool is sized from a budget (``EngineConfig.card``) rather than given.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from morphlib.engine.config import EngineConfig, SamplingParams
from morphlib.engine.control import make_controller
from morphlib.engine.replay import trace_requests
from morphlib.engine.steptime import ROW_FIELDS, StepTimeFit, step_row
from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace

REQUEST_FIELDS = ("arrival", "first_scheduled", "first_token", "finished", "prompt", "output", "preemptions",
                  "recomputed")


def _columns(rows: list[dict], fields) -> dict[str, list]:
    return {f: [r[f] for r in rows] for f in fields}


def serve(engine, trace: Trace, measured, *, controller: dict | None = None, static=(), warmup: int = 0,
          idle_tick_s: float | None = None, seed: int = 0, precapture=None) -> dict:
    """Replay ``trace`` on ``engine`` under one policy (see the module doc); ``measured``: per request of the
    trace, whether it counts (the pre-roll's do not)."""
    measured = [bool(m) for m in measured]
    if len(measured) != len(trace):
        raise MorphError(f"measured has {len(measured)} entries for {len(trace)} requests")
    engine.controller = None
    engine.reset()
    if static:
        engine.swap(list(static), wait=True)
    if warmup:
        warm, _ = trace_requests(trace, engine.max_model_len, engine.spec.vocab, max_requests=warmup, seed=seed + 1)
        engine.generate([ids for _, ids, _ in warm], [SamplingParams(max_tokens=g, ignore_eos=True) for *_, g in warm])
    ctrl = make_controller(controller) if controller else None
    engine.controller = ctrl
    try:
        res = engine.replay(trace, seed=seed, precapture=precapture if precapture is not None else (),
                            idle_tick_s=idle_tick_s if ctrl is not None else None)
    finally:
        engine.controller = None
    t0 = res.steps[0].start if res.steps else 0.0
    t0 = min([t0] + [o.arrival for o in res.outputs])
    reqs = [{"arrival": o.arrival - t0, "first_scheduled": o.first_scheduled - t0, "first_token": o.first_token - t0,
             "finished": o.finished - t0, "prompt": len(o.prompt_token_ids), "output": len(o.token_ids),
             "preemptions": o.preemptions, "recomputed": o.recomputed_tokens} for o in res.outputs]
    steps = [step_row(r) for r in res.steps]
    for s in steps:
        s["start"], s["end"] = s["start"] - t0, s["end"] - t0
    record = ctrl.record() if ctrl is not None else None
    if record is not None:
        record["events"] = [{**e, "t": e["t"] - t0} for e in record["events"]]
        record["series"]["t"] = [t - t0 for t in record["series"]["t"]]
    ops = []
    for op in res.morph_ops:
        rec = op.record()
        for k in ("requested", "issued", "committed"):
            if rec[k] is not None:
                rec[k] -= t0
        ops.append(rec)
    lay = engine.layout
    return {"trace": trace.name, "requests": _columns(reqs, REQUEST_FIELDS), "measured": measured,
            "steps": _columns(steps, ROW_FIELDS), "ops": ops, "controller": record, "static": list(static),
            "clipped": res.clipped, "duration_s": res.duration_s, "warmup": warmup,
            "kv": {"main_blocks": lay.main_blocks, "tail_blocks": lay.tail_blocks, "block_size": lay.block_size,
                   "grows_pool": engine.config.swap_grows_pool, "compute": engine.config.swap_compute}}


MEASURED = ("host_ms", "copy_device_ms", "commit_device_ms")  # an op's timings by a real clock, not decisions


def digest(payload: dict) -> str:
    """sha256 of a payload without what a real clock measured (the ops' ``MEASURED`` fields): two replays on a
    virtual clock that decided alike have the same digest."""
    import hashlib
    import json

    ops = [{k: v for k, v in op.items() if k not in MEASURED} for op in payload["ops"]]
    text = json.dumps({**payload, "ops": ops, "key": None}, sort_keys=True, default=float)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- the simulator, in workers
def _trace(d: dict) -> Trace:
    return Trace(d.get("name", "window"), "azure", np.asarray(d["arrival_s"], dtype=np.float64),
                 np.asarray(d["context_tokens"], dtype=np.int64), np.asarray(d["generated_tokens"], dtype=np.int64), "t0")


def trace_dict(trace: Trace) -> dict:
    """A trace as a task's plain dict."""
    return {"name": trace.name, "arrival_s": trace.arrival_s.tolist(), "context_tokens": trace.context_tokens.tolist(),
            "generated_tokens": trace.generated_tokens.tolist()}


def engine_config(fields: dict) -> EngineConfig:
    """An ``EngineConfig`` from plain fields (lists become tuples)."""
    try:
        return EngineConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as exc:
        raise MorphError(f"engine fields: {exc}") from None


def simulate(task: dict) -> dict:
    """One simulator replay of a task (see the module doc); the payload carries the task's ``key``."""
    from morphlib.engine.simulator import Simulator

    model = task["model"]
    if isinstance(model, dict):
        model = {**model, "model_type": "llama"}
    sim = Simulator(model, engine_config(task["engine"]), StepTimeFit.from_dict(task["step_time"]),
                    workspace_bytes=task.get("workspace_bytes", 0))
    payload = serve(sim, _trace(task["trace"]), task["measured"], controller=task.get("controller"),
                    static=task.get("static", ()), warmup=task.get("warmup", 0), idle_tick_s=task.get("idle_tick_s"),
                    seed=task.get("seed", 0))
    return {**payload, "key": task.get("key")}


def _worker_simulate(task: dict) -> tuple[dict, dict]:
    """``simulate`` in a worker process (one torch thread), with the fingerprint of the code it ran."""
    import torch

    from morphlib import fingerprint

    torch.set_num_threads(1)
    with fingerprint.recording() as rec:
        payload = simulate(task)
    return payload, rec.fingerprint()


def run_sweep(tasks: list[dict], workers: int | None = None) -> list[dict]:
    """``simulate`` every task, in ``workers`` processes (None: the CPUs this process may use; 1: here, in
    order); payloads in the tasks' order. The code the workers ran joins this process's fingerprint
    recordings (``fingerprint.merge_into_current``), so a result made from their payloads records it."""
    from morphlib import fingerprint

    n = workers if workers is not None else len(os.sched_getaffinity(0))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MorphError(f"workers must be a positive number of processes, got {workers!r}")
    if n == 1 or len(tasks) <= 1:
        return [simulate(t) for t in tasks]
    out = []
    with ProcessPoolExecutor(max_workers=min(n, len(tasks)), mp_context=get_context("spawn")) as pool:
        for payload, units in pool.map(_worker_simulate, tasks, chunksize=1):
            fingerprint.merge_into_current(units)
            out.append(payload)
    return out


# --------------------------------------------------------------------------- metrics
def request_arrays(payload: dict, measured_only: bool = True) -> dict[str, np.ndarray]:
    """TTFT and per-request mean TPOT (0 for one-token requests) of the payload's (measured) requests."""
    r = payload["requests"]
    keep = np.asarray(payload["measured"], dtype=bool) if measured_only else np.ones(len(r["arrival"]), dtype=bool)
    arr = {k: np.asarray(v, dtype=np.float64)[keep] for k, v in r.items()}
    n = arr["output"]
    tpot = np.where(n > 1, (arr["finished"] - arr["first_token"]) / np.maximum(n - 1, 1), 0.0)
    return {"ttft": arr["first_token"] - arr["arrival"], "tpot": tpot, "preemptions": arr["preemptions"],
            "recomputed": arr["recomputed"], "output": n}


def metrics(payload: dict, slo_ttft_s: float, slo_tpot_s: float, length_s: float) -> dict:
    """SLO violations (TTFT, TPOT by each request's mean, joint) in percent, TTFT and TPOT percentiles,
    goodput (measured requests meeting both SLOs per second of the window), preemptions and recomputed
    tokens, swaps and restores, and the time-weighted INT4 layer count."""
    a = request_arrays(payload)
    ttft_bad, tpot_bad = a["ttft"] > slo_ttft_s, a["tpot"] > slo_tpot_s
    joint = ttft_bad | tpot_bad
    steps = payload["steps"]
    start, int4 = np.asarray(steps["start"]), np.asarray(steps["int4"])
    dt = np.diff(np.append(start, steps["end"][-1])) if len(start) else np.array([])
    pct = (lambda x, p: float(np.percentile(x, p)) if len(x) else float("nan"))
    multi = a["output"] > 1
    return {"requests": int(len(a["ttft"])), "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
            "ttft_violation_pct": float(100 * ttft_bad.mean()), "tpot_violation_pct": float(100 * tpot_bad.mean()),
            "slo_violation_pct": float(100 * joint.mean()),
            **{f"ttft_p{p}_s": pct(a["ttft"], p) for p in (50, 95, 99)},
            "tpot_mean_ms": float(1e3 * a["tpot"][multi].mean()) if multi.any() else float("nan"),
            **{f"tpot_p{p}_ms": 1e3 * pct(a["tpot"][multi], p) for p in (50, 95, 99)},
            "goodput_rps": float((~joint).sum() / length_s),
            "preemptions": int(a["preemptions"].sum()), "recomputed_tokens": int(a["recomputed"].sum()),
            "swaps": sum(op["to"] == "int4" for op in payload["ops"]),
            "restores": sum(op["to"] == "fp16" for op in payload["ops"]),
            "int4_layers_time_weighted": float(np.dot(int4, dt) / dt.sum()) if dt.sum() > 0 else 0.0,
            "clipped": payload["clipped"], "duration_s": payload["duration_s"]}
