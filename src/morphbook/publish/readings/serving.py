"""Chapter 5's serving readings: how many replays back the numbers, what morphing did to SLO violations and
P95 TTFT against 16-bit serving on identical arrivals, which part of it the ablations attribute to the grown
KV pool and which to INT4 compute, whether the simulator matches the engine, and what that says about the
paper's claim. Every comparison is made here from the results; an interval that includes zero is said to.
"""

from __future__ import annotations

from morphbook.publish import fmt

WINDOWS = {"busiest": "busiest", "median": "median"}
TRACES = {"azure-conv": "conversation", "azure-code": "code", "burstgpt-head": "BurstGPT"}
PAPER_REDUCTION_PCT = 92.45
PAPER_SPEEDUP = (2.2, 3.9)


def window_name(key: str) -> str:
    """'azure-conv-busiest' -> 'the busiest conversation window'."""
    trace, _, kind = key.rpartition("-")
    return f"the {WINDOWS.get(kind, kind)} {TRACES.get(trace, trace)} window"


def _ci(ci, unit: str = "", digits: int = 1) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "no interval"
    lo, hi = ci
    return f"95 % CI {fmt.interval(lo, hi, digits)}{unit}"


def replays_sentence(headline: dict, todo: list[dict]) -> str:
    n, reg, stale = headline["engine_replays"], headline["engine_replays_registered"], headline["engine_replays_stale"]
    left = [t["slice"] for t in todo]
    if n == 0:
        text = (f"**No engine replay has been made yet** ({reg} are registered): this page shows the trace statistics, "
                "the capacity arithmetic and, once a calibration slice has run, the simulator's predictions, but no "
                "measured latency.")
    else:
        text = f"**{fmt.count(n, 'engine replay')}** of the {reg} registered back the engine numbers on this page"
        text += f" ({fmt.count(stale, 'stale replay')} left out: made by code that has changed since)." if stale else "."
    if left:
        text += f" Slices still to run: {fmt.count(len(left), 'slice')}, next {fmt.listing(left[:3])}."
    return text


def _direction(cell: dict) -> str:
    """'lowers', 'raises' or 'does not clearly change': the SLO-violation reduction's interval against 0."""
    lo, hi = cell.get("slo_violation_reduction_vs_fp16_ci95") or (None, None)
    if lo is not None and lo > 0:
        return "lowers"
    if hi is not None and hi < 0:
        return "raises"
    return "does not clearly change"


def _change(cell: dict) -> str:
    """The relative change of SLO violations against 16-bit serving, with its interval ('−40 %, 95 % CI ...')."""
    red = cell["slo_violation_reduction_vs_fp16"]
    lo, hi = cell["slo_violation_reduction_vs_fp16_ci95"]
    ci = "no interval" if lo is None or hi is None else f"95 % CI {fmt.interval(-hi, -lo, 1)} %"
    return f"{fmt.pct(-red, signed=True)}, {ci}"


def _replays(a: dict, b: dict) -> str:
    n, m = a["replays"], b["replays"]
    return f"{fmt.count(n, 'replay')} each" if n == m else f"{n} and {fmt.count(m, 'replay')}"


def effect_sentence(window: str, cells: dict, labels: dict, policy: str = "morph-middle") -> str | None:
    """What one morphing policy did on one window against 16-bit serving (engine cells)."""
    base, mine = cells.get("fp16-static"), cells.get(policy)
    if base is None or mine is None or "slo_violation_reduction_vs_fp16" not in mine:
        return None
    spd, spd_ci = mine["p95_ttft_speedup_vs_fp16"], mine["p95_ttft_speedup_vs_fp16_ci95"]
    return (f"On {window_name(window)}, {labels.get(policy, policy)} {_direction(mine)} the share of requests violating "
            f"an SLO: {fmt.pct(mine['slo_violation_pct'])} against {fmt.pct(base['slo_violation_pct'])} for 16-bit "
            f"serving ({_change(mine)}); P95 TTFT {fmt.num(mine['p95_ttft_s'])} s against {fmt.num(base['p95_ttft_s'])} s "
            f"(speedup {fmt.times(spd)}, {_ci(spd_ci, '×', 2)}); {_replays(base, mine)}.")


def ablation_sentence(window: str, cells: dict) -> str | None:
    """What each ablation does against 16-bit serving, and which part of morphing's effect that leaves to which."""
    oracle, nogrow = cells.get("growth-fp16-oracle"), cells.get("int4-no-growth")
    if oracle is None or nogrow is None or "slo_violation_reduction_vs_fp16" not in oracle:
        return None
    text = (f"On {window_name(window)}, the grown pool with 16-bit compute (an oracle: its KV blocks come from outside "
            f"the budget) {_direction(oracle)} SLO violations ({_change(oracle)}); INT4 compute without the grown pool "
            f"{_direction(nogrow)} them ({_change(nogrow)})")
    a, b = _direction(oracle), _direction(nogrow)
    if a == "lowers" and b != "lowers":
        text += ": what morphing gains here comes from the freed KV capacity, not from INT4 compute"
    elif a == "lowers" and b == "lowers":
        text += ": both the freed capacity and INT4 compute lower them"
    elif a != "lowers" and b == "raises":
        text += ": INT4 compute costs more than the freed capacity gives back"
    return text + "."


def simulator_sentence(headline: dict, bounds: dict) -> str:
    n = headline["simulator_validated_replays"]
    if not n:
        return "The simulator has no engine replay to be validated against yet."
    within = headline["simulator_within_bounds"]
    spread = headline.get("engine_repeat_spread_pct")
    text = (f"Against {fmt.count(n, 'engine replay')}, the simulator's worst errors are {fmt.pct(headline['simulator_ttft_p95_error_pct'])} "
            f"on P95 TTFT, {fmt.pct(headline['simulator_tpot_error_pct'])} on mean TPOT and "
            f"{fmt.num(headline['simulator_slo_rate_error_pts'], 1)} points on the SLO-violation rate (bounds: "
            f"{fmt.pct(bounds['ttft_pct'], 0)}, {fmt.pct(bounds['tpot_pct'], 0)}, {fmt.num(bounds['slo_pts'], 0)} points): "
            + ("**within every bound**" if within else "**outside at least one bound**"))
    if spread is not None:
        text += f"; the engine's own run-to-run spread of P95 TTFT reaches {fmt.pct(spread)}"
    return text + "."


def verdict_sentence(headline: dict) -> str:
    v = headline["verdict"]
    state = v["state"]
    if state in ("not yet tested", "not tested on this profile"):
        return (f"The paper's claim (−{PAPER_REDUCTION_PCT} % SLO violations, {PAPER_SPEEDUP[0]}–{PAPER_SPEEDUP[1]}× P95 "
                f"TTFT against 16-bit serving) is **{state}** here: the verdict needs engine replays of the "
                f"{v['setting']} setting.")
    lows = "; ".join(f"{window_name(k)}: reduction ≥ {fmt.pct(x['reduction_ci95_low'])}, speedup ≥ "
                     f"{fmt.times(x['speedup_ci95_low'])}" for k, x in v["windows"].items())
    return (f"By the pre-registered rule, the paper's claim (−{PAPER_REDUCTION_PCT} % SLO violations, "
            f"{PAPER_SPEEDUP[0]}–{PAPER_SPEEDUP[1]}× P95 TTFT) **{state}** in our setting (lower ends of the 95 % "
            f"intervals: {lows}).")


def leads_sentence(leads: list[dict]) -> str:
    pred = [r for r in leads if r["policy"] == "predictive-middle"]
    react = [r for r in leads if r["policy"] == "morph-middle"]
    if not pred:
        return "No predictive replay (or no surge in its window) yet: its lead time is not measured."
    ahead = [r["lead_s"] for r in pred if r["lead_s"] is not None]
    missed = sum(r["lead_s"] is None for r in pred)
    text = f"Over {fmt.count(len(pred), 'surge')}, the predictive controller asked for its first swap "
    if ahead:
        text += (f"a median {fmt.num(sorted(ahead)[len(ahead) // 2], 2)} s before the surge's onset"
                 f" (positive: ahead)")
    else:
        text += "never near an onset"
    if missed:
        text += f", and missed {fmt.count(missed, 'surge')}"
    r_ahead = [r["lead_s"] for r in react if r["lead_s"] is not None]
    if r_ahead:
        text += f"; the reactive one {fmt.num(sorted(r_ahead)[len(r_ahead) // 2], 2)} s"
    return text + "."


def texts(headline: dict, policies: list[dict], todo: list[dict], leads: list[dict], bounds: dict,
          labels: dict, setting: str) -> dict[str, str]:
    cells: dict = {}
    for row in policies:
        if row["setting"] == setting:
            cells.setdefault(row["window"], {})[row["policy"]] = row
    effects = [s for w in sorted(cells) if (s := effect_sentence(w, cells[w], labels))]
    ablations = [s for w in sorted(cells) if (s := ablation_sentence(w, cells[w]))]
    return {"replays": replays_sentence(headline, todo),
            "effect": " ".join(effects) or "No engine replay compares morphing with 16-bit serving yet.",
            "ablation": " ".join(ablations) or "The ablations have no engine replay yet.",
            "simulator": simulator_sentence(headline, bounds),
            "leads": leads_sentence([r for r in leads if r["setting"] == setting]),
            "verdict": verdict_sentence(headline)}
