"""Chapter results on disk: atomic writes, provenance, and the summary.json commit point.

Each chapter writes ``<results_root>/<chapter>/summary.json`` =
``{"provenance": {...}, "headline": {...}}`` plus any extra JSON / text / Parquet / CSV files.
The extra files are written first and summary.json last, so a summary only exists once its
companions do. Book-only module: it is excluded from the stale check's code hash.

Headline values are scalars (number / string / bool) or dicts
``{"value": ..., "unit": "ms", "label": "Decode latency"}``; the introduction's findings table
shows them (nested dicts without "value" are skipped; if some entries carry ``"finding": True``,
only those are shown for that chapter).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from morphlib.errors import MorphError

SUMMARY_NAME = "summary.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_GPU_KINDS = ("H200", "H100", "A100", "A10G", "L40S", "L4", "T4", "V100")


# --------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any, where: str = "$") -> Any:
    """Plain JSON types; NaN/inf -> None; numpy/pandas scalars, arrays, Paths, dataclasses converted."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas DataFrame
        return to_jsonable(obj.to_dict(orient="records"), where)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist(), where)
    if hasattr(obj, "item"):
        return to_jsonable(obj.item(), where)
    raise MorphError(f"cannot write {type(obj).__name__} as JSON (at {where})")


def dumps_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), sort_keys=True, indent=2, allow_nan=False) + "\n"


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temp file in the same folder, fsync, then os.replace."""
    return _atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write, sorted keys, NaN/inf written as null."""
    return atomic_write_text(path, dumps_json(obj))


def _atomic_write_frame(path: Path, frame: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".parquet":
            try:
                frame.to_parquet(tmp, index=False)
            except ImportError as exc:
                raise MorphError(f"writing {path.name} needs pyarrow (pip install pyarrow): {exc}") from None
        else:
            frame.to_csv(tmp, index=False)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_result_file(path: str | os.PathLike, obj: Any) -> Path:
    """Write one result file by extension: .json (any JSON-able), .parquet/.csv (DataFrame), else text/bytes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return atomic_write_json(path, obj)
    if suffix in (".parquet", ".csv"):
        if not hasattr(obj, "to_csv"):
            raise MorphError(f"{path.name}: a .{suffix[1:]} file needs a pandas DataFrame, got {type(obj).__name__}")
        return _atomic_write_frame(path, obj)
    if isinstance(obj, bytes):
        return _atomic_write_bytes(path, obj)
    if isinstance(obj, str):
        return atomic_write_text(path, obj)
    raise MorphError(f"{path.name}: don't know how to write {type(obj).__name__} (use .json, .parquet, .csv, str or bytes)")


# --------------------------------------------------------------------------- provenance
def project_root() -> Path:
    """The repository root: $MORPHBOOK_ROOT, the checkout this package lives in, or the cwd's ancestor."""
    env = os.environ.get("MORPHBOOK_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "notebooks").is_dir() and (here / "src" / "morphlib").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for cand in (cwd, *cwd.parents):
        if (cand / "notebooks").is_dir() and (cand / "src" / "morphlib").is_dir():
            return cand
    return cwd


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: Path | None = None) -> dict:
    """{"commit", "dirty"}; where the tree travels without .git (a lent GPU machine), the caller can
    pass them as MORPHBOOK_GIT_COMMIT / MORPHBOOK_GIT_DIRTY; the code hash still checks the files."""
    if os.environ.get("MORPHBOOK_GIT_COMMIT"):
        return {"commit": os.environ["MORPHBOOK_GIT_COMMIT"],
                "dirty": os.environ.get("MORPHBOOK_GIT_DIRTY", "0") not in ("0", "", "false")}
    root = Path(root) if root else project_root()
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def gpu_kind(device_name: str | None) -> str | None:
    """Short card name from a CUDA device name: 'NVIDIA H100 80GB HBM3' -> 'H100'; CPU / unknown -> None."""
    if not device_name:
        return None
    for kind in _GPU_KINDS:
        if re.search(rf"\b{kind}\b", device_name.upper()):
            return kind
    return None


def _versions() -> dict:
    """Versions of the loaded modules (else of the installed distributions; None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    import morphlib

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "morphlib"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
        if out[name] is None:
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = getattr(morphlib, "__version__", None) if name == "morphlib" else None
    return out


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def provenance(chapter: str, params: dict) -> dict:
    """Where and how a chapter's numbers were made (no hostname, no user paths beyond params)."""
    check_chapter(chapter)
    if not isinstance(params, dict):
        raise MorphError(f"params must be a dict, got {type(params).__name__}")
    from morphlib.stale import code_hash

    root = project_root()
    device = _device()
    profile = params.get("profile")
    if profile not in ("cpu", "gpu"):
        raise MorphError(f"params['profile'] must be 'cpu' or 'gpu', got {profile!r}")
    return {
        "chapter": chapter,
        "profile": profile,
        "params": to_jsonable(params),
        "code_hash": code_hash(chapter, root=root),
        "git": git_state(root),
        "device": device,
        "gpu": gpu_kind(device),
        "versions": _versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }


# --------------------------------------------------------------------------- summaries
def check_chapter(chapter: str) -> str:
    from morphlib.book import CHAPTER_NAMES

    if chapter not in CHAPTER_NAMES:
        raise MorphError(f"unknown chapter {chapter!r} (expected one of {', '.join(CHAPTER_NAMES)})")
    return chapter


def summary_path(chapter: str, results_root: str | os.PathLike = "results") -> Path:
    return Path(results_root) / check_chapter(chapter) / SUMMARY_NAME


def save_summary(
    chapter: str,
    params: dict,
    headline: dict,
    results_root: str | os.PathLike = "results",
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write extra files, then summary.json (the commit point). Returns the summary path.

    The provenance lists every extra file with its sha256 and size (``provenance["files"]``), so each
    detail file is tied to the run that made it: ``python -m morphlib.stale`` fails when one was
    edited, replaced or removed afterwards.
    """
    if not isinstance(headline, dict) or not headline:
        raise MorphError("headline must be a non-empty dict of figure name -> value")
    out_dir = summary_path(chapter, results_root).parent
    prov = provenance(chapter, params)
    files = {}
    for name, obj in (extra_files or {}).items():
        if not _SAFE_NAME.match(name) or ".." in name.split("/") or name == SUMMARY_NAME:
            raise MorphError(f"bad extra file name {name!r} (relative, letters/digits/._- only, not summary.json)")
        files[name] = file_record(write_result_file(out_dir / name, obj))
    prov["files"] = dict(sorted(files.items()))
    return atomic_write_json(out_dir / SUMMARY_NAME, {"provenance": prov, "headline": to_jsonable(headline)})


def file_record(path: str | os.PathLike) -> dict:
    """{"sha256", "bytes"} of one result file."""
    data = Path(path).read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def changed_files(chapter: str, summary: dict, results_root: str | os.PathLike = "results") -> list[str]:
    """Detail files that differ from the manifest in the summary's provenance ("name (missing)" when gone).

    Summaries written before manifests existed have none: nothing to compare, nothing reported.
    """
    out_dir = summary_path(chapter, results_root).parent
    bad = []
    for name, rec in sorted(((summary.get("provenance") or {}).get("files") or {}).items()):
        path = out_dir / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_record(path) != rec:
            bad.append(name)
    return bad


def load_summary(chapter: str, results_root: str | os.PathLike = "results") -> dict | None:
    """The chapter's summary, or None when there is none. A corrupt file is an error, not None."""
    path = summary_path(chapter, results_root)
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
