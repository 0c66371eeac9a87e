"""How long the chapters take: this build's CPU-profile runs (the status file scripts/run_chapters.py
writes) beside each published result's own wall time, for the reproduce page."""

from __future__ import annotations

import json
import os
from pathlib import Path

from morphbook.chapters import ALL
from morphbook.publish import fmt
from morphbook.publish.page import profile_words, used_device
from morphbook.publish.store import load_summary
from morphbook.publish.tables import markdown_table


def _minutes(seconds: float) -> str:
    return f"{fmt.num(seconds, 0)} s" if seconds < 120 else f"{fmt.num(seconds / 60, 1)} min"


def times_markdown(status_file: str | os.PathLike, committed_root: str | os.PathLike = "results") -> str:
    """A table of wall times per chapter, and the total of this build's chapter runs."""
    status = {}
    if Path(status_file).is_file():
        data = json.loads(Path(status_file).read_text(encoding="utf-8"))
        status = {r["chapter"]: r for r in data.get("chapters", [])}
    rows = []
    for ch in ALL:
        summary = load_summary(ch.name, committed_root)
        run = status.get(ch.name)
        if summary is None and run is None:
            continue
        prov = (summary or {}).get("provenance") or {}
        rows.append({"what": f"{ch.number}. {ch.title}" if ch.number else ch.title,
                     "build": (_minutes(run["wall_s"]) + ("" if run["status"] == "ok" else f" ({run['status']})"))
                     if run else "—" if ch.notebook is None else "not run by this build",
                     "published": _minutes(prov["wall_s"]) if isinstance(prov.get("wall_s"), (int, float)) else "n/a",
                     "where": f"{profile_words(prov, ch.name)}, {used_device(prov, ch.name)[0]}" if prov else "n/a"})
    if not rows:
        return "No chapter has run yet, so no times can be shown.\n"
    total = sum(r["wall_s"] for r in status.values())
    text = markdown_table(rows, {"what": "chapter or benchmark", "build": "this build's run (CPU profile)",
                                 "published": "published run", "where": "published run made on"},
                          "How long each part takes: this build's own runs, and each published result's wall time "
                          "(—: no page of its own; the domains run inside chapter 2, the benchmarks only on a GPU)",
                          "tbl-reproduce-times")
    lead = (f"**How long it takes.** This build ran the chapters in {_minutes(total)} in all (papermill, CPU "
            "profile, on the machine that built it; a machine shared with other work takes longer). Setting up "
            "a fresh machine adds the two environments and the downloads.\n\n") if status else ""
    return lead + text
