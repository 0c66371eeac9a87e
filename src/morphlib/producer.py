"""Values cached on disk, keyed by the code that made them: the AWQ scales (``morph``) and the GGUF
conversions (``convert``).

    with producing("torch", "transformers") as meta:
        value = compute(...)             # meta, filled on exit: {"producer": {unit: hash}, "versions": {...}}
    ... store value and meta ...
    reason = stale_reason(meta, "torch", "transformers")   # None: reuse it, and then
    reuse(meta)                          # its producer's units join the running result's fingerprint

The producer is the fingerprint (``morphlib.fingerprint``) of the units that ran while the value was
computed, with the skeletons of their modules (not those of every module loaded at the time: an edit
to an unrelated constant must not throw a cache away). A cache is reused only while every one of those
units is unchanged on disk and the named distributions have the versions it was made with; a record
with no producer at all (made before producers were kept, or by code outside the source root) is never
reused.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError, version

from morphlib import fingerprint


def versions(*dists: str) -> dict[str, str | None]:
    """{distribution: installed version, or None}, read without importing them."""
    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


@contextlib.contextmanager
def producing(*dists: str):
    """Record the project code that runs inside the block; yields a dict that holds, on exit,
    ``{"producer": {unit: hash}, "versions": versions(*dists)}``."""
    meta: dict = {}
    with fingerprint.recording() as rec:
        yield meta
    ran = {name.partition("::")[0] for name in rec.units_run()}
    meta["producer"] = {name: h for name, h in rec.fingerprint().items() if name.partition("::")[0] in ran}
    meta["versions"] = versions(*dists)


def stale_reason(meta, *dists: str, any_versions: bool = False) -> str | None:
    """Why a value cached with ``meta`` must not be reused here (None: it may be). ``any_versions``: accept
    one made with other versions of ``dists`` (code changes still count)."""
    producer = meta.get("producer") if isinstance(meta, dict) else None
    if not isinstance(producer, dict) or not producer:
        return "no record of the code that made it"
    try:
        edited = fingerprint.changed(producer)
    except ValueError:
        return "an unreadable record of the code that made it"
    if edited:
        more = f" and {len(edited) - 1} more" if len(edited) > 1 else ""
        return f"made by code that has changed since ({edited[0]}{more})"
    here = versions(*dists)
    made = {d: (meta.get("versions") or {}).get(d) for d in dists}
    if not any_versions and made != here:
        diff = ", ".join(f"{d} {made[d]} (here {here[d]})" for d in dists if made[d] != here[d])
        return f"made with {diff}"
    return None


def reuse(meta: dict) -> None:
    """A cache hit: the units that made the value join every active recording (the running result's
    fingerprint)."""
    fingerprint.merge_into_current(meta["producer"])
