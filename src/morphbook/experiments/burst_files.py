"""Where chapter 5's GPU slices leave their records, and how the chapter reads them back.

    <root>/burst-replays/<setting>/calibration.json.gz                 the calibration slice
    <root>/burst-replays/<setting>/<trace>-<kind>/<policy>.r<N>.json.gz  one replay

Each file is gzip'd JSON ``{"record": ..., "provenance": ...}``: the record a slice made
(``burst_slices``) and the provenance of the run that made it (``morphbook.publish.provenance``: card,
commit, date, the fingerprint of the code that ran). ``read_records`` returns every file with its state:

* ``ok``;
* ``stale`` — code it ran has changed since (``morphlib.fingerprint.changed`` names the units), or it was
  made under another pre-registration, or (a replay) at another rate than its setting's calibration now
  gives: it is re-run, and the merged summary lists it;
* ``unreadable`` — not gzip'd JSON of that shape (listed, never merged).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from morphbook.experiments.burst_plan import parse_key
from morphlib import fingerprint

FOLDER = "burst-replays"
CALIBRATION = "calibration.json.gz"


def replays_root(results_root) -> Path:
    return Path(results_root) / FOLDER


def calibration_path(root: Path, setting: str) -> Path:
    return Path(root) / setting / CALIBRATION


def replay_path(root: Path, key: str) -> Path:
    k = parse_key(key)
    return Path(root) / k["setting"] / f"{k['trace']}-{k['kind']}" / f"{k['policy']}.r{k['repeat']}.json.gz"


def encode(record: dict, provenance: dict) -> bytes:
    """The bytes of a records file (gzip without a timestamp: the same content gives the same bytes)."""
    text = json.dumps({"record": record, "provenance": provenance}, sort_keys=True, allow_nan=False,
                      default=_plain)
    return gzip.compress(text.encode("utf-8"), mtime=0)


def _plain(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__}")


@dataclass
class Loaded:
    path: Path
    state: str  # "ok", "stale" or "unreadable"
    why: str = ""
    record: dict = field(default_factory=dict, repr=False)
    provenance: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return self.record.get("key") or f"{self.record.get('setting')}.calibrate"


def _read(path: Path) -> Loaded:
    try:
        data = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        record, prov = data["record"], data["provenance"]
        if not isinstance(record, dict) or not isinstance(prov, dict) or record.get("kind") not in ("replay", "calibration"):
            raise ValueError("not a chapter 5 record")
    except (OSError, ValueError, KeyError, TypeError, EOFError, gzip.BadGzipFile) as exc:
        return Loaded(path, "unreadable", f"{type(exc).__name__}: {exc}")
    return Loaded(path, "ok", "", record, prov)


def read_records(root, digest: str) -> list[Loaded]:
    """Every records file under ``root`` with its state (see the module doc), calibrations first."""
    root = Path(root)
    if not root.is_dir():
        return []
    files = sorted(root.rglob("*.json.gz"), key=lambda p: (p.name != CALIBRATION, p.as_posix()))
    out = [_read(p) for p in files]
    rates = {x.record["setting"]: x.record.get("rates", {}) for x in out
             if x.state == "ok" and x.record["kind"] == "calibration"}
    for x in out:
        if x.state != "ok":
            continue
        moved = fingerprint.changed(x.provenance.get("fingerprint") or {})
        if not x.provenance.get("fingerprint"):
            x.state, x.why = "stale", "no fingerprint"
        elif moved:
            x.state, x.why = "stale", f"code changed since: {', '.join(moved[:3])}" + (" ..." if len(moved) > 3 else "")
        elif x.record.get("prereg") != digest:
            x.state, x.why = "stale", "made under another pre-registration"
        elif x.record["kind"] == "replay":
            chosen = rates.get(x.record["setting"], {}).get(f"{x.record['trace']}:{x.record['window_kind']}")
            if chosen is None or chosen["rate"] != x.record["rate"]:
                x.state, x.why = "stale", "made at another rate than its setting's calibration gives"
    return out
