"""Replay windows of a trace, fixed from its arrivals alone (never from a result), and the arrival
transforms chapter 5 replays them with.

* ``window_starts(trace, length_s, which)``: ``"busiest"`` — the start (on a ``grid_s`` grid) of the
  ``length_s`` window into which the most tokens (prompt + output) arrive; ``"median"`` — the window
  whose token count is the median of all windows' that hold a request (the earliest of the closest);
  ``"tiled"`` — every
  whole non-overlapping window from the first request on.
* ``replay_window(trace, start_s, length_s, preroll_s)``: the requests arriving in
  ``[start_s - preroll_s, start_s + length_s)``, times counted from the pre-roll's start, with the time
  from which requests are measured (the pre-roll only fills the engine; a start earlier than the pre-roll
  shortens it). Every request is served to completion (a full drain): the replay runs until the last one
  has finished.
* ``at_rate(trace, rate, natural)``: arrivals compressed or stretched by ``rate / natural`` (a trace-wide
  mean rate), labelled; ``tokens_scaled(trace, divisor)``: prompt and output lengths divided (at least
  one token each), labelled (chapter 5's CPU profile only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from morphlib.errors import MorphError
from morphlib.workloads.traces import Trace

WHICH = ("busiest", "median", "tiled")


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
        raise MorphError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def window_tokens(trace: Trace, length_s: float, grid_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(starts, tokens arriving in [start, start + length_s)) for every start on the grid that leaves a
    whole window inside the trace."""
    length_s, grid_s = _positive("length_s", length_s), _positive("grid_s", grid_s)
    if trace.span_s < length_s:
        raise MorphError(f"{trace.name} spans {trace.span_s:g} s: no whole {length_s:g}-s window")
    starts = np.arange(0.0, trace.span_s - length_s + 1e-9, grid_s)
    cum = np.concatenate([[0], np.cumsum(trace.context_tokens + trace.generated_tokens)])
    lo = np.searchsorted(trace.arrival_s, starts, side="left")
    hi = np.searchsorted(trace.arrival_s, starts + length_s, side="left")
    return starts, (cum[hi] - cum[lo]).astype(np.int64)


def window_starts(trace: Trace, length_s: float, which: str, grid_s: float = 1.0) -> list[float]:
    """The start(s) of the chosen window(s): one for ``busiest`` and ``median``, all for ``tiled``."""
    if which not in WHICH:
        raise MorphError(f"window {which!r} is not one of {', '.join(WHICH)}")
    if which == "tiled":
        length_s = _positive("length_s", length_s)
        n = int(trace.span_s // length_s)
        if n < 1:
            raise MorphError(f"{trace.name} spans {trace.span_s:g} s: no whole {length_s:g}-s window")
        return [i * length_s for i in range(n)]
    starts, tokens = window_tokens(trace, length_s, grid_s)
    if which == "busiest":
        return [float(starts[int(np.argmax(tokens))])]
    starts, tokens = starts[tokens > 0], tokens[tokens > 0]  # a window with no request is no window to replay
    return [float(starts[int(np.argmin(np.abs(tokens - np.median(tokens))))])]


@dataclass(frozen=True)
class Window:
    """A replayable window: its requests (times from the pre-roll's start) and where measuring begins."""

    trace: Trace  # arrivals counted from the pre-roll's start
    start_s: float  # where the window starts in the source trace's time
    length_s: float  # the window's length and pre-roll in the replay's time (after ``at_rate``)
    preroll_s: float  # the pre-roll actually used (shorter when the window starts early)
    measured: np.ndarray  # per request of ``trace``: it arrives inside the window (not in the pre-roll)

    @property
    def requests(self) -> int:
        return int(self.measured.sum())

    def median_prompt(self) -> int:
        """The median prompt length of the measured requests (the TTFT SLO is set at it)."""
        return int(np.median(self.trace.context_tokens[self.measured]))


def replay_window(trace: Trace, start_s: float, length_s: float, preroll_s: float = 0.0) -> Window:
    """The window ``[start_s, start_s + length_s)`` of ``trace`` with a pre-roll before it (see the module doc)."""
    length_s = _positive("length_s", length_s)
    if isinstance(preroll_s, bool) or not isinstance(preroll_s, (int, float)) or preroll_s < 0:
        raise MorphError(f"preroll_s must be a number of seconds >= 0, got {preroll_s!r}")
    pre = min(float(preroll_s), float(start_s))
    part = trace.window(start_s - pre, length_s + pre)
    measured = part.arrival_s >= pre
    if not measured.any():
        raise MorphError(f"{trace.name}: no request arrives in [{start_s:g}, {start_s + length_s:g}) s")
    part = dataclasses.replace(part, name=f"{trace.name} [{start_s:g}, {start_s + length_s:g}) s"
                               + (f" after a {pre:g}-s pre-roll" if pre else ""))
    return Window(part, float(start_s), length_s, pre, measured)


def at_rate(window: Window, rate: float, natural: float) -> Window:
    """The window with its arrivals compressed or stretched by ``rate / natural`` (``natural``: the mean
    rate of the whole trace, requests per second); the pre-roll and length scale with it."""
    rate, natural = _positive("rate", rate), _positive("natural rate", natural)
    f = rate / natural
    t = window.trace
    scaled = dataclasses.replace(t, name=f"{t.name} at {rate:g} req/s (x{f:.3g})", arrival_s=t.arrival_s / f,
                                 warnings=list(t.warnings))
    return Window(scaled, window.start_s, window.length_s / f, window.preroll_s / f, window.measured)


def tokens_scaled(trace: Trace, divisor: float) -> Trace:
    """Prompt and output lengths divided by ``divisor`` (rounded up: at least one token), labelled."""
    divisor = _positive("token divisor", divisor)
    if divisor == 1:
        return trace
    ctx = np.maximum(1, np.ceil(trace.context_tokens / divisor)).astype(np.int64)
    gen = np.maximum(1, np.ceil(trace.generated_tokens / divisor)).astype(np.int64)
    return dataclasses.replace(trace, name=f"{trace.name} (tokens / {divisor:g})", context_tokens=ctx,
                               generated_tokens=gen, warnings=list(trace.warnings))
