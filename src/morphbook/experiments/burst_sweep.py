"""Chapter 5's simulator tasks: the simulator's replay of every engine replay (validation), the whole policy
matrix on the simulator, and the pre-registered sweep (``[sweep]``): every whole window of each trace, the
rate grid, the controller's thresholds, the layer orders and other cards' budgets. Every task is a plain dict
for ``morphlib.engine.sweep.simulate`` (run in worker processes) with a ``key`` saying what it is.
"""

from __future__ import annotations

from morphbook.experiments.burst_plan import Plan, Setting, controller_spec, make_window, slo
from morphbook.experiments.burst_slices import engine_fields, sim_fields
from morphlib.engine.sweep import trace_dict
from morphlib.errors import MorphError
from morphlib.workloads.windows import at_rate, replay_window, window_starts


def _task(plan: Plan, setting: Setting, w, spec: dict, static: list, fields: dict, fit: dict, key: dict) -> dict:
    return {"key": key, "model": setting.sim_model, "engine": fields, "step_time": fit, "trace": trace_dict(w.trace),
            "measured": w.measured.tolist(), "controller": spec, "static": static,
            "warmup": plan.windows["warmup_requests"], "idle_tick_s": plan.windows["idle_tick_s"], "seed": 0}


def policy_task(plan: Plan, setting: Setting, w, policy: str, layer_orders: dict, cal: dict, fit: dict, key: dict,
                marks: dict | None = None, engine_over: dict | None = None) -> dict:
    """A simulator task of one policy on one window, on the calibrated engine's KV blocks (``engine_over``:
    engine fields replacing them, e.g. another card's budget)."""
    pol = plan.policy(policy)
    spec, static, _ = controller_spec(plan, setting, pol, layer_orders)
    if marks:
        spec = {**spec, "marks": {**spec["marks"], **marks}}
    fields = sim_fields(setting, engine_fields(setting, pol.engine), cal["engine"])
    if engine_over:
        fields = {**{k: v for k, v in fields.items() if k != "kv_blocks"}, **engine_over}
    task = _task(plan, setting, w, spec, static, fields, fit, {**key, "policy": policy})
    if engine_over and "workspace_bytes" in engine_over:
        task["engine"] = {k: v for k, v in fields.items() if k != "workspace_bytes"}
        task["workspace_bytes"] = engine_over["workspace_bytes"]
    return task


def validation_task(plan: Plan, setting: Setting, record: dict, w, fit: dict) -> dict:
    """The simulator's replay of one engine replay: its window, controller, static set, engine configuration and
    KV blocks, and copy bandwidth as it recorded them."""
    fields = sim_fields(setting, record["engine_fields"], record["engine"])
    return _task(plan, setting, w, record["controller_spec"], record["payload"]["static"], fields, fit,
                 {"what": "validation", "replay": record["key"]})


def sweep_tasks(plan: Plan, setting: Setting, traces: dict, cal: dict, fit: dict, layer_orders: dict,
                short: bool) -> list[dict]:
    """The pre-registered sweep for one setting (``short``: the CPU profile's few windows and values)."""
    sw = plan.data["sweep"]
    rates = cal["rates"]
    grid_s = plan.windows["grid_s"]
    tasks = []
    for name, trace in traces.items():
        if f"{name}:busiest" not in rates:
            continue
        median_rate = rates.get(f"{name}:median", rates[f"{name}:busiest"])["rate"]
        f = median_rate / trace.mean_rate
        length, pre = setting.length_s * f, setting.preroll_s * f
        starts = window_starts(trace, length, "tiled") if setting.name in sw["tiled_settings"] else []
        taken = 0
        for i, start in enumerate(starts):
            if short and taken == sw["ci_windows"]:  # the CPU profile: the first few windows that hold a request
                break
            try:
                w = at_rate(replay_window(trace, start, length, pre), median_rate, trace.mean_rate)
            except MorphError:  # a tiled window without a request is not replayed
                continue
            taken += 1
            for p in sw["tiled_policies"]:
                tasks.append(policy_task(plan, setting, w, p, layer_orders, cal, fit,
                                         {"what": "tiled", "trace": name, "window": i, "start_s": start, "rate": median_rate}))
        busy_rate = rates[f"{name}:busiest"]["rate"]
        grid = setting.rate_grid[::2] if short else setting.rate_grid
        for rate in grid:
            w = make_window(trace, setting, "busiest", rate, grid_s)
            for p in sw["rate_policies"]:
                tasks.append(policy_task(plan, setting, w, p, layer_orders, cal, fit,
                                         {"what": "rate", "trace": name, "rate": rate}))
        w = make_window(trace, setting, "busiest", busy_rate, grid_s)
        highs = sw["thresholds"]["high"][-1:] if short else sw["thresholds"]["high"]
        for high in highs:
            for persist in sw["thresholds"]["persist_s"]:
                marks = {"high": high, "persist_s": persist, "low": min(plan.marks.low, high - 0.05)}
                tasks.append(policy_task(plan, setting, w, "morph-middle", layer_orders, cal, fit,
                                         {"what": "threshold", "trace": name, "high": high, "persist_s": persist},
                                         marks=marks))
        for p in sw["orders"]:
            tasks.append(policy_task(plan, setting, w, p, layer_orders, cal, fit, {"what": "order", "trace": name}))
        if "card" in setting.engine and not short:
            workspace = cal["engine"]["memory"].get("workspace_reserved") or 0
            for card in sw["cards"]:
                for p in ("fp16-static", "morph-middle"):
                    tasks.append(policy_task(plan, setting, w, p, layer_orders, cal, fit,
                                             {"what": "card", "trace": name, "card": card},
                                             engine_over={"card": card, "workspace_bytes": int(workspace)}))
    return tasks


def matrix_tasks(plan: Plan, setting: Setting, traces: dict, cal: dict, fit: dict, layer_orders: dict) -> list[dict]:
    """Every policy on every calibrated window of the setting, on the simulator (one replay each)."""
    tasks = []
    for key, row in cal["rates"].items():
        name, kind = key.split(":")
        if name not in traces:
            continue
        w = make_window(traces[name], setting, kind, row["rate"], plan.windows["grid_s"])
        for p in plan.policies:
            tasks.append(policy_task(plan, setting, w, p, layer_orders, cal, fit,
                                     {"what": "matrix", "trace": name, "kind": kind, "rate": row["rate"]}))
    return tasks


def window_slo(plan: Plan, cal: dict, w, multiplier: float | None = None) -> tuple[float, float]:
    return slo(cal["latency"], w.median_prompt(), multiplier or plan.data["slo"]["multiplier"])
