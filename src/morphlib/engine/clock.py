"""Clocks that drive an engine, and step-time models for the virtual one.

The engine core reads no clock: the engine around it asks its clock for ``now()`` at a step boundary and
for ``step_end(plan)`` once the step has run. ``WallClock`` is ``time.perf_counter`` (the real GPU or
CPU engine); ``VirtualClock`` advances by a step-time model's ``step_seconds(plan)`` (the simulator, or a
CPU engine whose decisions must match a simulator's), and ``sleep_until`` jumps instead of sleeping.

A step-time model is anything with ``step_seconds(plan) -> float`` (or a plain callable): it sees the
``StepPlan`` (sequences, tokens, prefill tokens, context sum, graph bucket, INT4 layers computing,
bytes copied on the compute stream). ``TableStepTime`` is a fixed table; the fitted model is chapter 5's.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Protocol

from morphlib.errors import MorphError


class StepTimeModel(Protocol):
    def step_seconds(self, plan) -> float: ...


class WallClock:
    virtual = False

    def now(self) -> float:
        return time.perf_counter()

    def step_end(self, plan) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        dt = t - time.perf_counter()
        if dt > 0:
            time.sleep(dt)

    def reset(self) -> None:
        pass


class VirtualClock:
    """Time advanced by a step-time model (a ``StepTimeModel`` or a callable ``plan -> seconds``)."""

    virtual = True

    def __init__(self, model, start: float = 0.0):
        fn = getattr(model, "step_seconds", model)
        if not callable(fn):
            raise MorphError(f"a step-time model needs step_seconds(plan) (or is a callable), got {type(model).__name__}")
        self.seconds_of, self.start, self.t = fn, float(start), float(start)

    def now(self) -> float:
        return self.t

    def step_end(self, plan) -> float:
        dt = self.seconds_of(plan)
        if not dt >= 0:
            raise MorphError(f"the step-time model gave {dt!r} seconds for step {plan.index}")
        self.t += float(dt)
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, float(t))

    def reset(self) -> None:
        self.t = self.start


@dataclass(frozen=True)
class TableStepTime:
    """A fixed step-time table. A step with a batch takes ``decode_s`` at its number of sequences (the
    smallest key at or above it; linear beyond the largest key) plus ``prefill_token_s`` per prefill
    token plus ``context_token_s`` per context token read; an empty step takes ``idle_s``; bytes copied
    on the compute stream (sync swaps) add ``bytes / h2d_bytes_per_s``."""

    decode_s: dict
    prefill_token_s: float = 0.0
    context_token_s: float = 0.0
    idle_s: float = 0.0
    h2d_bytes_per_s: float | None = None

    def __post_init__(self):
        keys = sorted(self.decode_s)
        if not keys or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in keys):
            raise MorphError(f"TableStepTime.decode_s needs positive integer batch sizes as keys, got {keys}")
        vals = [self.decode_s[k] for k in keys] + [self.prefill_token_s, self.context_token_s, self.idle_s]
        if not all(isinstance(v, (int, float)) and v >= 0 for v in vals):
            raise MorphError("TableStepTime: every time must be a number of seconds >= 0")
        if self.h2d_bytes_per_s is not None and not self.h2d_bytes_per_s > 0:
            raise MorphError(f"TableStepTime.h2d_bytes_per_s must be positive, got {self.h2d_bytes_per_s!r}")
        object.__setattr__(self, "_keys", keys)

    def step_seconds(self, plan) -> float:
        t = 0.0
        if plan.num_seqs:
            keys = self._keys
            i = bisect.bisect_left(keys, plan.num_seqs)
            t = self.decode_s[keys[i]] if i < len(keys) else self.decode_s[keys[-1]] * plan.num_seqs / keys[-1]
            t += self.prefill_token_s * plan.prefill_tokens + self.context_token_s * plan.context_sum
        else:
            t = self.idle_s
        if plan.sync_copy_bytes and self.h2d_bytes_per_s:
            t += plan.sync_copy_bytes / self.h2d_bytes_per_s
        return t
