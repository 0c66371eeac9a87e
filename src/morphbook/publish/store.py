"""Chapter results on disk: the sha256 manifest and the summary.json commit point.

``save_result(chapter, result, results_root, recording=rec)`` writes ``<results_root>/<chapter>/`` = the
detail files first, then ``summary.json`` = ``{"provenance": {...}, "headline": {...}}`` last, so a
summary only exists once its companions do. The provenance (``morphbook.publish.provenance``) lists
every detail file with its sha256 and size (``changed_files`` compares them with what is on disk now),
and the fingerprint of the code that ran (``morphlib.fingerprint``, recorded around ``run(cfg)``).

Saving refuses, with a one-line error, a result whose code moved under it: a file edited during the
run, or a process (a notebook kernel) holding code older than its files. A rerun whose detail files
and headline equal the saved ones is not a new result: the summary keeps its run and gains a
``reverified`` entry (commit, date, device, wall time) with the fingerprint of the code now. A
headline's wall-clock entries (``WALL_CLOCK``: how long, not what) are left out of that comparison
and of a result's :func:`identity`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphbook.chapters import chapter
from morphbook.experiments.base import Result
from morphbook.publish.files import atomic_write_json, dumps_json, file_record, to_jsonable, write_result_file
from morphbook.publish.provenance import digest, provenance
from morphlib import fingerprint
from morphlib.errors import MorphError

SUMMARY_NAME = "summary.json"
WALL_CLOCK = frozenset({"phase_seconds", "wall_s"})  # headline keys that time a run
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


# --------------------------------------------------------------------------- summaries
def summary_path(chapter_name: str, results_root: str | os.PathLike = "results") -> Path:
    return Path(results_root) / chapter(chapter_name).name / SUMMARY_NAME


@dataclass(frozen=True)
class Saved:
    path: Path  # the summary.json written
    reverified_at: str | None = None  # the commit of a rerun that reproduced the saved result exactly

    def describe(self, wall_s: float) -> str:
        if self.reverified_at:
            return f"re-verified at {self.reverified_at}: {self.path.parent} unchanged ({wall_s:.1f} s)"
        return f"saved {self.path} ({wall_s:.1f} s)"


def names(items: list[str], first: int = 3) -> str:
    """'a, b, c and 4 more'."""
    shown = ", ".join(items[:first])
    return shown + (f" and {len(items) - first} more" if len(items) > first else "")


def checked_fingerprint(recording: fingerprint.Recording) -> dict[str, str]:
    """The recording's fingerprint, or a one-line error when the code that ran is not the code on disk."""
    if not isinstance(recording, fingerprint.Recording):
        raise MorphError("save_result needs the fingerprint.Recording made around run(cfg)")
    fp = recording.fingerprint()
    if moved := fingerprint.changed(fp):
        raise MorphError(f"not saved: {names(moved)} changed on disk during the run; run it again")
    if old := recording.loaded_mismatches():
        raise MorphError(f"not saved: this process runs code older than its files ({names(old)}): "
                         "restart the kernel (or process) and run again")
    return fp


def save_result(chapter_name: str, result: Result, results_root: str | os.PathLike = "results", *,
                recording: fingerprint.Recording, inputs: dict | None = None) -> Saved:
    """Write the result's detail files, then summary.json (the commit point); or, when they reproduce
    the saved result exactly, record a re-verification (see the module doc). ``inputs``: the
    :class:`morphbook.publish.inputs.Input` objects the run was handed."""
    if not isinstance(result.headline, dict) or not result.headline:
        raise MorphError("headline must be a non-empty dict of figure name -> value")
    for name in result.files or {}:
        if not _SAFE_NAME.match(name) or ".." in name.split("/") or name == SUMMARY_NAME:
            raise MorphError(f"bad detail file name {name!r} (relative, letters/digits/._- only, not summary.json)")
    fp = checked_fingerprint(recording)
    inputs = inputs or {}
    for used in inputs.values():
        used.verify()  # not re-run or edited while this run read it
    prov = provenance(chapter_name, result.params, result.wall_s, fp, {n: i.identity for n, i in inputs.items()})
    headline = to_jsonable(result.headline)
    out_dir = summary_path(chapter_name, results_root).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        files = {name: file_record(write_result_file(staging / name, obj)) for name, obj in (result.files or {}).items()}
        for name in sorted(files):  # (a re-verification rewrites them too: the same bytes, mended if edited)
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    old = _raw_summary(out_dir / SUMMARY_NAME)
    if old is not None and (old["provenance"].get("files") or {}) == files and (
            dumps_json(_what_it_says(old["headline"])) == dumps_json(_what_it_says(headline))):
        return _reverify(out_dir / SUMMARY_NAME, old, prov)
    prov["files"] = dict(sorted(files.items()))
    return Saved(atomic_write_json(out_dir / SUMMARY_NAME, {"provenance": prov, "headline": headline}))


def _raw_summary(path: Path) -> dict | None:
    """A summary as written, or None when there is none or it cannot be read as one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("provenance"), dict) and "headline" in data
    return data if ok else None


def _reverify(path: Path, old: dict, prov: dict) -> Saved:
    git = prov["git"]
    commit = (git.get("commit") or "unknown")[:7] + ("+dirty" if git.get("dirty") else "")
    entry = {"commit": commit, "date": prov["date"], "device": prov["device"], "wall_s": prov["wall_s"]}
    kept = {**old["provenance"], "fingerprint": prov["fingerprint"], "code_hash": prov["code_hash"],
            "inputs": prov["inputs"], "reverified": [*(old["provenance"].get("reverified") or []), entry]}
    atomic_write_json(path, {"provenance": kept, "headline": old["headline"]})
    return Saved(path, commit)


def changed_files(chapter_name: str, summary: dict, results_root: str | os.PathLike = "results") -> list[str]:
    """Detail files that differ from the manifest in the summary's provenance ("name (missing)" when gone).

    Summaries written before manifests existed have none: nothing to compare, nothing reported.
    """
    out_dir = summary_path(chapter_name, results_root).parent
    bad = []
    for name, rec in sorted(((summary.get("provenance") or {}).get("files") or {}).items()):
        path = out_dir / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_record(path) != rec:
            bad.append(name)
    return bad


def _what_it_says(headline) -> dict:
    return {k: v for k, v in headline.items() if k not in WALL_CLOCK} if isinstance(headline, dict) else headline


def identity(summary: dict) -> str:
    """What a result says, in 16 hex digits: its headline (wall-clock entries left out) and detail-file
    manifest (a re-verification keeps both, so it does not stale the results made from it)."""
    return digest({"headline": _what_it_says(summary.get("headline")),
                   "files": (summary.get("provenance") or {}).get("files")})


def load_summary(chapter_name: str, results_root: str | os.PathLike = "results") -> dict | None:
    """The chapter's summary, or None when there is none. A corrupt file is an error, not None."""
    path = summary_path(chapter_name, results_root)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MorphError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "provenance" not in data or "headline" not in data:
        raise MorphError(f"{path}: expected keys 'provenance' and 'headline'")
    return _numeric_key_order(data)


def _numeric_key_order(obj: Any) -> Any:
    """Dicts keyed by integers ("2", "10", ...) in numeric order: JSON files store keys sorted as
    text ("10" before "2"), and tables built from them should read 2, 4, ..., 24."""
    if isinstance(obj, list):
        return [_numeric_key_order(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    items = [(k, _numeric_key_order(v)) for k, v in obj.items()]
    if items and all(re.fullmatch(r"-?\d+", k) for k, _ in items):
        items.sort(key=lambda kv: int(kv[0]))
    return dict(items)
