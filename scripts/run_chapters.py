#!/usr/bin/env python3
"""Execute the book's chapters with papermill into a staging folder (never in place).

    python scripts/run_chapters.py --profile cpu                       # -> _build/executed/, _build/results-cpu/
    python scripts/run_chapters.py --profile gpu --out-dir _build/gpu-run/executed   # results_root=results

Each chapter's jupytext percent source (notebooks/NN_name.py) is converted to a notebook in the
output folder and run there with parameters {profile, results_root}, kernel python3, working
directory = repository root. A failing chapter does not stop the others; the exit status is 1 if
any failed, and <out-dir>/status.json records each chapter's outcome and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from morphbook.chapters import CHAPTERS, Chapter  # noqa: E402


def results_root_for(profile: str) -> str:
    """Where a profile's run writes: the committed results for gpu, a build folder for cpu."""
    return "results" if profile == "gpu" else f"_build/results-{profile}"


def chapter_sources(notebooks_dir: Path, only: list[str] | None = None) -> list[tuple[Chapter, Path | None]]:
    """(chapter, source .py or None when missing), in book order."""
    out = []
    for ch in CHAPTERS:
        if only and ch.name not in only:
            continue
        src = notebooks_dir / Path(ch.notebook).name
        out.append((ch, src if src.is_file() else None))
    return out


def kernel_env(notebooks_dir: Path) -> None:
    """The kernel inherits this process's environment: make morphlib and the chapter sources findable."""
    src = str(ROOT / "src")
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([src, *parts])
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


def to_notebook(src: Path, dest: Path, kernel: str = "python3") -> bool:
    """jupytext .py -> .ipynb with the given kernel; True when a cell is tagged 'parameters'."""
    import jupytext

    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    nb.metadata.pop("jupytext", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(nb, dest, fmt="ipynb")
    return any("parameters" in c.metadata.get("tags", []) for c in nb.cells)


def last_error_line(notebook: Path) -> str | None:
    """The last 'error: ...' stderr line or error output of an executed notebook."""
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # noqa: BLE001 - no readable output notebook
        return None
    found = None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found = f"{out.get('ename')}: {out.get('evalue')}"
            elif out.get("name") == "stderr":
                errs = [ln for ln in out.get("text", "").splitlines() if ln.startswith("error:")]
                found = errs[-1] if errs else found
    return found


def run_chapter(ch: Chapter, src: Path, out_dir: Path, params: dict, timeout: float | None) -> dict:
    import papermill as pm

    stem = Path(ch.notebook).stem
    staged = out_dir / f"{stem}.source.ipynb"
    output = out_dir / f"{stem}.ipynb"
    t0 = time.perf_counter()
    try:
        if not to_notebook(src, staged, ch.kernel):
            print(f"  warning: {src.name} has no cell tagged 'parameters'", flush=True)
        pm.execute_notebook(
            str(staged), str(output), parameters=params, kernel_name=ch.kernel, cwd=str(ROOT),
            progress_bar=False, log_output=False, execution_timeout=timeout,
        )
        status, error = "ok", None
    except Exception as exc:  # noqa: BLE001 - record and go on to the next chapter
        status = "failed"
        if getattr(exc, "ename", None) and getattr(exc, "evalue", None):  # the cell's own exception
            error = f"{exc.ename}: {exc.evalue}"
        else:  # e.g. a MorphError shown as one 'error: ...' line on stderr by morphlib's handler
            lines = str(exc).strip().splitlines()
            error = last_error_line(output) or f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    finally:
        staged.unlink(missing_ok=True)
    return {"chapter": ch.name, "status": status, "error": error, "wall_s": round(time.perf_counter() - t0, 1),
            "notebook": str(output.relative_to(ROOT)) if output.is_relative_to(ROOT) else str(output)}


def run_all(profile: str, out_dir: Path, notebooks_dir: Path, results_root: str | None = None,
            only: list[str] | None = None, timeout: float | None = None) -> list[dict]:
    results_root = results_root or results_root_for(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_env(notebooks_dir)
    params = {"profile": profile, "results_root": results_root}
    print(f"executing chapters: profile={profile} results_root={results_root} -> {out_dir}", flush=True)
    rows = []
    for ch, src in chapter_sources(notebooks_dir, only):
        if src is None:
            print(f"[{ch.number}/{len(CHAPTERS)}] {ch.name:<12} MISSING ({notebooks_dir / Path(ch.notebook).name})", flush=True)
            rows.append({"chapter": ch.name, "status": "missing", "error": None, "wall_s": 0.0, "notebook": None})
            continue
        print(f"[{ch.number}/{len(CHAPTERS)}] {ch.name:<12} running ...", flush=True)
        row = run_chapter(ch, src, out_dir, params, timeout)
        extra = f"  {row['error']}" if row["error"] else ""
        print(f"[{ch.number}/{len(CHAPTERS)}] {ch.name:<12} {row['status']} in {row['wall_s']:.1f} s{extra}", flush=True)
        rows.append(row)
    (out_dir / "status.json").write_text(json.dumps({"profile": profile, "results_root": results_root,
                                                     "chapters": rows}, indent=2, sort_keys=True) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out-dir", default="_build/executed", help="staging folder for executed notebooks")
    ap.add_argument("--results-root", default=None, help="default: results (gpu) or _build/results-<profile>")
    ap.add_argument("--notebooks-dir", default="notebooks", help="where the chapter .py sources are")
    ap.add_argument("--chapters", default=None, help="comma-separated subset, e.g. sensitivity,burst")
    ap.add_argument("--cell-timeout", type=float, default=None, help="seconds per cell (default: none)")
    args = ap.parse_args(argv)
    only = [c.strip() for c in args.chapters.split(",")] if args.chapters else None
    unknown = sorted(set(only or []) - {c.name for c in CHAPTERS})
    if unknown:
        print(f"error: unknown chapter(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    out_dir, notebooks_dir = Path(args.out_dir).resolve(), Path(args.notebooks_dir).resolve()
    os.chdir(ROOT)
    rows = run_all(args.profile, out_dir, notebooks_dir, args.results_root, only, args.cell_timeout)
    failed = [r["chapter"] for r in rows if r["status"] == "failed"]
    print(f"{len(rows) - len(failed) - sum(r['status'] == 'missing' for r in rows)} chapters ok, "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
