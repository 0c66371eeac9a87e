"""Do the committed results still belong to the code? One line per chapter, and an exit status for CI.

Per chapter (and benchmark) with results:

* ``ok`` — the summary's code hash equals the current code's and every detail file matches the
  sha256 manifest its run recorded;
* ``STALE`` — the code that made the numbers changed since (the page shows them under a red banner
  naming the commit that made them); printed, but fails only with ``--strict`` (use it before publishing);
* ``MODIFIED`` — a detail file was edited, replaced or deleted after the run: always fails;
* ``missing`` — no results: fails for a chapter of the book (every page needs numbers), not for a benchmark.

``python -m morphbook.publish.stale [--results results] [--strict] [--explain]``
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from morphbook.chapters import ALL, chapter
from morphbook.publish.codehash import closure, code_hash
from morphbook.publish.store import changed_files, load_summary
from morphlib.errors import one_line_errors


@dataclass(frozen=True)
class Status:
    chapter: str
    state: str  # "ok", "STALE", "MODIFIED", "missing"
    message: str
    commit: str | None = None  # the commit that made the numbers

    def fails(self, strict: bool = False) -> bool:
        if self.state == "MODIFIED":
            return True
        if self.state == "missing":
            return chapter(self.chapter).number is not None
        return strict and self.state == "STALE"


def _commit(summary: dict) -> str:
    git = (summary.get("provenance") or {}).get("git") or {}
    return (git.get("commit") or "unknown")[:7] + ("+dirty" if git.get("dirty") else "")


def status(chapter_name: str, summary: dict | None, results_root: str | os.PathLike = "results") -> Status:
    """The state of one chapter's results in ``results_root`` (``summary``: its loaded summary.json, or None)."""
    if summary is None:
        return Status(chapter_name, "missing", "missing (no results)")
    commit = _commit(summary)
    if changed := changed_files(chapter_name, summary, results_root):
        return Status(chapter_name, "MODIFIED", f"MODIFIED (differs from the run's manifest: {', '.join(changed)})", commit)
    recorded = (summary.get("provenance") or {}).get("code_hash")
    if recorded != code_hash(chapter_name):
        return Status(chapter_name, "STALE", f"STALE (code changed since the results were made at {commit})", commit)
    return Status(chapter_name, "ok", "ok", commit)


def check(results_root: str | os.PathLike = "results") -> list[Status]:
    return [status(ch.name, load_summary(ch.name, results_root), results_root) for ch in ALL]


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphbook.publish.stale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="results root to check (default: results)")
    ap.add_argument("--strict", action="store_true", help="STALE fails too (use before publishing)")
    ap.add_argument("--explain", action="store_true", help="also list the modules each chapter's hash covers")
    args = ap.parse_args(argv)
    rows = check(args.results)
    width = max(len(r.chapter) for r in rows)
    for row in rows:
        print(f"{row.chapter:<{width}}  {row.message}")
        if args.explain:
            for dotted in closure(chapter(row.chapter).experiment):
                print(f"{'':<{width}}    + {dotted}")
    failed = [r.chapter for r in rows if r.fails(args.strict)]
    if failed:
        print(f"stale check failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
