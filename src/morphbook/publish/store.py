"""Chapter results on disk: the sha256 manifest and the summary.json commit point.

``save_result(chapter, result, results_root)`` writes ``<results_root>/<chapter>/`` = the detail files
first, then ``summary.json`` = ``{"provenance": {...}, "headline": {...}}`` last, so a summary only
exists once its companions do. The provenance (``morphbook.publish.provenance``) lists every detail
file with its sha256 and size; ``changed_files`` compares them with what is on disk now.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from morphbook.chapters import chapter
from morphbook.experiments.base import Result
from morphbook.publish.files import atomic_write_json, file_record, to_jsonable, write_result_file
from morphbook.publish.provenance import provenance
from morphlib.errors import MorphError

SUMMARY_NAME = "summary.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


# --------------------------------------------------------------------------- summaries
def summary_path(chapter_name: str, results_root: str | os.PathLike = "results") -> Path:
    return Path(results_root) / chapter(chapter_name).name / SUMMARY_NAME


def save_result(chapter_name: str, result: Result, results_root: str | os.PathLike = "results") -> Path:
    """Write the result's detail files, then summary.json (the commit point). Returns the summary path."""
    if not isinstance(result.headline, dict) or not result.headline:
        raise MorphError("headline must be a non-empty dict of figure name -> value")
    out_dir = summary_path(chapter_name, results_root).parent
    prov = provenance(chapter_name, result.params, result.wall_s)
    files = {}
    for name, obj in (result.files or {}).items():
        if not _SAFE_NAME.match(name) or ".." in name.split("/") or name == SUMMARY_NAME:
            raise MorphError(f"bad detail file name {name!r} (relative, letters/digits/._- only, not summary.json)")
        files[name] = file_record(write_result_file(out_dir / name, obj))
    prov["files"] = dict(sorted(files.items()))
    return atomic_write_json(out_dir / SUMMARY_NAME, {"provenance": prov, "headline": to_jsonable(result.headline)})


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
