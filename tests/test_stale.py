"""Results that stay valid while the code moves: fingerprints in results, the stale check, declared
inputs, re-verified reruns, and saving refused when the code that ran is not the code on disk.

The end-to-end tests run chapter 5 (``burst``: its trace statistics and capacity arithmetic only, a few
seconds on the CPU profile, with chapter 2's committed results as its input) in a fresh process on a copy
of ``src/`` (``MORPHBOOK_SRC`` + ``PYTHONPATH``), then edit the copy.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from morphbook.experiments.base import Result
from morphbook.publish import codehash, stale
from morphbook.publish.inputs import load_inputs
from morphbook.publish.provenance import digest
from morphbook.publish.store import load_summary, save_result
from morphlib import fingerprint
from morphlib.errors import MorphError

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = "morphlib/workloads/kvcache.py"  # a module chapter 5 loads; the test adds three things to it
ADDED = '''

def _fingerprint_test_never_run():
    return 1


def _fingerprint_test_jit(fn):  # stands for @triton.jit: the kernel's body never runs as Python
    return fn


@_fingerprint_test_jit
def _fingerprint_test_kernel(x):
    return x + 1


FINGERPRINT_TEST_CONSTANT = 1
'''


def _row(name, results):
    return stale.status(name, load_summary(name, results), results)


def _env(src: Path) -> dict:
    return {**os.environ, "MORPHBOOK_SRC": str(src), "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}


def _append_statement(path: Path, unit: str) -> None:
    """Add a no-op statement at the end of ``unit``'s body (a code change that is always valid)."""
    text = path.read_text()
    tree = ast.parse(text)
    node = next(n for name, n in fingerprint._defs(tree.body) if name == unit)
    lines = text.split("\n")
    indent = " " * node.body[0].col_offset
    lines.insert(node.end_lineno, f"{indent}_fingerprint_test_edit = None")
    path.write_text("\n".join(lines))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module")
def burst_run(tmp_path_factory):
    """(copy of src, results root) after ``morphbook.run`` made chapter 5's results from the copy."""
    base = tmp_path_factory.mktemp("fp")
    src = base / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with open(src / LIBRARY, "a") as fh:
        fh.write(ADDED)
    results = base / "results"
    shutil.copytree(SRC.parent / "results" / "strategies", results / "strategies")  # chapter 5's input
    out = subprocess.run([sys.executable, "-m", "morphbook.run", "--profile", "cpu", "--results", str(results),
                          "--one", "burst", "--set", "settings=[]"], capture_output=True, text=True, timeout=600,
                         env=_env(src), cwd=base)
    assert out.returncode == 0, out.stdout + out.stderr
    return src, results


@pytest.fixture
def copy(burst_run, monkeypatch):
    """The copy, checked back to its state at the run after each test."""
    src, results = burst_run
    monkeypatch.setenv("MORPHBOOK_SRC", str(src))
    saved = {p: p.read_text() for p in src.rglob("*.py")}
    yield src, results
    for path, text in saved.items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def test_fingerprint_of_a_real_run(copy):
    src, results = copy
    fp = load_summary("burst", results)["provenance"]["fingerprint"]
    ran = [n for n in fp if not n.endswith("::<module>")]
    assert "morphbook/experiments/burst.py::run" in ran and any(n.startswith("morphlib/workloads/") for n in ran)
    assert f"{LIBRARY}::<module>" in fp and f"{LIBRARY}::_fingerprint_test_never_run" not in fp
    # chapter 5 without serving settings is trace arithmetic: its serving code (the engine, INT4 layouts) is
    # loaded, and only loaded; no INT4 kernel, model loading or morphing code ran, and neither was loaded
    assert not [n for n in ran if n.startswith(("morphlib/quant/", "morphlib/models.py", "morphlib/morph.py"))]
    assert not [n for n in fp if n.startswith(("morphlib/models.py", "morphlib/morph.py"))]
    assert "morphlib/engine/control.py::<module>" in fp
    assert not [n for n in fp if n.startswith("morphbook/publish/")]
    assert _row("burst", results).state == "ok"


def test_editing_code_it_never_ran_leaves_it_ok(copy):
    src, results = copy
    _append_statement(src / LIBRARY, "_fingerprint_test_never_run")
    _replace(src / "morphbook/experiments/burst.py", '"""', '"""Reworded. ')  # prose only
    assert _row("burst", results).message == "ok"


def test_editing_what_it_ran_names_the_unit(copy):
    src, results = copy
    summary = load_summary("burst", results)
    commit = stale._short(summary["provenance"]["git"])
    library_unit = next(n for n in summary["provenance"]["fingerprint"]
                        if n.startswith("morphlib/workloads/") and not n.endswith("::<module>"))
    rel, unit = library_unit.split("::")
    _append_statement(src / rel, unit)
    assert _row("burst", results).message == f"STALE: {library_unit} changed since {commit}"
    _append_statement(src / "morphbook/experiments/burst.py", "run")
    row = _row("burst", results)
    assert row.state == "STALE" and "morphbook/experiments/burst.py::run" in row.message
    assert row.fails(strict=True) and not row.fails()
    lines = codehash.report("burst", results)
    assert lines[0].startswith("burst: ") and lines[0].endswith("; 2 changed") and " modules; " in lines[0]
    assert any(line.split() == ["changed", "run"] for line in lines)


@pytest.mark.parametrize("old, new", [
    ("    return x + 1", "    return x + 2"),  # a (Triton-style) decorated kernel in a module it loaded
    ("FINGERPRINT_TEST_CONSTANT = 1", "FINGERPRINT_TEST_CONSTANT = 2"),  # a module constant
])
def test_editing_a_kernel_or_a_constant_of_a_loaded_module(copy, old, new):
    src, results = copy
    _replace(src / LIBRARY, old, new)
    assert _row("burst", results).message.startswith(f"STALE: {LIBRARY}::<module> changed since ")


def test_many_changes_are_counted_and_gone_units_named(copy):
    src, results = copy
    fp = load_summary("burst", results)["provenance"]["fingerprint"]
    for path in {src / n.split("::")[0] for n in fp}:
        path.write_text(path.read_text() + "\nFINGERPRINT_TEST_EVERYWHERE = 1\n")
    modules = len({n.split("::")[0] for n in fp})
    assert _row("burst", results).message.endswith(f"and {modules - 3} more changed since "
                                                   f"{stale._short(load_summary('burst', results)['provenance']['git'])}")
    (src / "morphbook/experiments/burst.py").unlink()
    assert "morphbook/experiments/burst.py::<module> (gone)" in _row("burst", results).message


NOTEBOOK = '''
import sys
from pathlib import Path
from morphbook.experiments import burst
from morphbook.publish.notebook import run_chapter
from morphlib.errors import MorphError

target, results = Path(sys.argv[1]), sys.argv[2]
original = target.read_text()
edit = lambda: target.write_text(original.replace({old!r}, {new!r}))  # noqa: E731

def run_editing_during_the_run(cfg, inputs):
    result = burst.run(cfg, inputs)
    edit()
    return result

for case in ("before", "during"):
    if case == "before":  # the kernel imported burst, then its file was edited (in the editor)
        edit()
    try:
        run_chapter("burst", burst.run if case == "before" else run_editing_during_the_run,
                    burst.Config.for_profile("cpu", settings=()), results)
    except MorphError as exc:
        print(f"{{case}}: {{exc}}")
    target.write_text(original)
'''


def test_a_notebook_holding_old_code_cannot_save(copy, tmp_path):
    """A kernel that imported the module before an edit, and an edit during the run: neither saves."""
    src, _ = copy
    target = src / "morphbook/experiments/burst.py"
    old = "    with Stopwatch() as sw:"
    assert old in target.read_text()
    script = tmp_path / "nb.py"
    script.write_text(NOTEBOOK.format(old=old, new="    _edited = 1\n" + old))
    results = tmp_path / "results"
    shutil.copytree(SRC.parent / "results" / "strategies", results / "strategies")  # chapter 5's input
    out = subprocess.run([sys.executable, str(script), str(target), str(results)], capture_output=True,
                         text=True, timeout=300, env=_env(src), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith(("before:", "during:"))] == [
        "before: not saved: this process runs code older than its files (morphbook/experiments/burst.py::run): "
        "restart the kernel (or process) and run again",
        "during: not saved: morphbook/experiments/burst.py::run changed on disk during the run; run it again"]
    assert not (results / "burst" / "summary.json").exists()


# --------------------------------------------------------------------------- saved results, in process
def _save(name, headline, root, files=None, inputs=None):
    result = Result({"profile": "cpu"}, headline, files if files is not None else {"records.json": [1, 2]}, 3.0)
    return save_result(name, result, root, recording=fingerprint.Recording(), inputs=inputs)


def test_inputs_rerun_reverified_and_modified(tmp_path):
    _save("strategies", {"ppl": 40.1}, tmp_path, {"sets.json": {"block": {"2": [10, 11]}}})
    inputs = load_inputs("domains", tmp_path)
    assert inputs["strategies"].json("sets.json") == {"block": {"2": [10, 11]}}
    with pytest.raises(MorphError, match="input strategies has no detail file 'nope.json'"):
        inputs["strategies"].json("nope.json")
    _save("domains", {"win": 0.5}, tmp_path, inputs=inputs)
    prov = load_summary("domains", tmp_path)["provenance"]
    assert prov["inputs"] == {"strategies": inputs["strategies"].identity}
    assert _row("domains", tmp_path).message == "ok"
    # chapter 2 re-run with the same results: re-verified, and what uses it stays ok
    first = load_summary("strategies", tmp_path)["provenance"]
    again = _save("strategies", {"ppl": 40.1, "phase_seconds": {"setup": 2.0}}, tmp_path,  # slower, same result
                  {"sets.json": {"block": {"2": [10, 11]}}})
    assert again.reverified_at is not None and again.describe(3.0).startswith(f"re-verified at {again.reverified_at}")
    prov = load_summary("strategies", tmp_path)["provenance"]
    assert prov["date"] == first["date"] and prov["git"] == first["git"] and prov["files"] == first["files"]
    assert load_summary("strategies", tmp_path)["headline"] == {"ppl": 40.1}  # the original run's
    assert [set(e) for e in prov["reverified"]] == [{"commit", "date", "device", "wall_s"}]
    assert _row("strategies", tmp_path).message == "ok" and _row("domains", tmp_path).message == "ok"
    # chapter 2 re-run with other sets: a new result, and what uses it is stale
    fresh = _save("strategies", {"ppl": 40.1}, tmp_path, {"sets.json": {"block": {"2": [11, 12]}}})
    assert fresh.reverified_at is None and "reverified" not in load_summary("strategies", tmp_path)["provenance"]
    row = _row("domains", tmp_path)
    assert row.state == "STALE" and row.message == "STALE (input strategies re-run since)"
    # the stale input cannot be saved against: it was re-run after the domains run loaded it
    with pytest.raises(MorphError, match="input strategies .* was re-run during this run"):
        _save("domains", {"win": 0.5}, tmp_path, inputs=inputs)
    (tmp_path / "strategies" / "sets.json").write_text("{}")
    with pytest.raises(MorphError, match=r"input strategies in .* is MODIFIED \(sets.json\): re-run strategies"):
        load_inputs("vllm", tmp_path)
    with pytest.raises(MorphError, match=r"domains needs the results of chapter 2 \(strategies\) in .* first"):
        load_inputs("domains", tmp_path / "empty")
    assert load_inputs("sensitivity", tmp_path) == {}


def test_a_reverifying_rerun_mends_an_edited_detail_file(tmp_path):
    _save("sensitivity", {"v": 1}, tmp_path)  # a chapter without inputs
    (tmp_path / "sensitivity" / "records.json").write_text("[9]")
    assert _row("sensitivity", tmp_path).state == "MODIFIED"
    assert _save("sensitivity", {"v": 1}, tmp_path).reverified_at is not None
    assert _row("sensitivity", tmp_path).message == "ok"


def test_status_missing_modified_and_made_before_fingerprints(tmp_path):
    _save("strategies", {"ppl": 40.1}, tmp_path)
    assert _row("strategies", tmp_path).state == "ok"
    path = tmp_path / "strategies" / "summary.json"
    data = json.loads(path.read_text())
    del data["provenance"]["fingerprint"]
    data["provenance"]["git"] = {"commit": "547228e0000", "dirty": False}
    path.write_text(json.dumps(data))
    row = _row("strategies", tmp_path)
    assert row.message == "STALE (made before per-function fingerprints, at 547228e: re-run)"
    (tmp_path / "strategies" / "records.json").write_text("[1, 3]\n")
    row = _row("strategies", tmp_path)
    assert row.state == "MODIFIED" and "records.json" in row.message and row.fails()
    (tmp_path / "strategies" / "records.json").unlink()
    assert "records.json (missing)" in _row("strategies", tmp_path).message
    assert codehash.report("strategies", tmp_path)[0].startswith("strategies: made before per-function fingerprints")


def test_refuses_a_result_without_its_recording(tmp_path):
    with pytest.raises(MorphError, match="needs the fingerprint.Recording"):
        save_result("burst", Result({"profile": "cpu"}, {"v": 1}), tmp_path, recording=None)


def test_cli_checks_every_results_root(tmp_path, capsys):
    _save("strategies", {"ppl": 40.1}, tmp_path)
    family = tmp_path / "families" / "gemma3-270m"
    _save("sensitivity", {"worst": 3}, family)
    (family / "sensitivity" / "records.json").write_text("[0]")
    # every other chapter is missing from the root: book chapters fail, benchmarks do not
    assert stale.main(["--results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "strategies" in out and "missing" in out
    rows = {r.chapter: r for r in stale.check(tmp_path)}
    assert not rows["kernels"].fails() and rows["burst"].fails()
    assert not rows["strategies"].fails(strict=True)
    assert rows["families/gemma3-270m/sensitivity"].state == "MODIFIED"
    assert "families/gemma3-270m/strategies" not in rows  # below the root, only what is there
    assert stale.main(["--results", str(tmp_path), "--explain"]) == 1
    assert "ok       morphlib/errors.py::<module>" in capsys.readouterr().out


def test_codehash_cli(tmp_path, capsys):
    _save("burst", {"v": 1}, tmp_path)
    assert codehash.main(["burst", "--results", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("burst: 0 units, ") and first.endswith("modules; all ok")
    with pytest.raises(SystemExit):
        codehash.main(["nope"])
    assert "unknown chapter 'nope'" in capsys.readouterr().err


def test_code_hash_is_the_fingerprint_digest(tmp_path):
    _save("burst", {"v": 1}, tmp_path)
    prov = load_summary("burst", tmp_path)["provenance"]
    assert prov["fingerprint"] and prov["code_hash"] == digest(prov["fingerprint"]) and len(prov["code_hash"]) == 16


TOY = '''"""A toy experiment module."""

DEFAULTS = {
    "gpu": dict(windows=64,
                window_len=512),
    "cpu": dict(windows=6, window_len=128),
}
LIMIT = 3
'''


def test_other_profiles_defaults_do_not_stale_a_result(tmp_path, monkeypatch):
    """A GPU result stays ok when only the CPU profile's DEFAULTS entry changed (git shows the file at the
    run's commit); the GPU entry, any other constant, a dirty run or a missing history turn it STALE."""
    src = tmp_path / "src"
    mod = src / "morphbook" / "experiments" / "toy.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(TOY)
    monkeypatch.setenv("MORPHBOOK_SRC", str(src))
    unit = "morphbook/experiments/toy.py::<module>"
    summary = {"provenance": {"fingerprint": {unit: fingerprint.unit_hash(unit)}, "params": {"profile": "gpu"},
                              "git": {"commit": "0123abc", "dirty": False}}}
    history = {("0123abc", "morphbook/experiments/toy.py"): TOY}
    monkeypatch.setattr(stale, "_text_at", lambda commit, rel: history.get((commit, rel)))

    def row():
        return stale.status("sensitivity", summary, tmp_path / "results")

    assert row().message == "ok"
    mod.write_text(TOY.replace("windows=6, window_len=128", "windows=4, window_len=64"))
    assert row().state == "ok" and "changed only other profiles' defaults" in row().message
    history.clear()  # no git history to compare with: counted as changed
    assert row().state == "STALE"
    history[("0123abc", "morphbook/experiments/toy.py")] = TOY
    summary["provenance"]["git"]["dirty"] = True  # the commit's file may not be what ran
    assert row().state == "STALE"
    summary["provenance"]["git"]["dirty"] = False
    summary["provenance"]["params"]["profile"] = "cpu"  # a CPU result depends on the CPU entry
    assert row().state == "STALE" and unit in row().message
    summary["provenance"]["params"]["profile"] = "gpu"
    for edit in (("window_len=512", "window_len=256"), ("LIMIT = 3", "LIMIT = 4")):
        mod.write_text(TOY.replace("windows=6, window_len=128", "windows=4, window_len=64").replace(*edit))
        assert row().state == "STALE" and unit in row().message
    # entries sharing a line cannot be told apart: counted as changed
    one_line = TOY.replace('''    "gpu": dict(windows=64,
                window_len=512),
    "cpu": dict(windows=6, window_len=128),''', '''    "gpu": dict(windows=64, window_len=512), "cpu": dict(windows=6, window_len=128),''')
    history[("0123abc", "morphbook/experiments/toy.py")] = one_line
    summary["provenance"]["fingerprint"][unit] = fingerprint._table(one_line).skeleton
    mod.write_text(one_line.replace("windows=6", "windows=4"))
    assert fingerprint.skeleton_for_profile(one_line, "gpu") is None and row().state == "STALE"


def test_text_at_reads_a_file_as_a_commit_holds_it():
    top = subprocess.run(["git", "-C", str(SRC), "rev-parse", "HEAD"], capture_output=True, text=True)
    if top.returncode:
        pytest.skip("not a git checkout")
    text = stale._text_at(top.stdout.strip(), "morphbook/experiments/strategies.py")
    assert text is not None and "DEFAULTS" in text
    assert stale._text_at(top.stdout.strip(), "morphbook/experiments/no_such_module.py") is None
