"""Every experiment's Config: one ProfileConfig base, its profiles' values, one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from morphbook.chapters import ALL
from morphbook.experiments.base import PROFILES, ProfileConfig, int_tuple, is_published
from morphlib.errors import MorphError

MODULES = {c.name: importlib.import_module(c.experiment) for c in ALL}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_config_is_a_profile_config(name):
    cls = MODULES[name].Config
    assert issubclass(cls, ProfileConfig) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert "for_profile" not in vars(cls)  # written once, in the base
    for profile in PROFILES:
        cfg = cls.for_profile(profile)
        assert cfg.profile == profile and is_published(cfg)
        assert all(getattr(cfg, key) == value for key, value in cls.DEFAULTS[profile].items())
    with pytest.raises(MorphError, match=rf"unknown parameter\(s\) no_such_field for {name}; valid: "):
        cls.for_profile("cpu", no_such_field=1)
    with pytest.raises(MorphError, match="unknown profile 'tpu': use "):
        cls.for_profile("tpu")


@pytest.mark.parametrize("name, field", [("sensitivity", "calib_windows"), ("strategies", "n_random"),
                                         ("overlap", "rounds"), ("burst", "poisson_trials"),
                                         ("domains", "cross_calib_windows"), ("transfer", "repeats"),
                                         ("vllm", "prompts")])
@pytest.mark.parametrize("bad", [0, True, 2.5, "3"])
def test_counts_are_checked_once_and_the_same_way(name, field, bad):
    with pytest.raises(MorphError) as err:
        MODULES[name].Config.for_profile("cpu", **{field: bad})
    assert str(err.value).startswith(f"{field} must be an integer >= 1, got ") and "\n" not in str(err.value)


def test_int_tuple():
    assert int_tuple("ks", "[4, 2, 4]") == (2, 4) and int_tuple("ks", 3) == (3,) and int_tuple("ks", (1,)) == (1,)
    for bad, match in (("[2, x]", "list of integers"), ([0], "integer >= 1"), ([True], "integer >= 1"),
                       ([], "at least one"), ({"a": 1}, "list of integers")):
        with pytest.raises(MorphError, match=match):
            int_tuple("ks", bad)
    assert int_tuple("ks", [2, 1], distinct=True) == (1, 2)
    for bad, match in (([2, 2], r"ks has duplicates: \[2, 2\]"), ([0, 1], "integer >= 1")):
        with pytest.raises(MorphError, match=match):
            int_tuple("ks", bad, distinct=True)


def test_profile_defaults_must_name_both_profiles():
    with pytest.raises(MorphError, match="defaults must give the profiles"):
        @dataclasses.dataclass(frozen=True)
        class Config(ProfileConfig, defaults={"gpu": {}}):
            pass
