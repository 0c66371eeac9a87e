"""morphlib.fingerprint: which project code ran, per function, and whether the files still hold it.

Each test imports a small package of its own (a fresh name under tmp_path, followed by the recording)
so that the real library's modules are never edited.
"""

from __future__ import annotations

import importlib
import sys
import threading
import uuid

import pytest

from morphlib import fingerprint as fp

MODULE = '''"""A module. Docstrings and comments never change a hash."""
import functools

K = 3


def f(x):
    """Runs."""
    # a comment
    g = lambda y: y + K  # noqa: E731
    return [g(i) for i in range(x)]


@functools.lru_cache(maxsize=None)
def kernel(x):  # decorated: in the skeleton whether it runs or not
    return x * 2


class C:
    a: int = 1

    def m(self):
        def inner():
            return 5
        return inner()

    class D:
        def n(self):
            return 1


def never():
    return 0
'''


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    """(package name, path of its module m.py, imported module m)."""
    name = f"fpkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "m.py").write_text(MODULE)
    monkeypatch.setenv("MORPHBOOK_SRC", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"{name}.m")
    yield name, tmp_path / name / "m.py", mod
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def run_some(mod):
    mod.f(3)
    mod.C().m()
    mod.C.D().n()


def test_units_that_ran_and_skeletons(pkg):
    name, path, mod = pkg
    with fp.recording((name,)) as rec:
        run_some(mod)
    got = rec.fingerprint()
    assert set(got) == {f"{name}/__init__.py::<module>", f"{name}/m.py::<module>", f"{name}/m.py::f",
                        f"{name}/m.py::C.m", f"{name}/m.py::C.D.n"}  # lambda, comprehension, inner: in their unit
    assert all(len(h) == 16 for h in got.values())
    assert rec.units_run() == [f"{name}/m.py::C.D.n", f"{name}/m.py::C.m", f"{name}/m.py::f"]
    assert fp.unit_hash(f"{name}/m.py::f") == got[f"{name}/m.py::f"]
    assert fp.unit_hash(f"{name}/m.py::gone") is None and fp.unit_hash(f"{name}/nope.py::f") is None
    assert fp.changed(got) == [] and rec.loaded_mismatches() == []


@pytest.mark.parametrize("old, new, stale", [
    ('"""Runs."""\n    # a comment', '"""Runs, reworded."""\n\n    # another comment   ', None),  # prose only
    ("return 0", "return 9", None),  # a function that never ran
    ("y + K", "y - K", "f"),  # a lambda inside a unit that ran
    ("return 5", "return 6", "C.m"),  # a nested function
    ("return 1\n", "return 2\n", "C.D.n"),  # a method of a nested class
    ("return x * 2", "return x * 3", "<module>"),  # a decorated def that never ran (a Triton kernel's case)
    ("K = 3", "K = 4", "<module>"),  # a module constant
    ("a: int = 1", "a: int = 2", "<module>"),  # a class field's default
])
def test_changed_names_exactly_the_unit(pkg, old, new, stale):
    name, path, mod = pkg
    with fp.recording((name,)) as rec:
        run_some(mod)
    before = rec.fingerprint()
    edit(path, old, new)
    assert fp.changed(before) == ([f"{name}/m.py::{stale}"] if stale else [])
    path.unlink()
    assert fp.changed(before) == sorted(n for n in before if n.startswith(f"{name}/m.py"))  # gone counts


def test_fingerprint_keeps_the_code_as_first_met(pkg):
    """An edit during the run: the fingerprint still holds the hash of the code that ran, so
    changed() names it at save time."""
    name, path, mod = pkg
    with fp.recording((name,)) as rec:
        mod.f(2)
        edit(path, "y + K", "y * K")
    assert fp.changed(rec.fingerprint()) == [f"{name}/m.py::f"]


@pytest.mark.parametrize("old, new, flagged", [
    ("y + K", "y - K", "f"),
    ("return 5", "return 6", "C.m"),
    ("return x * 2", "return x * 3", "kernel"),
    ("K = 3", "K = 4", "<module> (K)"),
])
def test_loaded_code_older_than_the_file(pkg, old, new, flagged):
    """The module was imported, then its file edited (a notebook kernel): the recording notices."""
    name, path, mod = pkg
    edit(path, old, new)
    with fp.recording((name,)) as rec:
        run_some(mod)
    assert rec.loaded_mismatches() == [f"{name}/m.py::{flagged}"]
    assert fp.changed(rec.fingerprint()) == []  # the files did not move during the run


def test_prose_edit_is_no_mismatch(pkg):
    name, path, mod = pkg
    edit(path, '"""Runs."""', '"""Runs, reworded at length."""')
    with fp.recording((name,)) as rec:
        run_some(mod)
    assert rec.loaded_mismatches() == []


def test_recordings_nest_and_merge(pkg):
    name, path, mod = pkg
    assert fp.current() is None
    with fp.recording((name,)) as outer:
        mod.f(1)
        with fp.recording((name,)) as inner:
            assert fp.current() is inner
            mod.f(2)  # already met by the outer recording: met again by the inner one
            mod.C().m()
            fp.merge_into_current({f"{name}/m.py::cached": "0" * 16})
        assert fp.current() is outer
    assert fp.current() is None
    assert inner.units_run() == outer.units_run() == [f"{name}/m.py::C.m", f"{name}/m.py::cached", f"{name}/m.py::f"]
    assert fp.changed(inner.fingerprint()) == [f"{name}/m.py::cached"]  # a producer unit gone from the file
    with pytest.raises(ValueError, match="not a unit name"):
        outer.merge({"no-separator": "0" * 16})
    fp.merge_into_current({f"{name}/m.py::x": "1"})  # no recording active: nothing to do


def test_threads_started_inside_are_recorded(pkg):
    name, path, mod = pkg
    with fp.recording((name,)) as rec:
        t = threading.Thread(target=mod.C().m)
        t.start()
        t.join()
    assert rec.units_run() == [f"{name}/m.py::C.m"]


def test_unfollowed_code_is_not_recorded(pkg):
    name, path, mod = pkg
    with fp.recording(("some_other_package",)) as rec:
        run_some(mod)
    assert rec.fingerprint() == {}


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown hook"):
        with fp.recording(hook="trace"):
            pass
    with pytest.raises(ValueError, match="tuple of package names"):
        fp.Recording("morphlib")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring needs Python >= 3.12 (the GPU machine's)")
def test_monitoring_and_setprofile_agree(pkg):
    name, path, mod = pkg
    got = {}
    for hook in fp.HOOKS:
        with fp.recording((name,), hook=hook) as rec:
            run_some(mod)
            with fp.recording((name,), hook=hook) as inner:
                mod.f(1)  # met again inside a nested recording
        got[hook] = (rec.fingerprint(), inner.units_run())
    assert got["monitoring"] == got["setprofile"]
    assert got["monitoring"][1] == [f"{name}/m.py::f"]


def test_monitoring_needs_python_312():
    if sys.version_info >= (3, 12):
        pytest.skip("this Python has sys.monitoring")
    with pytest.raises(RuntimeError, match="Python >= 3.12"):
        with fp.recording(hook="monitoring"):
            pass
