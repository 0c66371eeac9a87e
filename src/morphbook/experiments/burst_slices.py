"""Chapter 5's measurements on a real engine, one slice at a time: a setting's calibration (the
micro-benchmark, the unloaded latencies, the rate rule) and the replays of one window under a few policies.
Both return plain records; ``morphbook.replays`` writes them with their provenance (GPU slices), the
chapter's CPU profile keeps them in memory.

* ``calibrate(plan, setting, ...)``: build the 16-bit engine, run ``engine.microbench`` and
  ``unloaded_latency``, fit the step-time model (and report it on scenarios held out of a second fit), then
  apply the rate rule per trace window on the simulator (``engine.sweep``, in worker processes) with the
  SLOs of the unloaded engine.
* ``replay_window_policies(plan, slice, calibration, ...)``: per policy and repeat of the slice, the window at
  the calibrated rate under that policy (one engine per engine configuration: the ablations change it),
  each replay with the SLOs it is measured against, its window, orders and the engine's memory report;
  stops before a replay that would pass ``deadline_s``.
"""

from __future__ import annotations

import gc
import time

from morphbook.experiments.burst_plan import (Plan, Setting, controller_spec, make_window, orders, pick_rate,
                                              replay_key, setting_trace, slo, window_fits)
from morphlib.engine.microbench import BenchPlan, copy_bandwidth, run_microbench, unloaded_latency
from morphlib.engine.steptime import fit_step_time
from morphlib.engine.sweep import engine_config, metrics, run_sweep, serve, trace_dict
from morphlib.errors import MorphError
from morphlib.workloads.traces import load_named

FORMAT = 1  # of the records written by morphbook.replays


# --------------------------------------------------------------------------- engines
def kv_blocks_for(setting: Setting) -> int | None:
    """The setting's KV cap: ``engine.kv_blocks``, or the per-layer-gain rule of ``kv_gain_of``."""
    if setting.kv_gain_of is None:
        return setting.engine.get("kv_blocks")
    from morphlib.engine import EngineConfig, Simulator, TableStepTime
    from morphlib.workloads.kvcache import CARDS, kv_capacity

    shape, card = setting.kv_gain_of.split(":")
    ref = kv_capacity(shape, CARDS[next(k for k in CARDS if k.startswith(card))], 1)
    gain = ref["extra_blocks"] / (ref["blocks"] - ref["extra_blocks"])
    fields = {k: v for k, v in setting.engine.items() if k not in ("card", "memory_budget")}
    probe = Simulator(setting.sim_model, EngineConfig(**{**fields, "kv_blocks": 1 << 20}), TableStepTime({1: 1.0}))
    return max(1, round(probe.layout.tail_blocks / gain))


def engine_fields(setting: Setting, policy_engine: dict | None = None) -> dict:
    fields = {**setting.engine, **(policy_engine or {})}
    kv = kv_blocks_for(setting)
    if kv is not None:
        fields["kv_blocks"] = kv
    return fields


def build_llm(setting: Setting, fields: dict, seed: int = 0, clock=None):
    """The real engine of a setting: random weights for a shape or a config dict; SmolLM2's real weights when
    they are in the cache (else its shape, random, and the record says so). ``clock``: the engine's clock
    (default: the wall)."""
    from morphlib.engine import LLM

    cfg = engine_config({**fields, "seed": seed})
    model, weights = setting.model, "random"
    if isinstance(model, dict):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**model, tie_word_embeddings=False)).eval()
    elif not model.startswith("shape:"):
        from morphlib.bench.engine import smollm2_cached

        if model == "smollm2-135m" and smollm2_cached():
            weights = "real"
        else:
            model = f"shape:{model}"
    llm = LLM(model, cfg, clock=clock)
    llm.morphbook_weights = weights
    return llm


def release() -> None:
    """Free what a dropped engine held (call after the last reference to it is gone)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _close(llm) -> None:
    if hasattr(llm, "close"):  # the CUDA allocator's cap (the simulator has none)
        llm.close()


def engine_record(llm) -> dict:
    lay = llm.layout
    rec = {"main_blocks": lay.main_blocks, "tail_blocks": lay.tail_blocks, "block_size": lay.block_size,
           "weights": getattr(llm, "morphbook_weights", None), "device": str(getattr(llm, "device", "simulator"))}
    mem = llm.memory_report() if hasattr(llm, "memory_report") else {}  # the simulator has no device memory
    rec["memory"] = {k: v for k, v in mem.items() if not isinstance(v, dict)}
    return rec


# --------------------------------------------------------------------------- the calibration slice
def _traces(setting: Setting, traces_dir=None) -> dict:
    return {name: setting_trace(load_named(name, traces_dir), setting) for name in setting.traces}


def rates_without_window(setting: Setting, traces: dict) -> dict[str, list[float]]:
    """{trace: the grid rates at which it holds no whole window} (BurstGPT's first 400 rows span 10 h at
    0.01 req/s: from 5.6 req/s on, a 72-s replay window would need more than the whole trace)."""
    out = {name: [r for r in setting.rate_grid if not window_fits(trace, setting, r)] for name, trace in traces.items()}
    return {name: rates for name, rates in out.items() if rates}


def rate_tasks(plan: Plan, setting: Setting, traces: dict, fit: dict, latency: dict, kv: dict) -> list[dict]:
    """Simulator tasks of the rate rule: FP16-static on every (trace, kind, grid rate) at which the trace holds
    a whole window (``rates_without_window``: those rates are left out of the sweep, and recorded)."""
    fields = sim_fields(setting, engine_fields(setting), kv)
    tasks = []
    for name, trace in traces.items():
        for kind in setting.kinds:
            for rate in (r for r in setting.rate_grid if window_fits(trace, setting, r)):
                w = make_window(trace, setting, kind, rate, plan.windows["grid_s"])
                tasks.append({"key": [name, kind, rate], "model": setting.sim_model, "engine": fields, "step_time": fit,
                              "trace": trace_dict(w.trace), "measured": w.measured.tolist(),
                              "controller": {"name": "static", "layers": []},
                              "warmup": plan.windows["warmup_requests"], "idle_tick_s": plan.windows["idle_tick_s"],
                              "slo": slo(latency, w.median_prompt(), plan.data["slo"]["multiplier"]),
                              "length_s": w.length_s})
    return tasks


def sim_fields(setting: Setting, fields: dict, kv: dict) -> dict:
    """The simulator's engine fields for a real engine's: the same configuration with the engine's KV blocks
    (its budget is spent already) and its measured copy bandwidth."""
    out = {k: v for k, v in fields.items() if k not in ("card", "memory_budget", "device", "enforce_budget")}
    out["kv_blocks"], out["device"] = kv["main_blocks"], "cpu"  # sizes are device-independent; no CUDA in workers
    if kv.get("copy_bandwidth"):
        out["copy_bandwidth"] = kv["copy_bandwidth"]
    return out


def apply_rate_rule(plan: Plan, tasks: list[dict], payloads: list[dict]) -> tuple[list[dict], dict]:
    """(every swept row, {"trace:kind": chosen row})."""
    rows = []
    for task, p in zip(tasks, payloads):
        (name, kind, rate), (ttft, tpot) = task["key"], task["slo"]
        m = metrics(p, ttft, tpot, task["length_s"])
        rows.append({"trace": name, "kind": kind, "rate": rate, "slo_ttft_s": ttft, "slo_tpot_s": tpot,
                     "ttft_violation_pct": m["ttft_violation_pct"], "slo_violation_pct": m["slo_violation_pct"],
                     "ttft_p95_s": m["ttft_p95_s"], "requests": m["requests"]})
    r = plan.data["rates"]
    chosen = {}
    for key in sorted({(x["trace"], x["kind"]) for x in rows}):
        part = [x for x in rows if (x["trace"], x["kind"]) == key]
        chosen[":".join(key)] = pick_rate(part, r["lo_pct"], r["hi_pct"], r["target_pct"])
    return rows, chosen


def _threads(setting: Setting):
    """One torch thread while a CPU setting's engine runs (``experiments.base.cpu_threads``); a no-op on a GPU."""
    from morphbook.experiments.base import cpu_threads

    return cpu_threads("cpu" if setting.runs_on == "cpu" else "cuda")


def calibrate(plan: Plan, setting: Setting, *, traces_dir=None, workers=None, progress=print) -> dict:
    """The calibration slice of a setting (see the module doc)."""
    t0 = time.perf_counter()
    fields = engine_fields(setting)
    llm = build_llm(setting, fields)
    try:
        eng = engine_record(llm)
        progress(f"engine: {eng['main_blocks']} KV blocks + {eng['tail_blocks']} per swapped layer, weights {eng['weights']}")
        bench_plan = BenchPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in setting.bench.items()})
        with _threads(setting):  # one torch thread on CPU, as in the replays
            bench = run_microbench(llm, bench_plan)
            progress(f"micro-benchmark: {len(bench['steps'])} steps in {bench['seconds']:.0f} s")
            s = plan.data["slo"]
            latency = unloaded_latency(llm, s["ttft_prompts"], reps=s["reps"], tpot_tokens=s["tpot_tokens"])
    finally:
        _close(llm)
    del llm
    release()
    eng["copy_bandwidth"] = _measured_bw(bench["ops"], fields, eng)
    fit, report = fit_models(bench["steps"], bench["scenarios"], fields)
    progress(f"step-time model: held-out median error {report['holdout'].get('median_abs_pct', float('nan')):.1f} %")
    traces = _traces(setting, traces_dir)
    no_window = rates_without_window(setting, traces)
    for name, rates in no_window.items():
        progress(f"rate rule {name}: no whole window at {', '.join(f'{r:g}' for r in rates)} req/s (left out)")
    tasks = rate_tasks(plan, setting, traces, fit, latency, eng)
    rows, chosen = apply_rate_rule(plan, tasks, run_sweep(tasks, workers))
    for key, row in chosen.items():
        progress(f"rate rule {key}: {row['rate']:g} req/s ({row['ttft_violation_pct']:.0f} % over the TTFT SLO)")
    return {"format": FORMAT, "kind": "calibration", "setting": setting.name, "prereg": plan.digest,
            "engine_fields": fields, "engine": eng, "bench": bench, "latency": latency, "fit": fit,
            "fit_report": report, "rate_sweep": rows, "rates_without_window": no_window, "rates": chosen, "seconds": time.perf_counter() - t0}


def fit_models(steps: list[dict], scenarios: list[str], fields: dict) -> tuple[dict, dict]:
    """The step-time model fitted on every benchmark scenario, and a report that includes the errors of a
    second fit on three scenarios in four on the fourth."""
    buckets = engine_config(fields).buckets() if fields.get("cuda_graphs", True) else ()
    held = set(scenarios[1::4])
    check = fit_step_time([r for r in steps if r["scenario"] not in held], buckets=buckets,
                          holdout=[r for r in steps if r["scenario"] in held])
    full = fit_step_time(steps, buckets=buckets)
    report = {**full.report, "holdout": check.report["holdout"], "holdout_scenarios": sorted(held)}
    return full.to_dict(), report


# --------------------------------------------------------------------------- a replay slice
def replay_window_policies(plan: Plan, setting: Setting, window: tuple, replays, calibration: dict, sets: dict, *,
                           traces_dir=None, deadline_s: float | None = None, progress=print) -> dict[str, dict]:
    """The replays of one window under the given (policy, repeat) pairs (see the module doc); {key: record}.
    On a CPU setting the engine runs with one torch thread (``experiments.base.cpu_threads``: with two,
    OpenMP's spin-waits made the CPU instrument's repeats of one replay differ by up to 56 % in P95 TTFT)."""
    with _threads(setting):
        return _replay_window_policies(plan, setting, window, replays, calibration, sets, traces_dir=traces_dir,
                                       deadline_s=deadline_s, progress=progress)


def _replay_window_policies(plan: Plan, setting: Setting, window: tuple, replays, calibration: dict, sets: dict, *,
                            traces_dir=None, deadline_s: float | None = None, progress=print) -> dict[str, dict]:
    if calibration.get("prereg") != plan.digest:
        raise MorphError(f"the calibration of {setting.name} was made under another pre-registration: re-run "
                         f"{setting.name}.calibrate")
    trace_name, kind = window
    chosen = calibration["rates"].get(f"{trace_name}:{kind}")
    if chosen is None:
        raise MorphError(f"the calibration of {setting.name} has no rate for {trace_name}:{kind}")
    trace = _traces(setting, traces_dir)[trace_name]
    w = make_window(trace, setting, kind, chosen["rate"], plan.windows["grid_s"])
    mult = plan.data["slo"]["multiplier"]
    ttft_slo, tpot_slo = slo(calibration["latency"], w.median_prompt(), mult)
    layer_orders = orders(sets, setting.num_layers, setting.max_int4)
    t0, out = time.perf_counter(), {}
    groups: dict[tuple, list] = {}
    for pname, rep in replays:
        groups.setdefault(tuple(sorted(plan.policy(pname).engine.items())), []).append((pname, rep))
    estimate = w.length_s + w.preroll_s + 30.0
    for eng_key, items in groups.items():
        fields = engine_fields(setting, dict(eng_key))
        if deadline_s is not None and time.perf_counter() - t0 + estimate + 60 > deadline_s:
            progress(f"deadline: {len(items)} replay(s) not started")
            break
        llm = build_llm(setting, fields)
        try:
            eng = engine_record(llm)
            for pname, rep in items:
                if deadline_s is not None and time.perf_counter() - t0 + estimate > deadline_s:
                    progress(f"deadline: {pname} r{rep} not started")
                    continue
                policy = plan.policy(pname)
                spec, static, ahead = controller_spec(plan, setting, policy, layer_orders)
                t1 = time.perf_counter()
                payload = serve(llm, w.trace, w.measured, controller=spec, static=static,
                                warmup=plan.windows["warmup_requests"], idle_tick_s=plan.windows["idle_tick_s"],
                                seed=0, precapture=ahead)
                key = replay_key(setting.name, trace_name, kind, pname, rep)
                m = metrics(payload, ttft_slo, tpot_slo, w.length_s)
                progress(f"{key}: {time.perf_counter() - t1:.0f} s, SLO violations {m['slo_violation_pct']:.1f} %, "
                         f"P95 TTFT {m['ttft_p95_s']:.2f} s")
                out[key] = {"format": FORMAT, "kind": "replay", "key": key, "setting": setting.name, "trace": trace_name,
                            "window_kind": kind, "policy": pname, "repeat": rep, "prereg": plan.digest,
                            "rate": chosen["rate"], "window": {"start_s": w.start_s, "length_s": w.length_s,
                                                               "preroll_s": w.preroll_s, "name": w.trace.name,
                                                               "median_prompt": w.median_prompt()},
                            "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo, "multiplier": mult},
                            "orders": layer_orders, "controller_spec": spec, "engine_fields": fields,
                            "engine": {**eng, "copy_bandwidth": _measured_bw(payload["ops"], fields, eng)},
                            "payload": payload, "seconds": time.perf_counter() - t1}
        finally:
            _close(llm)
        del llm
        release()  # before the next engine is built
    return out


def _measured_bw(ops: list[dict], fields: dict, eng: dict) -> float | None:
    """The copy bandwidth the simulator should model: measured on CUDA (the copy stream's events); on CPU the
    engine's copies land by its configured bandwidth (the same timing model as the simulator's)."""
    measured = copy_bandwidth(ops) if eng.get("device", "").startswith("cuda") else None
    return measured or fields.get("copy_bandwidth")



# --------------------------------------------------------------------------- the deterministic virtual-clock replay
def virtual_replay(plan: Plan, setting: Setting, cal: dict, fit: dict, window, layer_orders: dict) -> dict:
    """The CPU engine (real forward passes) on a virtual clock driven by the fitted step-time model: the
    MorphServe-style policy on ``window`` twice, each payload's digest, and the simulator's on the same task
    (the same core: the same decisions)."""
    from morphlib.engine import VirtualClock
    from morphlib.engine.steptime import StepTimeFit
    from morphlib.engine.sweep import digest, simulate

    t0 = time.perf_counter()
    fields = engine_fields(setting)
    spec, static, ahead = controller_spec(plan, setting, plan.policy("morph-middle"), layer_orders)
    opts = dict(controller=spec, static=static, warmup=plan.windows["warmup_requests"],
                idle_tick_s=plan.windows["idle_tick_s"], seed=0)
    llm = build_llm(setting, fields, clock=VirtualClock(StepTimeFit.from_dict(fit)))
    try:
        runs = [serve(llm, window.trace, window.measured, precapture=ahead, **opts) for _ in range(2)]
    finally:
        _close(llm)
    del llm
    release()
    sim = simulate({"model": setting.sim_model, "engine": sim_fields(setting, fields, cal["engine"]), "step_time": fit,
                    "trace": trace_dict(window.trace), "measured": window.measured.tolist(), **opts})
    d = [digest(p) for p in runs]
    return {"digests": d, "repeatable": d[0] == d[1], "simulator_digest": digest(sim), "matches_simulator": digest(sim) == d[0],
            "steps": len(runs[0]["steps"]["start"]), "swaps": sum(op["to"] == "int4" for op in runs[0]["ops"]),
            "restores": sum(op["to"] == "fp16" for op in runs[0]["ops"]), "requests": len(window.trace),
            "seconds": time.perf_counter() - t0}
