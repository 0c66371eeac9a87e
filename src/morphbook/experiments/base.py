"""What every experiment module shares: the result it returns and the profile/override rule of its config.

Every experiment's ``Config`` is a frozen dataclass derived from :class:`ProfileConfig`, with its
per-profile values given once (``class Config(ProfileConfig, defaults=DEFAULTS)``).
``Config.for_profile(profile, **overrides)``: ``"cpu"`` = small sizes for CI, ``"gpu"`` = the book's
published run; any field can be overridden by name (an unknown name is a one-line error listing the
valid ones). ``run(cfg)`` (``run(cfg, inputs)`` for a chapter that reads others' results) returns a
:class:`Result`; the publishing side (``morphbook.publish``) writes it with its provenance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from morphlib.errors import MorphError, check_int

PROFILES = ("cpu", "gpu")


@dataclass
class Result:
    params: dict  # everything that defines the run (the config, plus what the run resolved, e.g. the device)
    headline: dict  # the key figures (scalars, or {"value", "unit", "label"} dicts, or small tables)
    files: dict[str, Any] = field(default_factory=dict)  # detail files: name -> JSON-able / DataFrame / text
    wall_s: float = 0.0  # the run's wall time


def config_for_profile(cls, profile: str, defaults: dict[str, dict], overrides: dict):
    """Build ``cls(profile=profile, **defaults[profile], **overrides)`` with one-line errors."""
    if profile not in defaults:
        raise MorphError(f"unknown profile {profile!r}: use {' or '.join(map(repr, defaults))}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise MorphError(f"unknown parameter(s) {', '.join(unknown)} for {cls.__module__.rsplit('.', 1)[-1]}; "
                         f"valid: {', '.join(sorted(names - {'profile'}))}")
    return cls(profile=profile, **{**defaults[profile], **overrides})


@dataclass(frozen=True)
class ProfileConfig:
    """Base of the experiments' configs: ``profile`` plus the subclass's fields, whose values per profile
    are given with the class (``class Config(ProfileConfig, defaults={"gpu": {...}, "cpu": {...}})``)."""

    profile: str

    def __init_subclass__(cls, defaults: dict[str, dict] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if defaults is not None:
            if set(defaults) != set(PROFILES):
                raise MorphError(f"{cls.__module__}: defaults must give the profiles {PROFILES}, got {sorted(defaults)}")
            cls.DEFAULTS = defaults

    @classmethod
    def for_profile(cls, profile: str, **overrides):
        """The profile's configuration, with any field replaced by name (one-line errors)."""
        return config_for_profile(cls, profile, cls.DEFAULTS, overrides)

    def check_counts(self, *names: str, lo: int = 1) -> None:
        """Each named field must be an integer >= ``lo`` (``morphlib.errors.check_int``; never a bool)."""
        for name in names:
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo))


def int_tuple(name: str, value, lo: int = 1, distinct: bool = False) -> tuple[int, ...]:
    """A sorted tuple of distinct integers >= ``lo`` from a list, a tuple, one integer or their JSON text
    (papermill passes lists as strings); a one-line error otherwise, when it is empty, or (``distinct``)
    when it repeats a value."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise MorphError(f"{name} must be a list of integers, got {value!r}") from None
    items = [value] if hasattr(value, "__index__") and not hasattr(value, "__len__") else value
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise MorphError(f"{name} must be a list of integers, got {value!r}")
    given = [check_int(name, v, lo) for v in items]
    out = tuple(sorted(set(given)))
    if not out:
        raise MorphError(f"{name} must hold at least one integer, got {value!r}")
    if distinct and len(out) != len(given):
        raise MorphError(f"{name} has duplicates: {given}")
    return out


def is_published(cfg) -> bool:
    """True when ``cfg`` is exactly its profile's defaults (no overrides): the book's own configuration."""
    return cfg == type(cfg).for_profile(cfg.profile)


def as_params(cfg, **resolved) -> dict:
    """The config as a plain dict (recorded in the provenance), plus values the run resolved."""
    return {**dataclasses.asdict(cfg), **resolved}


@contextlib.contextmanager
def cpu_threads(device):
    """One torch thread on CPU (OpenMP spin-waits collapse on a busy 2-core machine: 10-30x slower
    timings); the previous count is restored afterwards. A no-op on CUDA."""
    before = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Stopwatch:
    """``with Stopwatch() as sw: ...``; ``sw.seconds``; ``sw.lap(name)`` records phase times."""

    def __enter__(self):
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}
        return self

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 3)
        self.last = now

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False
