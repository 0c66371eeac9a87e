"""Chapter 5's pre-registration, read and checked, and everything derived from it alone: settings, policies,
layer orders (from chapter 2's sets), windows at a rate, SLOs from an unloaded engine, the rate rule, the
GPU slice matrix and replay keys.

``load_plan()`` reads ``burst_preregistration.toml`` (committed before any replay) and refuses anything it
does not define with a one-line error; ``plan.digest`` (16 hex digits of the file) is recorded with every
replay, so a replay made under another pre-registration is never merged as if it were not.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphlib.engine.control import Forecast, Marks
from morphlib.errors import MorphError, check_int
from morphlib.workloads.traces import Trace
from morphlib.workloads.windows import Window, at_rate, replay_window, tokens_scaled, window_starts

PREREG = Path(__file__).with_name("burst_preregistration.toml")
CH2_LAYERS = 30  # chapter 2 measures SmolLM2-135M: its depth is the one the orders and quality costs are given in


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    model: object  # "shape:<name>", a built-in model name, or an HF config dict (random weights)
    runs_on: str
    max_int4: int
    traces: tuple
    rate_grid: tuple
    engine: dict
    token_divisor: float = 1.0
    kinds: tuple = ("busiest", "median")
    length_s: float = 72.0
    preroll_s: float = 10.0
    step: int | None = None
    kv_gain_of: str | None = None
    bench: dict = field(default_factory=dict)
    matrix: tuple = ()  # a CPU setting's own [[window, [groups]]] (replayed in-process by the chapter)

    @property
    def num_layers(self) -> int:
        if isinstance(self.model, dict):
            return int(self.model["num_hidden_layers"])
        from morphlib.shapes import shape_config

        name = self.model[6:] if self.model.startswith("shape:") else self.model
        return int(shape_config(name)["num_hidden_layers"])

    @property
    def sim_model(self):
        """What the simulator is given: a shape (real and random weights have one) or the config dict."""
        if isinstance(self.model, dict):
            return self.model
        return self.model if self.model.startswith("shape:") else f"shape:{self.model}"


@dataclass(frozen=True)
class Policy:
    name: str
    label: str
    controller: str  # "static", "reactive" or "predictive"
    layers: str | None = None  # static: "none" or "all"
    order: str | None = None  # "middle", "greedy_lis" or "front"
    engine: dict = field(default_factory=dict)

    @property
    def oracle(self) -> bool:
        return self.engine.get("swap_compute") == "fp16"


@dataclass(frozen=True)
class Slice:
    """One device command: a setting's calibration (``window`` None) or a few replays of one window."""

    name: str
    setting: str
    window: tuple | None  # (trace, kind)
    replays: tuple = ()  # ((policy, repeat), ...)


ORDER_NAMES = ("middle", "greedy_lis", "front")


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise MorphError(f"pre-registration: [{where}] has no {key!r}")
    return d[key]


class Plan:
    """The parsed pre-registration (see the module doc)."""

    def __init__(self, data: dict, digest: str):
        self.data, self.digest = data, digest
        for section in ("windows", "rates", "slo", "marks", "forecast", "surges", "quality", "repeats", "validation",
                        "bootstrap", "policies", "settings", "matrix", "sweep"):
            _need(data, section, "top level")
        try:
            self.marks = Marks(**data["marks"])
            self.forecast = Forecast(**data["forecast"])
        except TypeError as exc:
            raise MorphError(f"pre-registration: {exc}") from None
        self.policies = {name: Policy(name, **p) for name, p in data["policies"].items()}
        for p in self.policies.values():
            if p.controller not in ("static", "reactive", "predictive") or (p.controller == "static") != (p.order is None):
                raise MorphError(f"pre-registration: policy {p.name} needs a controller and an order (or static layers)")
            if p.order is not None and p.order not in ORDER_NAMES:
                raise MorphError(f"pre-registration: policy {p.name}: order {p.order!r} is not one of {ORDER_NAMES}")
        self.settings = {}
        w = data["windows"]
        for name, s in data["settings"].items():
            s = dict(s)
            s.setdefault("kinds", w["kinds"])
            s.setdefault("length_s", w["length_s"])
            s.setdefault("preroll_s", w["preroll_s"])
            for key in ("traces", "rate_grid", "kinds"):
                s[key] = tuple(s[key])
            s["matrix"] = tuple((win, tuple(groups)) for win, groups in s.get("matrix", ()))
            try:
                self.settings[name] = Setting(name, **s)
            except TypeError as exc:
                raise MorphError(f"pre-registration: setting {name}: {exc}") from None
        self.windows = w

    # ------------------------------------------------------------------ lookups
    def setting(self, name: str) -> Setting:
        if name not in self.settings:
            raise MorphError(f"unknown setting {name!r}: choose one of {', '.join(self.settings)}")
        return self.settings[name]

    def policy(self, name: str) -> Policy:
        if name not in self.policies:
            raise MorphError(f"unknown policy {name!r}: choose one of {', '.join(self.policies)}")
        return self.policies[name]

    def marks_for(self, setting: Setting) -> Marks:
        if setting.step is None:
            return self.marks
        return Marks(**{**self.marks.__dict__, "step": setting.step})

    def repeats(self, policy: str) -> int:
        return int(self.data["repeats"].get(policy, self.data["repeats"]["default"]))

    # ------------------------------------------------------------------ the GPU matrix
    def _group(self, name: str) -> tuple:
        m = self.data["matrix"]
        if name not in m:
            raise MorphError(f"pre-registration: [matrix] has no group {name!r}")
        reps = tuple((p, int(r)) for p, r in m[name])
        for p, _ in reps:
            self.policy(p)
        return reps

    def _window_slice(self, s: Setting, win: str, group: str) -> Slice:
        trace, kind = win.split(":")
        if trace not in s.traces or kind not in s.kinds:
            raise MorphError(f"pre-registration: setting {s.name} has no window {win}")
        return Slice(f"{s.name}.{trace}-{kind}.{group}", s.name, (trace, kind), self._group(group))

    def slices(self) -> list[Slice]:
        """Every GPU slice, in the order to run them: per setting of the matrix, its calibration, then pass by
        pass every group for each window of the pass."""
        m = self.data["matrix"]
        out = []
        for sname in m["order"]:
            s = self.setting(sname)
            out.append(Slice(f"{sname}.calibrate", sname, None))
            for windows in m["windows"]:
                for group in m["groups"]:
                    for win in windows:
                        trace, kind = win.split(":")
                        if trace in s.traces and kind in s.kinds:
                            out.append(self._window_slice(s, win, group))
        return out

    def setting_slices(self, name: str) -> list[Slice]:
        """A setting's replay slices: its own ``matrix`` (a CPU setting), else the GPU matrix's."""
        s = self.setting(name)
        if s.matrix:
            return [self._window_slice(s, win, g) for win, groups in s.matrix for g in groups]
        return [x for x in self.slices() if x.setting == name and x.window is not None]

    def slice(self, name: str) -> Slice:
        """A slice by name: the GPU matrix's, or a CPU setting's own (its calibration and replay slices)."""
        own = [x for s in self.settings.values() if s.matrix
               for x in [Slice(f"{s.name}.calibrate", s.name, None), *self.setting_slices(s.name)]]
        for s in self.slices() + own:
            if s.name == name:
                return s
        raise MorphError(f"unknown slice {name!r}: `python -m morphbook.replays list` names them")

    def registered_replays(self, setting: str) -> list[tuple[str, str, str, int]]:
        """(trace, kind, policy, repeat) of every replay registered for a setting."""
        return [(*s.window, p, r) for s in self.setting_slices(setting) for p, r in s.replays]


def load_plan(path: str | Path = PREREG) -> Plan:
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MorphError(f"pre-registration {path.name}: {exc}") from None
    return Plan(data, hashlib.sha256(raw).hexdigest()[:16])


def replay_key(setting: str, trace: str, kind: str, policy: str, repeat: int) -> str:
    return f"{setting}.{trace}-{kind}.{policy}.r{repeat}"


def parse_key(key: str) -> dict:
    """The parts of a replay key (see ``replay_key``)."""
    try:
        setting, window, policy, rep = key.split(".")
        trace, kind = window.rsplit("-", 1)
        return {"setting": setting, "trace": trace, "kind": kind, "policy": policy, "repeat": int(rep[1:])}
    except ValueError:
        raise MorphError(f"not a replay key: {key!r}") from None


# --------------------------------------------------------------------------- orders
def _to_depth(layer: float, num_layers: int) -> float:
    """A chapter-2 layer index (or centre) at the same fraction of a model of ``num_layers`` layers."""
    return (layer + 0.5) * num_layers / CH2_LAYERS - 0.5


def _centre_out(layers, centre: float) -> list[int]:
    return sorted(layers, key=lambda li: (abs(li - centre), li))


def orders(sets: dict, num_layers: int, k: int) -> dict[str, list[int]]:
    """The pre-registered layer orders (``[orders]``) for a model of ``num_layers`` layers, ``k`` long, from
    chapter 2's ``sets.json`` ({strategy: {count: layers}})."""
    k = min(check_int("max_int4", k), num_layers)
    try:
        block = {int(c): v for c, v in sets["block"].items()}
        greedy = {int(c): v for c, v in sets["greedy_lis"].items()}
    except (KeyError, TypeError, AttributeError):
        raise MorphError("chapter 2's sets.json has no 'block' or 'greedy_lis' sets") from None
    want = k * CH2_LAYERS / num_layers
    count = min((c for c in block if c >= want), default=max(block))
    centre = _to_depth(float(np.mean(block[count])), num_layers)
    middle = _centre_out(sorted(range(num_layers), key=lambda li: (abs(li - centre), li))[:k], centre)
    grown: list[int] = []
    for c in sorted(greedy):
        grown += [li for li in greedy[c] if li not in grown]
    mapped: list[int] = []
    for li in grown:
        m = min(num_layers - 1, max(0, int(math.floor(_to_depth(li, num_layers) + 0.5))))
        if m not in mapped:
            mapped.append(m)
    mapped += [li for li in _centre_out(range(num_layers), (num_layers - 1) / 2) if li not in mapped]
    return {"middle": middle, "greedy_lis": mapped[:k], "front": list(range(k))}


def controller_spec(plan: Plan, setting: Setting, policy: Policy, layer_orders: dict) -> tuple[dict, list[int], list[int]]:
    """(controller spec for ``make_controller``, layers swapped before the start, the order whose graph states
    are captured ahead)."""
    marks = plan.marks_for(setting)
    if policy.controller == "static":
        layers = list(range(setting.num_layers)) if policy.layers == "all" else []
        return {"name": "static", "layers": layers}, layers, []
    order = layer_orders[policy.order]
    spec = {"name": policy.controller, "order": order, "marks": dict(marks.__dict__)}
    if policy.controller == "predictive":
        spec["forecast"] = dict(plan.forecast.__dict__)
    return spec, [], order


# --------------------------------------------------------------------------- windows, rates, SLOs
def setting_trace(trace: Trace, setting: Setting) -> Trace:
    """The trace as the setting replays it (token lengths divided on the CPU instrument)."""
    return tokens_scaled(trace, setting.token_divisor)


def window_fits(trace: Trace, setting: Setting, rate: float) -> bool:
    """Whether ``trace`` holds a whole window of ``setting`` at trace-wide rate ``rate`` (``length_s`` of replay
    time is ``length_s * rate / natural rate`` of the trace: a sparse trace at a high rate has none)."""
    return setting.length_s * rate / trace.mean_rate <= trace.span_s


def make_window(trace: Trace, setting: Setting, kind: str, rate: float, grid_s: float = 1.0) -> Window:
    """The ``kind`` window of ``trace`` at trace-wide rate ``rate``: ``length_s`` of replay time (see ``[windows]``)."""
    f = rate / trace.mean_rate
    length, pre = setting.length_s * f, setting.preroll_s * f
    start = window_starts(trace, length, kind, min(grid_s, length / 4))[0]
    return at_rate(replay_window(trace, start, length, pre), rate, trace.mean_rate)


def slo(latency: dict, prompt: int, multiplier: float) -> tuple[float, float]:
    """(TTFT SLO, TPOT SLO) in seconds: ``multiplier`` x the unloaded TTFT at ``prompt`` (interpolated on the
    measured prompt lengths) and x the unloaded batch-1 TPOT."""
    xs = sorted(int(k) for k in latency["ttft_s"])
    ys = [latency["ttft_s"][k] if k in latency["ttft_s"] else latency["ttft_s"][str(k)] for k in xs]
    return multiplier * float(np.interp(prompt, xs, ys)), multiplier * float(latency["tpot_bs1_s"])


def pick_rate(rows: list[dict], lo: float, hi: float, target: float) -> dict:
    """The rate rule on ``[{"rate", "ttft_violation_pct"}]``: the rate closest to ``target`` within [lo, hi]
    (ties: the lower rate), else the one closest to the band; returns the row with ``in_band``."""
    if not rows:
        raise MorphError("the rate rule needs at least one swept rate")
    inside = [r for r in rows if lo <= r["ttft_violation_pct"] <= hi]
    pool = inside or rows
    dist = (lambda r: abs(r["ttft_violation_pct"] - target)) if inside else \
        (lambda r: max(lo - r["ttft_violation_pct"], r["ttft_violation_pct"] - hi))
    best = min(pool, key=lambda r: (dist(r), r["rate"]))
    return {**best, "in_band": bool(inside)}


# --------------------------------------------------------------------------- quality
def quality_curve(records: list[dict], strategy: str, ppl_16bit: float) -> tuple[list[int], list[float]]:
    """(counts, held-out perplexity change in %) of one chapter-2 strategy, with (0, 0) first."""
    pts = sorted((int(r["k"]), 100 * (r["heldout_ppl"] / ppl_16bit - 1)) for r in records
                 if r.get("strategy") == strategy and r.get("seed") is None)
    if len(pts) < 2:
        raise MorphError(f"chapter 2's records hold fewer than two counts for {strategy!r}")
    return [0] + [k for k, _ in pts], [0.0] + [v for _, v in pts]


def quality_at(curve: tuple[list[int], list[float]], count: float) -> tuple[float, bool]:
    """(perplexity change %, extrapolated?) at ``count`` chapter-2 layers: linear between counts, beyond the
    largest from its last two."""
    ks, vs = curve
    if count <= ks[-1]:
        return float(np.interp(count, ks, vs)), False
    slope = (vs[-1] - vs[-2]) / (ks[-1] - ks[-2])
    return float(vs[-1] + slope * (count - ks[-1])), True
