"""Result files written safely: JSON conversion (NaN -> null), atomic writes (temp file, fsync, rename),
DataFrames as .parquet/.csv, and the sha256 record of a file."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from morphlib.errors import MorphError


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


def _atomic_write(path: Path, write) -> Path:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync it, rename it over
    ``path`` (and fsync the folder, so the rename itself is durable). Nothing is left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text via a temp file in the same folder, fsync, then os.replace."""
    return _atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write, sorted keys, NaN/inf written as null."""
    return atomic_write_text(path, dumps_json(obj))


def _atomic_write_frame(path: Path, frame: Any) -> Path:
    def write(tmp):
        if path.suffix == ".parquet":
            try:
                frame.to_parquet(tmp, index=False)
            except ImportError as exc:
                raise MorphError(f"writing {path.name} needs pyarrow (pip install pyarrow): {exc}") from None
        else:
            frame.to_csv(tmp, index=False)

    return _atomic_write(path, write)


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


def file_record(path: str | os.PathLike) -> dict:
    """{"sha256", "bytes"} of one result file."""
    data = Path(path).read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
