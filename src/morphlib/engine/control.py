"""Controllers: who decides, at each step boundary (and on a replay's idle ticks), which layers run INT4.

One protocol: a controller is called as ``controller(engine, info)`` (``info``: the ``StepInfo`` of the
boundary) and may call ``engine.swap`` / ``engine.restore``; it keeps a log of what it saw and did
(``record()``: its parameters, its actions, the signal sampled every ``sample_s``), reads only the engine
clock (``info.now``) and holds no randomness, so a replay on a virtual clock repeats bitwise.

* ``StaticController(layers)``: a fixed INT4 set (empty: 16-bit serving), swapped at the first call.
* ``ReactiveController(order, ...)``: MorphServe-style. When the signal (``"demand"``: KV blocks in use
  plus those the queue needs, over the capacity; or ``"usage"``: in use only) stays at or above
  ``high`` for ``persist_s``, swap the next ``step`` layers of ``order`` (the pool grows by their freed
  tails). When it stays below ``low`` for ``restore_after_s`` and the freed tail can be vacated (the
  demand would stay below ``high`` without the restored layers' blocks), restore the newest ``step``
  layers (last in, first out). No action while one is pending, and none within ``dwell_s`` of the
  opposite one: it never chatters.
* ``PredictiveController(order, ...)``: not in the paper. It swaps ahead of a surge from a short-horizon
  forecast of the demand, ``demand + horizon_s * max(growth, surplus)``: ``growth`` an EWMA (time
  constant ``tau_short_s``) of the demand's growth in blocks per second (use and queue), ``surplus`` the
  arrivals' blocks per second above their long-run rate (EWMAs of ``StepInfo.arrived_blocks`` over
  ``tau_short_s`` and ``tau_long_s``: what arrives faster than usual piles up). It swaps as many steps of
  layers as the forecast needs at once, restores like the reactive one (on the demand and the
  forecast), and ``lead_times`` reports, per surge onset, how far ahead of it the first swap was asked.

``make_controller(spec)`` builds one from a plain dict (what a results file or a sweep worker holds).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from morphlib.errors import MorphError, check_int

SIGNALS = ("demand", "usage")


def _number(owner: str, name: str, value, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or value > hi or (open_lo and value == lo):
        bound = f"> {lo:g}" if open_lo else f">= {lo:g}"
        raise MorphError(f"{owner}.{name} must be a number {bound}" + (f" and <= {hi:g}" if hi < math.inf else "")
                         + f", got {value!r}")
    return float(value)


def _order(owner: str, order) -> tuple[int, ...]:
    if isinstance(order, (str, bytes)) or not hasattr(order, "__iter__"):
        raise MorphError(f"{owner}.order must be a list of layer indices, got {order!r}")
    out = tuple(check_int(f"{owner}.order[...]", li, 0) for li in order)
    if len(set(out)) != len(out):
        raise MorphError(f"{owner}.order repeats a layer: {list(out)}")
    return out


class Logged:
    """What every controller keeps: its actions and the signal it saw (sampled), on the engine clock."""

    name = "controller"

    def __init__(self, sample_s: float):
        self.sample_s = _number(type(self).__name__, "sample_s", sample_s, 0.0, open_lo=True)
        self.reset()

    def reset(self) -> None:
        """Forget the log and any state (a new replay on a reset engine)."""
        self.events: list[dict] = []
        self.series: dict[str, list] = {k: [] for k in ("t", "usage", "demand", "forecast", "capacity", "int4")}
        self._next_sample = -math.inf

    def _sample(self, info, forecast: float | None = None, force: bool = False) -> None:
        if not force and info.now < self._next_sample:
            return
        self._next_sample = info.now + self.sample_s
        s = self.series
        s["t"].append(info.now)
        s["usage"].append(info.kv_usage)
        s["demand"].append(info.demand)
        s["forecast"].append(forecast)
        s["capacity"].append(info.kv_used + info.kv_free)
        s["int4"].append(len(info.int4_layers))

    def _act(self, engine, info, action: str, layers: list[int], **why) -> None:
        (engine.swap if action == "swap" else engine.restore)(layers)
        self.events.append({"t": info.now, "step": info.step, "action": action, "layers": list(layers),
                            "usage": info.kv_usage, "demand": info.demand, **why})

    def params(self) -> dict:
        return {}

    def record(self) -> dict:
        """Parameters, actions and the sampled signal, as plain numbers (for results files)."""
        return {"name": self.name, "params": self.params(), "events": list(self.events),
                "series": {k: list(v) for k, v in self.series.items()}}


class StaticController(Logged):
    """A fixed INT4 set, asked for at the first call (empty: the 16-bit baseline); it only logs after that."""

    name = "static"

    def __init__(self, layers=(), sample_s: float = 0.05):
        self.layers = _order("StaticController", layers)
        super().__init__(sample_s)

    def reset(self) -> None:
        super().reset()
        self._asked = False

    def params(self) -> dict:
        return {"layers": list(self.layers), "sample_s": self.sample_s}

    def __call__(self, engine, info) -> None:
        if not self._asked:
            self._asked = True
            todo = [li for li in self.layers if li not in info.int4_layers]
            if todo:
                self._act(engine, info, "swap", todo)
        self._sample(info)


@dataclass(frozen=True)
class Marks:
    """When the reactive and predictive controllers act (see the module doc)."""

    high: float = 0.85  # swap when the signal stays at or above this share of the capacity ...
    persist_s: float = 0.1  # ... for this long
    low: float = 0.60  # restore when it stays below this share ...
    restore_after_s: float = 2.0  # ... for this long (and the freed tail can be vacated)
    dwell_s: float = 5.0  # no action within this long of the opposite one
    step: int = 4  # layers per swap or restore
    signal: str = "demand"  # "demand" (in use + queued need) or "usage" (in use)

    def __post_init__(self):
        _number("Marks", "high", self.high, 0.0, open_lo=True)
        _number("Marks", "low", self.low, 0.0, self.high)
        if not self.low < self.high:
            raise MorphError(f"Marks.low ({self.low!r}) must be below Marks.high ({self.high!r})")
        for name in ("persist_s", "restore_after_s", "dwell_s"):
            _number("Marks", name, getattr(self, name), 0.0)
        check_int("Marks.step", self.step)
        if self.signal not in SIGNALS:
            raise MorphError(f"Marks.signal {self.signal!r} is not one of {SIGNALS}")


class ReactiveController(Logged):
    """MorphServe-style high/low marks with persistence, LIFO restore and a minimum dwell."""

    name = "reactive"

    def __init__(self, order, marks: Marks | None = None, sample_s: float = 0.05):
        self.order = _order(type(self).__name__, order)
        if not self.order:
            raise MorphError(f"{type(self).__name__}.order needs at least one layer")
        self.marks = marks if marks is not None else Marks()
        if not isinstance(self.marks, Marks):
            raise MorphError(f"{type(self).__name__}.marks must be Marks, got {type(self.marks).__name__}")
        super().__init__(sample_s)

    def reset(self) -> None:
        super().reset()
        self._above = self._below = None  # since when the signal has been above high / below low
        self._last = {"swap": -math.inf, "restore": -math.inf}

    def params(self) -> dict:
        return {"order": list(self.order), **asdict(self.marks), "sample_s": self.sample_s}

    # ------------------------------------------------------------------ shared pieces
    def signal(self, info) -> float:
        return info.demand if self.marks.signal == "demand" else info.kv_usage

    @staticmethod
    def freed_per_layer(engine) -> int:
        """KV blocks one swapped layer adds to the pool (0 when swaps do not grow it)."""
        return engine.layout.tail_blocks if engine.config.swap_grows_pool else 0

    def _track(self, now: float, value: float) -> None:
        m = self.marks
        self._above = (self._above if self._above is not None else now) if value >= m.high else None
        self._below = (self._below if self._below is not None else now) if value < m.low else None

    def _swap_next(self, engine, info, steps: int = 1, **why) -> bool:
        swapped = set(info.int4_layers)
        todo = [li for li in self.order if li not in swapped][: steps * self.marks.step]
        if not todo or not engine.can_swap(todo):
            return False
        self._act(engine, info, "swap", todo, **why)
        self._last["swap"], self._above = info.now, None
        return True

    def _restore_newest(self, engine, info, needs: list[float], **why) -> bool:
        """Restore the newest ``step`` swapped layers of ``order`` if every value of ``needs`` (blocks) would
        stay below the high mark of the capacity without their freed tails."""
        newest = [li for li in reversed(engine.core.morph.order) if li in self.order][: self.marks.step]
        if not newest:
            return False
        cap_after = info.kv_used + info.kv_free - len(newest) * self.freed_per_layer(engine)
        if cap_after <= 0 or any(n >= self.marks.high * cap_after for n in needs) or not engine.can_restore(newest):
            return False
        self._act(engine, info, "restore", newest, **why)
        self._last["restore"], self._below = info.now, None
        return True

    def _may(self, action: str, now: float) -> bool:
        other = "restore" if action == "swap" else "swap"
        return now - self._last[other] >= self.marks.dwell_s

    # ------------------------------------------------------------------ the call
    def __call__(self, engine, info) -> None:
        value = self.signal(info)
        self._track(info.now, value)
        m, now = self.marks, info.now
        acted = False
        if not info.pending:
            if self._above is not None and now - self._above >= m.persist_s and self._may("swap", now):
                acted = self._swap_next(engine, info, signal=value)
            elif self._below is not None and now - self._below >= m.restore_after_s and self._may("restore", now):
                acted = self._restore_newest(engine, info, [info.kv_used + info.waiting_blocks], signal=value)
        self._sample(info, force=acted)


@dataclass(frozen=True)
class Forecast:
    """The predictive controller's horizon and smoothing."""

    horizon_s: float = 2.0
    tau_short_s: float = 0.5
    tau_long_s: float = 10.0

    def __post_init__(self):
        for name in ("horizon_s", "tau_short_s", "tau_long_s"):
            _number("Forecast", name, getattr(self, name), 0.0, open_lo=True)
        if not self.tau_short_s < self.tau_long_s:
            raise MorphError(f"Forecast.tau_short_s ({self.tau_short_s!r}) must be shorter than tau_long_s "
                             f"({self.tau_long_s!r})")


class PredictiveController(ReactiveController):
    """Swaps ahead of a surge from a short-horizon demand forecast (see the module doc)."""

    name = "predictive"

    def __init__(self, order, marks: Marks | None = None, forecast: Forecast | None = None, sample_s: float = 0.05):
        self.forecast = forecast if forecast is not None else Forecast()
        if not isinstance(self.forecast, Forecast):
            raise MorphError(f"PredictiveController.forecast must be Forecast, got {type(self.forecast).__name__}")
        super().__init__(order, marks, sample_s)

    def reset(self) -> None:
        super().reset()
        self._t = self._demand = self._arrived = None
        self.growth = self.rate_short = self.rate_long = 0.0

    def params(self) -> dict:
        return {**super().params(), **asdict(self.forecast)}

    def _update(self, info) -> None:
        demand = info.kv_used + info.waiting_blocks
        if self._t is not None and info.now > self._t:
            dt, f = info.now - self._t, self.forecast
            short, long = 1 - math.exp(-dt / f.tau_short_s), 1 - math.exp(-dt / f.tau_long_s)
            arriving = (info.arrived_blocks - self._arrived) / dt
            self.growth += short * ((demand - self._demand) / dt - self.growth)
            self.rate_short += short * (arriving - self.rate_short)
            self.rate_long += long * (arriving - self.rate_long)
        if self._t is None or info.now > self._t:
            self._t, self._demand, self._arrived = info.now, demand, info.arrived_blocks

    def predicted(self, info) -> float:
        """Blocks the forecast says will be needed ``horizon_s`` from now."""
        demand = info.kv_used + (info.waiting_blocks if self.marks.signal == "demand" else 0)
        return demand + self.forecast.horizon_s * max(0.0, self.growth, self.rate_short - self.rate_long)

    def __call__(self, engine, info) -> None:
        self._update(info)
        value, ahead = self.signal(info), self.predicted(info)
        cap = max(1, info.kv_used + info.kv_free)
        m, now = self.marks, info.now
        self._track(now, max(value, ahead / cap))
        acted = False
        if not info.pending:
            if self._above is not None and now - self._above >= m.persist_s and self._may("swap", now):
                per_step = m.step * self.freed_per_layer(engine)
                short = ahead / m.high - cap  # blocks the capacity lacks to keep the forecast under the high mark
                steps = max(1, math.ceil(short / per_step)) if per_step else 1
                acted = self._swap_next(engine, info, steps, signal=value, forecast=ahead / cap)
            elif value < m.low and self._below is not None and now - self._below >= m.restore_after_s \
                    and self._may("restore", now):
                acted = self._restore_newest(engine, info, [info.kv_used + info.waiting_blocks, ahead],
                                             signal=value, forecast=ahead / cap)
        self._sample(info, ahead / cap, force=acted)


# --------------------------------------------------------------------------- building and reading
CONTROLLERS = {"static": StaticController, "reactive": ReactiveController, "predictive": PredictiveController}


def make_controller(spec: dict) -> Logged:
    """A controller from a plain dict: ``{"name": "static", "layers": [...]}``, ``{"name": "reactive",
    "order": [...], "marks": {...}}`` or ``{"name": "predictive", "order": [...], "marks": {...},
    "forecast": {...}}`` (``sample_s`` optional); one-line errors for anything else."""
    if not isinstance(spec, dict) or spec.get("name") not in CONTROLLERS:
        raise MorphError(f"a controller spec needs a name of {', '.join(CONTROLLERS)}, got {spec!r}")
    name, rest = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    allowed = {"static": {"layers", "sample_s"}, "reactive": {"order", "marks", "sample_s"},
               "predictive": {"order", "marks", "forecast", "sample_s"}}[name]
    if unknown := sorted(set(rest) - allowed):
        raise MorphError(f"controller {name!r}: unknown field(s) {', '.join(unknown)} (valid: {', '.join(sorted(allowed))})")
    try:
        if "marks" in rest:
            rest["marks"] = Marks(**rest["marks"])
        if "forecast" in rest:
            rest["forecast"] = Forecast(**rest["forecast"])
    except TypeError as exc:
        raise MorphError(f"controller {name!r}: {exc}") from None
    return CONTROLLERS[name](**rest)


def surge_onsets(times, demand, high: float, low: float) -> list[float]:
    """Times at which ``demand`` reaches ``high`` having been below ``low`` since the last onset (the first
    crossing counts): the surges of a sampled demand series (e.g. a 16-bit replay's)."""
    onsets, armed = [], True
    for t, d in zip(times, demand):
        if armed and d >= high:
            onsets.append(float(t))
            armed = False
        elif not armed and d < low:
            armed = True
    return onsets


@dataclass
class Lead:
    onset: float
    first_swap: float | None  # the first swap asked for in the surge's window (None: none)
    lead_s: float | None = field(default=None)  # onset - first_swap (positive: ahead of the surge)


def lead_times(events: list[dict], onsets: list[float], lookback_s: float = 10.0, lag_s: float = 10.0) -> list[Lead]:
    """Per surge onset: the first swap asked for within ``lookback_s`` before it (after the previous onset) or
    ``lag_s`` after it, and how far ahead of the onset that was. A swap answers one surge at most."""
    swaps = sorted(e["t"] for e in events if e["action"] == "swap")
    out, prev, used = [], -math.inf, -math.inf
    for onset in onsets:
        lo = max(prev, onset - lookback_s, used)
        first = next((t for t in swaps if lo < t <= onset + lag_s), None)
        out.append(Lead(onset, first, None if first is None else onset - first))
        prev, used = onset, used if first is None else first
    return out
