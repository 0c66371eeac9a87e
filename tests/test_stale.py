"""Code hashes and the stale check, on a small fake source tree (experiment modules + library modules) in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from morphbook.experiments.base import Result
from morphbook.publish import codehash, stale
from morphbook.publish.store import load_summary, save_result

EXPERIMENT = '''"""Chapter 2 (fake). Docstrings and comments never change the hash."""
from morphlib import helper
import morphlib.other as other
from morphbook.experiments import base  # an experiment helper: hashed


def run():
    from morphlib.lazy import z  # an import inside a function counts too
    return helper.f() + other.g() + z + base.B
'''

MODULES = {
    "morphlib/__init__.py": '"""fake morphlib"""\n',
    "morphlib/helper.py": "from .deep import h\n\n\ndef f():\n    return h() + 1\n",
    "morphlib/deep.py": "def h():\n    return 41\n",
    "morphlib/other.py": "from morphlib import deep\n\n\ndef g():\n    return deep.h()\n",
    "morphlib/lazy.py": "z = 0\n",
    "morphlib/unrelated.py": "X = 1\n",
    "morphbook/__init__.py": "",
    "morphbook/experiments/__init__.py": "",
    "morphbook/experiments/base.py": "B = 0\n",
    "morphbook/experiments/strategies.py": EXPERIMENT,
    "morphbook/experiments/burst.py": "from morphlib import unrelated\n",
    "morphbook/publish/__init__.py": "",
}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name, text in MODULES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    monkeypatch.setenv("MORPHBOOK_SRC", str(src))
    results = tmp_path / "results"
    save_result("strategies", Result({"profile": "gpu"}, {"ppl": 40.1}, {"records.json": [1, 2]}, 3.0), results)
    return src, results


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_closure_is_transitive_and_narrow(tree):
    mods = codehash.closure("morphbook.experiments.strategies")
    assert set(mods) == {"morphbook.experiments.strategies", "morphbook.experiments", "morphbook.experiments.base",
                         "morphlib", "morphlib.helper", "morphlib.deep", "morphlib.other", "morphlib.lazy"}
    assert "morphlib.unrelated" not in mods  # another chapter's library module
    assert set(codehash.closure("morphbook.experiments.burst")) == {
        "morphbook.experiments.burst", "morphbook.experiments", "morphlib", "morphlib.unrelated"}


def test_hash_ignores_prose_and_follows_code(tree):
    src, results = tree
    h0 = codehash.code_hash("strategies")
    edit(src / "morphbook/experiments/strategies.py", "never change the hash.", "never change it, really.")
    edit(src / "morphlib/deep.py", "def h():", "# a comment\n\n\ndef h():")
    assert codehash.code_hash("strategies") == h0
    edit(src / "morphlib/unrelated.py", "X = 1", "X = 2")  # another chapter's code
    assert codehash.code_hash("strategies") == h0
    edit(src / "morphlib/deep.py", "return 41", "return 42")  # two imports deep
    assert codehash.code_hash("strategies") != h0


def _row(results, name="strategies"):
    return stale.status(name, load_summary(name, results), results)


def test_status_ok_stale_modified(tree):
    src, results = tree
    assert _row(results).state == "ok"
    edit(src / "morphlib/lazy.py", "z = 0", "z = 1")
    row = _row(results)
    assert row.state == "STALE" and not row.fails() and row.fails(strict=True)
    edit(src / "morphlib/lazy.py", "z = 1", "z = 0")
    assert _row(results).state == "ok"
    (results / "strategies" / "records.json").write_text("[1, 3]\n")
    row = _row(results)
    assert row.state == "MODIFIED" and "records.json" in row.message and row.fails()
    (results / "strategies" / "records.json").unlink()
    assert "records.json (missing)" in _row(results).message


def test_cli_exit_codes(tree, capsys):
    src, results = tree
    # every other chapter is missing: book chapters fail, benchmarks do not
    assert stale.main(["--results", str(results)]) == 1
    out = capsys.readouterr().out
    assert "strategies" in out and "missing" in out
    rows = {r.chapter: r for r in stale.check(results)}
    assert not rows["kernels"].fails() and rows["burst"].fails()
    assert not rows["strategies"].fails(strict=True)


def test_missing_experiment_module_is_a_one_line_error(tree):
    src, _ = tree
    (src / "morphbook/experiments/strategies.py").unlink()
    with pytest.raises(Exception, match="experiment module morphbook.experiments.strategies not found"):
        codehash.code_hash("strategies")


def test_real_chapters_hash_only_what_they_run():
    """Chapter 5 (trace arithmetic) carries no INT4 kernel or model-loading code; chapter 1 does."""
    burst = codehash.closure("morphbook.experiments.burst")
    assert not {"morphlib.quant.int4", "morphlib.models", "morphlib.morph"} & set(burst), sorted(burst)
    sens = codehash.closure("morphbook.experiments.sensitivity")
    assert {"morphlib.quant.int4", "morphlib.morph", "morphlib.select.sensitivity"} <= set(sens)
    assert not any(m.startswith("morphbook.publish") for m in sens)
    assert "morphbook.experiments.strategies" not in sens
