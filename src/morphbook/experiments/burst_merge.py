"""Chapter 5's analysis of replay records (engine or simulator): per-policy metrics pooled over repeats with
bootstrap intervals (paired over the window's requests, repeats drawn at random), reductions against 16-bit
serving, quality costs from chapter 2, timelines, SLO attainment curves, surge lead times, the simulator's
validation against every engine replay and the engine's own run-to-run spread.
"""

from __future__ import annotations

import numpy as np

from morphbook.experiments.burst_plan import CH2_LAYERS, Plan, quality_at, quality_curve
from morphlib.engine.control import lead_times, surge_onsets
from morphlib.engine.sweep import metrics, request_arrays

TIMELINE_BIN_S = 0.5


# --------------------------------------------------------------------------- per replay
def quality_cost(payload: dict, policy, order_name: str | None, num_layers: int, curves: dict) -> dict:
    """Time-weighted mean held-out perplexity change (%) of the layers computing in INT4 over the replay, and
    whether any part of it was extrapolated beyond chapter 2's largest count."""
    steps = payload["steps"]
    start = np.asarray(steps["start"])
    if not len(start) or policy.oracle:
        return {"quality_cost_pct": 0.0, "extrapolated": False}
    dt = np.diff(np.append(start, steps["end"][-1]))
    int4 = np.asarray(steps["int4"])
    if not int4.any():
        return {"quality_cost_pct": 0.0, "extrapolated": False}
    curve = curves["all" if policy.layers == "all" else order_name]
    cost, extra = 0.0, False
    for j in np.unique(int4):
        if j == 0:
            continue
        q, ext = quality_at(curve, j * CH2_LAYERS / num_layers)
        cost += q * dt[int4 == j].sum()
        extra |= ext
    return {"quality_cost_pct": float(cost / dt.sum()) if dt.sum() > 0 else 0.0, "extrapolated": bool(extra)}


def quality_curves(plan: Plan, records: list[dict], ppl_16bit: float) -> dict:
    return {name: quality_curve(records, strategy, ppl_16bit) for name, strategy in plan.data["quality"]["strategy"].items()}


def timeline(payload: dict, bin_s: float = TIMELINE_BIN_S) -> dict:
    """Arrivals per second, KV capacity and use, INT4 layers and queued requests per ``bin_s`` of the replay."""
    steps, reqs = payload["steps"], payload["requests"]
    end = max(steps["end"][-1] if steps["end"] else 0.0, max(reqs["arrival"], default=0.0))
    n = int(end // bin_s) + 1
    arrivals = np.bincount((np.asarray(reqs["arrival"]) // bin_s).astype(int), minlength=n)[:n] / bin_s
    idx = np.minimum((np.asarray(steps["start"]) // bin_s).astype(int), n - 1)
    out = {"t": (np.arange(n) * bin_s).tolist(), "arrivals_per_s": arrivals.tolist()}
    for name in ("kv_capacity", "kv_used", "int4", "waiting"):
        vals = np.asarray(steps[name], dtype=float)
        if name == "waiting":  # the longest queue within the bin
            col = np.zeros(n)
            np.maximum.at(col, idx, vals)
        else:  # the last step of each bin (steps are in time order), carried over empty bins
            col = np.full(n, np.nan)
            col[idx] = vals
            col = _ffill(col)
        out[name] = [None if not np.isfinite(v) else float(v) for v in col]
    return out


def _ffill(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    for i in range(1, len(out)):
        if np.isnan(out[i]):
            out[i] = out[i - 1]
    return out


# --------------------------------------------------------------------------- pooled over repeats, with intervals
def _outcomes(payload: dict, slo_ttft: float, slo_tpot: float) -> dict:
    a = request_arrays(payload)
    ttft_bad, tpot_bad = a["ttft"] > slo_ttft, a["tpot"] > slo_tpot
    return {"ttft": a["ttft"], "tpot": a["tpot"], "multi": a["output"] > 1, "bad": ttft_bad | tpot_bad,
            "ttft_bad": ttft_bad, "tpot_bad": tpot_bad}


def _stat(name: str, o: list[dict], idx: np.ndarray, reps: np.ndarray, length_s: float) -> float:
    """One statistic of a cell on requests ``idx`` (the same for every policy of a window: paired), taking for
    percentiles one repeat per draw (``reps``) and for rates the mean over the drawn repeats."""
    if name in RATES:
        return float(100 * np.mean([o[r][RATES[name]][idx].mean() for r in reps]))
    if name == "goodput":
        return float(np.mean([(~o[r]["bad"][idx]).sum() for r in reps]) / length_s)
    r = o[reps[0]]
    which, p = name.split("_")[1], int(name.split("_")[0][1:])
    if which == "ttft":
        return float(np.percentile(r["ttft"][idx], p))
    t = r["tpot"][idx][r["multi"][idx]]
    return float(1e3 * np.percentile(t, p)) if len(t) else float("nan")


RATES = {"slo_violation_pct": "bad", "ttft_violation_pct": "ttft_bad", "tpot_violation_pct": "tpot_bad"}
STATS = ("slo_violation_pct", "p95_ttft_s", "p99_tpot_ms", "goodput", "ttft_violation_pct", "tpot_violation_pct",
         "p50_ttft_s", "p99_ttft_s", "p50_tpot_ms")


def pooled_cells(cells: dict, slo: dict, length_s: dict, n_boot: int, seed: int) -> dict:
    """``cells``: {(window, policy): [payload per repeat]} -> {(window, policy): {stat: value, stat_ci95: [lo,
    hi], replays: n}} and, per morphing policy of a window with a 16-bit cell, the SLO-violation reduction (%)
    and P95-TTFT speedup against it with intervals (the same bootstrap draws for both cells)."""
    rng = np.random.default_rng(seed)
    windows = sorted({w for w, _ in cells})
    out = {}
    for w in windows:
        pols = {p: [_outcomes(x, *slo[w]) for x in cells[(w, p)]] for (ww, p) in cells if ww == w}
        n = len(next(iter(pols.values()))[0]["ttft"])
        if any(len(o["ttft"]) != n for os in pols.values() for o in os):
            raise ValueError(f"{w}: policies measured different requests")
        full = np.arange(n)
        draws = {p: [] for p in pols}
        base = {p: {s: _stat(s, os, full, np.arange(len(os)), length_s[w]) for s in STATS} for p, os in pols.items()}
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            for p, os in pols.items():
                reps = rng.integers(0, len(os), len(os))
                draws[p].append([_stat(s, os, idx, reps, length_s[w]) for s in STATS])
        for p, os in pols.items():
            d = np.asarray(draws[p])
            cell = {"replays": len(os), "requests": n}
            for i, s in enumerate(STATS):
                cell[s] = base[p][s]
                cell[f"{s}_ci95"] = _ci(d[:, i])
            out[(w, p)] = cell
        if "fp16-static" in pols:
            ref = np.asarray(draws["fp16-static"])
            for p in pols:
                if p == "fp16-static":
                    continue
                d, cell = np.asarray(draws[p]), out[(w, p)]
                b = base["fp16-static"]
                cell["slo_violation_reduction_vs_fp16"] = _reduction(b["slo_violation_pct"], base[p]["slo_violation_pct"])
                cell["slo_violation_reduction_vs_fp16_ci95"] = _ci(_reduction(ref[:, 0], d[:, 0]))
                cell["p95_ttft_speedup_vs_fp16"] = _ratio(b["p95_ttft_s"], base[p]["p95_ttft_s"])
                cell["p95_ttft_speedup_vs_fp16_ci95"] = _ci(_ratio(ref[:, 1], d[:, 1]))
    return out


def _reduction(ref, new):
    ref, new = np.asarray(ref, dtype=float), np.asarray(new, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 100 * (1 - new / ref)
    return float(r) if r.ndim == 0 else r


def _ratio(ref, new):
    ref, new = np.asarray(ref, dtype=float), np.asarray(new, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ref / new
    return float(r) if r.ndim == 0 else r


def _ci(x) -> list:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else [None, None]


def attainment(payloads: list[dict], latency: dict, prompt: int, curve, slo_fn) -> list[dict]:
    """Share of measured requests meeting both SLOs at each multiplier of ``curve`` (mean over repeats)."""
    out = []
    for m in curve:
        ttft, tpot = slo_fn(latency, prompt, m)
        bad = [_outcomes(p, ttft, tpot)["bad"].mean() for p in payloads]
        out.append({"multiplier": m, "slo_ttft_s": ttft, "slo_tpot_s": tpot, "attainment_pct": float(100 * (1 - np.mean(bad)))})
    return out


def surge_leads(fp16: dict, others: dict[str, dict], plan: Plan) -> list[dict]:
    """Per surge onset of the 16-bit replay's demand: the lead time of each controller's first swap."""
    series = (fp16.get("controller") or {}).get("series") or {}
    m, s = plan.marks, plan.data["surges"]
    onsets = surge_onsets(series.get("t", []), series.get("demand", []), m.high, m.low)
    rows = []
    for name, payload in others.items():
        events = (payload.get("controller") or {}).get("events") or []
        for i, lead in enumerate(lead_times(events, onsets, s["lookback_s"], s["lag_s"])):
            rows.append({"policy": name, "surge": i, "onset_s": lead.onset, "first_swap_s": lead.first_swap,
                         "lead_s": lead.lead_s})
    return rows


# --------------------------------------------------------------------------- validation
VALIDATED = (("ttft_p50_s", "ttft"), ("ttft_p95_s", "ttft"), ("ttft_p99_s", "ttft"), ("tpot_mean_ms", "tpot"))


def validation_row(engine: dict, sim: dict, slo_ttft: float, slo_tpot: float, length_s: float) -> dict:
    """Simulator against one engine replay: relative errors (%) of TTFT P50/P95/P99 and mean TPOT, and the
    joint SLO violation's difference in points."""
    e, s = metrics(engine, slo_ttft, slo_tpot, length_s), metrics(sim, slo_ttft, slo_tpot, length_s)
    row = {"engine": {k: e[k] for k, _ in VALIDATED} | {"slo_violation_pct": e["slo_violation_pct"]},
           "simulator": {k: s[k] for k, _ in VALIDATED} | {"slo_violation_pct": s["slo_violation_pct"]}}
    for k, _ in VALIDATED:
        row[f"{k}_error_pct"] = float(100 * (s[k] / e[k] - 1)) if e[k] else float("nan")
    row["slo_violation_error_pts"] = s["slo_violation_pct"] - e["slo_violation_pct"]
    row["engine_steps"], row["simulator_steps"] = len(engine["steps"]["start"]), len(sim["steps"]["start"])
    return row


def repeat_spread(cells: dict, slo: dict, length_s: dict) -> list[dict]:
    """Per cell with at least two engine repeats: the range over repeats of each validated metric, as a
    percentage of their mean (points for the SLO violation)."""
    rows = []
    for (w, p), payloads in sorted(cells.items()):
        if len(payloads) < 2:
            continue
        ms = [metrics(x, *slo[w], length_s[w]) for x in payloads]
        row = {"window": w, "policy": p, "repeats": len(ms)}
        for k, _ in VALIDATED:
            v = np.array([m[k] for m in ms])
            row[f"{k}_spread_pct"] = float(100 * (v.max() - v.min()) / v.mean()) if v.mean() else float("nan")
        sv = [m["slo_violation_pct"] for m in ms]
        row["slo_violation_spread_pts"] = float(max(sv) - min(sv))
        rows.append(row)
    return rows
