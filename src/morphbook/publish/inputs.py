"""The results a chapter builds on, handed to its ``run(cfg, inputs)`` after their manifest is checked.

A chapter declares what it reads (``Chapter(..., uses=("strategies",))``); ``load_inputs`` reads those
results from the same results root, refuses missing or MODIFIED ones with a one-line error, and
returns one :class:`Input` per name. The run's provenance records each input's identity (a digest
of its headline and detail-file manifest); ``morphbook.publish.stale`` reports
``STALE (input strategies re-run since)`` when the input there no longer has it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from morphbook.chapters import chapter
from morphbook.publish.store import changed_files, identity, load_summary, summary_path
from morphlib.errors import MorphError


@dataclass(frozen=True)
class Input:
    """One chapter's saved results, as another chapter's run reads them."""

    chapter: str
    results_root: Path
    summary: dict
    identity: str

    @property
    def headline(self) -> dict:
        return self.summary["headline"]

    @property
    def provenance(self) -> dict:
        return self.summary["provenance"]

    @property
    def params(self) -> dict:
        return self.provenance.get("params") or {}

    def has(self, name: str) -> bool:
        return name in (self.provenance.get("files") or {})

    def json(self, name: str):
        """A detail file of the input, parsed (one its manifest lists)."""
        if not self.has(name):
            raise MorphError(f"input {self.chapter} has no detail file {name!r} (has: "
                             f"{', '.join(sorted(self.provenance.get('files') or {})) or 'none'})")
        path = summary_path(self.chapter, self.results_root).parent / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MorphError(f"input {self.chapter}: cannot read {path} ({exc.__class__.__name__})") from None

    def verify(self) -> None:
        """A one-line error when the input was re-run or edited since it was loaded."""
        now = load_input(self.chapter, self.results_root, needed_by="this run")
        if now.identity != self.identity:
            raise MorphError(f"not saved: input {self.chapter} in {self.results_root} was re-run during this run")


def load_input(name: str, results_root: str | os.PathLike, needed_by: str) -> Input:
    summary = load_summary(name, results_root)
    ch = chapter(name)
    if summary is None:
        which = f"chapter {ch.number} ({name})" if ch.number else name
        raise MorphError(f"{needed_by} needs the results of {which} in {results_root} first: run {name}")
    if bad := changed_files(name, summary, results_root):
        raise MorphError(f"input {name} in {results_root} is MODIFIED ({', '.join(bad)}): re-run {name}")
    return Input(name, Path(results_root), summary, identity(summary))


def load_inputs(chapter_name: str, results_root: str | os.PathLike = "results") -> dict[str, Input]:
    """{name: Input} of every result ``chapter_name`` declares it uses, from ``results_root``."""
    return {name: load_input(name, results_root, needed_by=chapter_name) for name in chapter(chapter_name).uses}


def call_run(chapter_name: str, run, cfg, inputs: dict[str, Input]):
    """``run(cfg, inputs)`` for a chapter that declares inputs, ``run(cfg)`` otherwise."""
    return run(cfg, inputs) if chapter(chapter_name).uses else run(cfg)
