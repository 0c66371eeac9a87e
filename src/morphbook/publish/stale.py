"""Do the committed results still belong to the code? One line per result, and an exit status for CI.

Per chapter (and benchmark) with results, in the results root and in every folder below it that holds
results of its own (e.g. ``results/families/gemma3-270m/``):

* ``ok`` — every unit of the code that ran (``morphlib.fingerprint``, recorded in the provenance) has
  the same hash in the files now, every input it read is the same result, and every detail file
  matches the sha256 manifest its run recorded;
  A module skeleton that changed only in its ``DEFAULTS`` entries for *other* profiles (the CPU
  profile's sizes, for a GPU result) counts as ok: git shows the file at the run's (clean) commit, and the
  two skeletons without those entries must agree; without git history it counts as changed;
* ``STALE`` — a function it ran, a module it loaded (constants, classes, decorated defs such as Triton
  kernels) or an input changed since: the line names them, e.g. ``STALE:
  morphlib/quant/int4.py::quantize_groupwise changed since 547228e`` or ``STALE (input strategies re-run
  since)``; the page shows the numbers under a red banner. Printed; fails only with ``--strict``
  (use it before publishing);
* ``MODIFIED`` — a detail file was edited, replaced or deleted after the run: always fails;
* ``missing`` — no results: fails for a chapter of the book (every page needs numbers), not for a
  benchmark nor in a folder below the root.

``python -m morphbook.publish.stale [--results results] [--strict] [--explain]`` (``--explain`` lists
each result's units and their state).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from morphbook.chapters import ALL, NAMES, chapter
from morphbook.publish.codehash import unit_states
from morphbook.publish.store import SUMMARY_NAME, changed_files, identity, load_summary, names
from morphlib import fingerprint
from morphlib.errors import one_line_errors


@dataclass(frozen=True)
class Status:
    chapter: str
    state: str  # "ok", "STALE", "MODIFIED", "missing"
    message: str
    commit: str | None = None  # the commit that made the numbers
    required: bool = True  # a missing result fails (a book chapter in the results root)

    def fails(self, strict: bool = False) -> bool:
        if self.state == "MODIFIED":
            return True
        if self.state == "missing":
            return self.required and chapter(self.chapter).number is not None
        return strict and self.state == "STALE"


def _short(git: dict | None) -> str:
    git = git or {}
    return (git.get("commit") or "unknown")[:7] + ("+dirty" if git.get("dirty") else "")


def _verified_at(prov: dict) -> str:
    """The commit whose code the fingerprint is of: the last re-verification's, else the run's."""
    again = prov.get("reverified") or []
    return again[-1]["commit"] if again else _short(prov.get("git"))


def _stale_inputs(prov: dict, chapter_name: str, results_root) -> list[str]:
    recorded = prov.get("inputs") or {}
    out = []
    for name in chapter(chapter_name).uses:
        now = load_summary(name, results_root)
        if name not in recorded or now is None or identity(now) != recorded[name]:
            out.append(name)
    return out


@functools.lru_cache(maxsize=8)
def _git_top(folder: str) -> str | None:
    """The top of the git checkout holding ``folder``, or None (no git, or not a checkout)."""
    try:
        top = subprocess.run(["git", "-C", folder, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return top.stdout.strip() if top.returncode == 0 else None


def _text_at(commit: str, rel: str) -> str | None:
    """The source file ``rel`` (under the fingerprint's source root) as commit ``commit`` holds it, from git;
    None when there is no git history to ask (a shallow or exported copy) or no such file."""
    path = (fingerprint.source_root() / rel).resolve()
    top = _git_top(str(fingerprint.source_root()))
    if top is None:
        return None
    try:
        inside = path.relative_to(Path(top).resolve()).as_posix()
        shown = subprocess.run(["git", "-C", top, "show", f"{commit}:{inside}"], capture_output=True, text=True,
                               timeout=30)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return shown.stdout if shown.returncode == 0 else None


def _other_profiles_only(unit: str, recorded: str, prov: dict) -> bool:
    """True when a module skeleton ``unit`` changed only in the ``DEFAULTS`` entries of profiles other than
    the one the result ran (e.g. the CPU profile's sizes, for a GPU result): the file at the run's commit
    must be the one the fingerprint hashed (a clean tree), and both files must separate their entries."""
    rel, _, name = unit.partition("::")
    git, profile = prov.get("git") or {}, (prov.get("params") or {}).get("profile")
    if name != fingerprint.MODULE or not git.get("commit") or git.get("dirty") or prov.get("reverified") or not profile:
        return False
    old = _text_at(git["commit"], rel)
    return (old is not None and fingerprint.skeleton(old) == recorded
            and fingerprint.only_other_profiles_changed(rel, old, profile))


def status(chapter_name: str, summary: dict | None, results_root: str | os.PathLike = "results") -> Status:
    """The state of one chapter's results in ``results_root`` (``summary``: its loaded summary.json, or None)."""
    if summary is None:
        return Status(chapter_name, "missing", "missing (no results)")
    prov = summary.get("provenance") or {}
    commit = _short(prov.get("git"))
    if changed := changed_files(chapter_name, summary, results_root):
        return Status(chapter_name, "MODIFIED", f"MODIFIED (differs from the run's manifest: {', '.join(changed)})", commit)
    if not prov.get("fingerprint"):
        return Status(chapter_name, "STALE", f"STALE (made before per-function fingerprints, at {commit}: re-run)", commit)
    states = unit_states(prov["fingerprint"])
    others = [n for n, s in states.items() if s == "changed" and _other_profiles_only(n, prov["fingerprint"][n], prov)]
    moved = [f"{n} (gone)" if s == "gone" else n for n, s in states.items() if s != "ok" and n not in others]
    inputs = _stale_inputs(prov, chapter_name, results_root)
    if not moved and not inputs:
        note = (f" (since {commit}, {names([n.partition('::')[0] for n in others])} changed only other profiles' "
                f"defaults)") if others else ""
        return Status(chapter_name, "ok", "ok" + note, commit)
    input_text = f"input {', '.join(inputs)} re-run since"
    if not moved:
        return Status(chapter_name, "STALE", f"STALE ({input_text})", commit)
    message = f"STALE: {names(moved)} changed since {_verified_at(prov)}" + (f"; {input_text}" if inputs else "")
    return Status(chapter_name, "STALE", message, commit)


def result_roots(results_root: str | os.PathLike = "results") -> list[Path]:
    """The results root, then every folder below it holding a chapter's summary (sorted)."""
    root = Path(results_root)
    found = {p.parent.parent for p in root.rglob(SUMMARY_NAME)
             if p.parent.name in NAMES and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    return [root] + sorted(found - {root})


def check(results_root: str | os.PathLike = "results") -> list[Status]:
    """Every chapter's status in the results root; below it, the results each folder holds (named
    ``families/gemma3-270m/sensitivity``)."""
    root = Path(results_root)
    rows = []
    for where in result_roots(root):
        label = "" if where == root else where.relative_to(root).as_posix() + "/"
        for ch in ALL:
            summary = load_summary(ch.name, where)
            if summary is None and label:
                continue
            row = status(ch.name, summary, where)
            rows.append(dataclasses.replace(row, chapter=label + ch.name, required=False) if label else row)
    return rows


def _explain(chapter_label: str, results_root: Path) -> list[str]:
    where, _, name = chapter_label.rpartition("/")
    summary = load_summary(name, results_root / where)
    prov = (summary or {}).get("provenance") or {}
    return [f"{state:<8} {unit}" for unit, state in unit_states(prov.get("fingerprint") or {}).items()]


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphbook.publish.stale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="results root to check (default: results)")
    ap.add_argument("--strict", action="store_true", help="STALE fails too (use before publishing)")
    ap.add_argument("--explain", action="store_true", help="also list each result's units and their state")
    args = ap.parse_args(argv)
    rows = check(args.results)
    width = max(len(r.chapter) for r in rows)
    for row in rows:
        print(f"{row.chapter:<{width}}  {row.message}")
        if args.explain:
            for line in _explain(row.chapter, Path(args.results)):
                print(f"{'':<{width}}    {line}")
    failed = [r.chapter for r in rows if r.fails(args.strict)]
    if failed:
        print(f"stale check failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
