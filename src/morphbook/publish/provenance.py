"""Where and how a chapter's numbers were made: git commit, the fingerprint of the code that ran (and
its short digest, ``code_hash``), the inputs it read, device, versions, parameters, date, wall time."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from morphbook.chapters import chapter
from morphbook.publish.files import to_jsonable
from morphlib.errors import MorphError

_GPU_KINDS = ("H200", "H100", "A100", "A10G", "L40S", "L4", "T4", "V100")


def project_root() -> Path:
    """The repository root: $MORPHBOOK_ROOT, else the checkout this package lives in, else the working directory."""
    env = os.environ.get("MORPHBOOK_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[3]
    return here if (here / "src" / "morphbook").is_dir() else Path.cwd().resolve()


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

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "triton", "vllm"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
        if out[name] is None and name in ("torch", "transformers"):
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
    return {k: v for k, v in out.items() if v is not None}


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def digest(obj) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted JSON (a fingerprint's short form, an input's identity)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def provenance(chapter_name: str, params: dict, wall_s: float, fingerprint: dict[str, str],
               inputs: dict[str, str] | None = None) -> dict:
    """The provenance block of a summary (no hostname, no user paths beyond params). ``fingerprint``:
    the units of the code that ran (``morphlib.fingerprint``); ``inputs``: {chapter it read: identity}."""
    chapter(chapter_name)
    if not isinstance(fingerprint, dict) or not fingerprint:
        raise MorphError("a result needs the fingerprint of the code that made it (run it inside fingerprint.recording())")
    if not isinstance(params, dict):
        raise MorphError(f"params must be a dict, got {type(params).__name__}")
    profile = params.get("profile")
    if profile not in ("cpu", "gpu"):
        raise MorphError(f"params['profile'] must be 'cpu' or 'gpu', got {profile!r}")
    device = _device()
    return {
        "chapter": chapter_name,
        "profile": profile,
        "params": to_jsonable(params),
        "code_hash": digest(fingerprint),
        "fingerprint": dict(sorted(fingerprint.items())),
        "inputs": dict(sorted((inputs or {}).items())),
        "git": git_state(),
        "device": device,
        "gpu": gpu_kind(device),
        "versions": _versions(),
        "wall_s": round(float(wall_s), 1),
        "date": utc_now(),
    }
