"""The stale check really fails: a tiny fake project (notebook + morphlib modules) in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from morphlib import stale
from morphlib.results import save_summary

SRC = Path(__file__).resolve().parents[1] / "src"

NOTEBOOK = '''# %% [markdown]
# # Strategies
#
# Narrative text that may change freely.

# %% tags=["parameters"]
profile = "cpu"
model = "smollm2-135m"
seed = 0
results_root = "results"

# %%
%matplotlib inline
from morphlib import helper
import morphlib.other as other
from morphlib.book import CHAPTERS  # book-only: never hashed
value = helper.f() + other.g()

# %% [markdown]
# More narrative.
'''

MODULES = {
    "__init__.py": '"""fake morphlib"""\n',
    "helper.py": "from .deep import h\n\n\ndef f():\n    return h() + 1\n",
    "deep.py": "def h():\n    return 41\n",
    "other.py": "from morphlib import deep\n\n\ndef g():\n    return deep.h()\n",
    "unrelated.py": "X = 1\n",
    "book.py": "CHAPTERS = ()\n",
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "02_strategies.py").write_text(NOTEBOOK)
    pkg = tmp_path / "src" / "morphlib"
    pkg.mkdir(parents=True)
    for name, text in MODULES.items():
        (pkg / name).write_text(text)
    monkeypatch.setenv("MORPHBOOK_ROOT", str(tmp_path))
    monkeypatch.delenv("MORPHBOOK_NOTEBOOKS", raising=False)
    save_summary("strategies", _params(tmp_path), {"ppl": 40.1}, tmp_path / "results")
    return tmp_path


def _params(project: Path) -> dict:
    return {"profile": "cpu", "model": "smollm2-135m", "seed": 0, "results_root": str(project / "results")}


def status(project: Path) -> dict[str, str]:
    return {name: msg for name, msg, _ in stale.check(project / "results", project)}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_dependencies_are_transitive_and_skip_book_only(project):
    deps = stale.dependencies(project / "notebooks" / "02_strategies.py", project)
    assert sorted(deps) == ["morphlib.deep", "morphlib.helper", "morphlib.other"]


def test_fresh_results_are_ok_and_other_chapters_missing(project):
    st = status(project)
    assert st["strategies"] == "ok"
    assert st["sensitivity"] == "missing (no committed results)"
    assert stale.main(["--results", str(project / "results"), "--root", str(project)]) == 0


def test_code_cell_edit_makes_results_stale(project, capsys):
    edit(project / "notebooks" / "02_strategies.py", 'seed = 0', 'seed = 1')
    assert status(project)["strategies"].startswith("STALE (code changed since results were made:")
    assert stale.main(["--results", str(project / "results"), "--root", str(project)]) == 1
    assert "strategies" in capsys.readouterr().out


def test_markdown_and_whitespace_edits_keep_results_ok(project):
    nb = project / "notebooks" / "02_strategies.py"
    edit(nb, "Narrative text that may change freely.", "Completely rewritten narrative, $x^2$.")
    edit(nb, "# More narrative.", "# More narrative.\n#\n# And a new paragraph.")
    edit(nb, "value = helper.f() + other.g()", "value = helper.f() + other.g()   ")
    assert status(project)["strategies"] == "ok"


@pytest.mark.parametrize("module", ["helper.py", "deep.py", "other.py"])
def test_imported_module_edit_makes_results_stale(project, module):
    path = project / "src" / "morphlib" / module
    path.write_text(path.read_text() + "\n# changed\nY = 2\n")
    assert status(project)["strategies"].startswith("STALE")


@pytest.mark.parametrize("module", ["unrelated.py", "book.py", "__init__.py"])
def test_unimported_or_book_only_module_edit_keeps_ok(project, module):
    path = project / "src" / "morphlib" / module
    path.write_text(path.read_text() + "\nZ = 3\n")
    assert status(project)["strategies"] == "ok"


def test_new_import_makes_results_stale(project):
    edit(project / "notebooks" / "02_strategies.py", "import morphlib.other as other",
         "import morphlib.other as other\nfrom morphlib.unrelated import X")
    assert status(project)["strategies"].startswith("STALE")


def test_missing_notebook_with_results_is_stale(project):
    (project / "notebooks" / "02_strategies.py").unlink()
    assert status(project)["strategies"].startswith("STALE (notebook")


def test_cli_exit_status_in_a_subprocess(project):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("MORPHBOOK_NOTEBOOKS", None)
    cmd = [sys.executable, "-m", "morphlib.stale", "--results", str(project / "results"), "--root", str(project)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(ok.stdout.strip().splitlines()) == 6
    edit(project / "notebooks" / "02_strategies.py", "value = helper.f()", "value = 2 * helper.f()")
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 1
    assert "strategies" in bad.stdout and "STALE" in bad.stdout


def test_notebooks_dir_override(project, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("elsewhere")
    text = (project / "notebooks" / "02_strategies.py").read_text()
    (other / "02_strategies.py").write_text(text.replace("seed = 0", "seed = 5"))
    monkeypatch.setenv("MORPHBOOK_NOTEBOOKS", str(other))
    assert status(project)["strategies"].startswith("STALE")


@pytest.fixture
def with_details(project):
    save_summary("strategies", _params(project), {"ppl": 40.1}, project / "results",
                 extra_files={"records.json": [{"k": 2, "ppl": 41.0}], "notes.md": "k=2: 41.0\n"})
    return project


def test_manifest_lists_every_detail_file(with_details):
    out = with_details / "results" / "strategies"
    files = json.loads((out / "summary.json").read_text())["provenance"]["files"]
    assert sorted(files) == ["notes.md", "records.json"]
    for name, rec in files.items():
        data = (out / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert status(with_details)["strategies"] == "ok"


@pytest.mark.parametrize("change", ["edit", "delete"])
def test_hand_edited_or_missing_detail_file_fails(with_details, change, capsys):
    path = with_details / "results" / "strategies" / "records.json"
    if change == "edit":
        path.write_text(path.read_text().replace("41.0", "39.0"))
        expected = "MODIFIED (differs from the run's manifest: records.json)"
    else:
        path.unlink()
        expected = "MODIFIED (differs from the run's manifest: records.json (missing))"
    assert status(with_details)["strategies"] == expected
    assert stale.main(["--results", str(with_details / "results"), "--root", str(with_details)]) == 1
    assert "MODIFIED" in capsys.readouterr().out


def test_summary_without_manifest_is_still_checked_by_code_hash(with_details):
    path = with_details / "results" / "strategies" / "summary.json"
    data = json.loads(path.read_text())
    del data["provenance"]["files"]  # written before manifests existed
    path.write_text(json.dumps(data))
    assert status(with_details)["strategies"] == "ok"
