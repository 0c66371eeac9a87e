"""Stale-results check: have a chapter's code or the morphlib modules it uses changed since its results?

``code_hash(chapter)`` is a sha256 over
  (a) the chapter notebook's CODE cells (jupytext percent source; trailing whitespace normalised;
      markdown cells ignored, so narrative edits never invalidate results), and
  (b) the source of every morphlib module the notebook imports, transitively (AST walk of
      ``import morphlib.x``, ``from morphlib.x import ...``, ``from morphlib import x`` and relative
      imports inside the package). Book-only modules (book, plotting, results, stale) and
      ``__init__`` are left out, so rendering changes never invalidate data.

CLI: ``python -m morphlib.stale [--results results] [--root .] [--explain]`` prints one line per
chapter (ok / STALE / MODIFIED / missing) and exits 1 if any existing result is stale, or if a
detail file no longer matches the sha256 manifest its summary.json recorded (edited by hand, replaced,
or deleted after the run).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import sys
from pathlib import Path

from morphlib.errors import MorphError, one_line_errors

BOOK_ONLY = frozenset({"book", "plotting", "results", "stale", "__init__"})
_IMPORT_RE = re.compile(r"^\s*(?:from\s+morphlib((?:\.\w+)*)\s+import\s+([\w\s,()]+)|import\s+morphlib((?:\.\w+)+))", re.M)


def _norm(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def code_cells(notebook: Path) -> list[str]:
    """Normalised sources of the CODE cells of a jupytext percent .py notebook."""
    try:
        import jupytext
    except ImportError:
        raise MorphError("the stale check needs jupytext (pip install jupytext)") from None
    if not notebook.is_file():
        raise MorphError(f"notebook not found: {notebook}")
    nb = jupytext.read(notebook, fmt="py:percent")
    return [_norm(c.source) for c in nb.cells if c.cell_type == "code" and _norm(c.source)]


def _package_dir(root: Path) -> Path:
    src = root / "src" / "morphlib"
    if src.is_dir():
        return src
    import morphlib

    return Path(morphlib.__file__).parent


def _module_file(pkg: Path, dotted: str) -> Path | None:
    """'morphlib.x' -> <pkg>/x.py (or x/__init__.py); None when no such module file."""
    parts = dotted.split(".")[1:]
    if not parts:
        return None
    base = pkg.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _parse(text: str) -> ast.AST | None:
    # IPython magics and shell escapes are not Python: blank them out before parsing.
    cleaned = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in text.split("\n"))
    try:
        return ast.parse(cleaned)
    except SyntaxError:
        return None


def _imported_names(text: str, current: str | None, pkg: Path, is_pkg: bool = False) -> set[str]:
    """Dotted morphlib module names imported by ``text`` (current = dotted name of that module, if any)."""
    found: set[str] = set()

    def add_from(base: str, names: list[str]) -> None:
        if _module_file(pkg, base):
            found.add(base)
        for n in names:  # `from morphlib import x` where x is a module
            if n != "*" and _module_file(pkg, f"{base}.{n}"):
                found.add(f"{base}.{n}")

    tree = _parse(text)
    if tree is None:  # fall back to a regex over the raw text
        for m in _IMPORT_RE.finditer(text):
            if m.group(3):
                found.add("morphlib" + m.group(3))
            else:
                names = [n.strip().split(" as ")[0].strip() for n in m.group(2).strip("() \n").split(",")]
                add_from("morphlib" + (m.group(1) or ""), names)
        return {n for n in found if _module_file(pkg, n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "morphlib" or alias.name.startswith("morphlib."):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0 and node.module and (node.module == "morphlib" or node.module.startswith("morphlib.")):
                add_from(node.module, names)
            elif node.level > 0 and current:
                package = current.split(".") if is_pkg else current.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
                if base == "morphlib" or base.startswith("morphlib."):
                    add_from(base, names)
    return {n for n in found if _module_file(pkg, n)}


def dependencies(notebook: Path, root: Path) -> dict[str, Path]:
    """Hashed morphlib modules the notebook's code cells import, transitively: dotted name -> file."""
    pkg = _package_dir(root)
    todo = list(_imported_names("\n\n".join(code_cells(notebook)), None, pkg))
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[-1] in BOOK_ONLY:  # book-only: neither hashed nor followed
            continue
        path = _module_file(pkg, name)
        if path is None:
            continue
        seen[name] = path
        text = path.read_text(encoding="utf-8")
        todo.extend(_imported_names(text, name, pkg, path.name == "__init__.py") - seen.keys())
    return dict(sorted(seen.items()))


def _root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root).resolve()
    from morphlib.results import project_root

    return project_root()


def notebook_path(chapter: str, root: Path) -> Path:
    """The chapter's percent source: <root>/notebooks/NN_name.py, or in $MORPHBOOK_NOTEBOOKS when set."""
    from morphlib.book import chapter as chapter_info

    rel = Path(chapter_info(chapter).notebook)
    override = os.environ.get("MORPHBOOK_NOTEBOOKS")
    return Path(override) / rel.name if override else root / rel


def code_hash(chapter: str, root: str | Path | None = None) -> str | None:
    """sha256 hex of the chapter's code cells + transitively imported morphlib modules.

    None when the notebook source is not available (e.g. the package is installed without the book).
    """
    root = _root(root)
    notebook = notebook_path(chapter, root)
    if not notebook.is_file():
        return None
    try:
        cells = code_cells(notebook)
    except MorphError:
        return None
    h = hashlib.sha256()
    h.update(b"notebook\0")
    for cell in cells:
        h.update(cell.encode("utf-8") + b"\0cell\0")
    for name, path in dependencies(notebook, root).items():
        h.update(f"module\0{name}\0".encode())
        h.update(_norm(path.read_text(encoding="utf-8")).encode("utf-8") + b"\0")
    return h.hexdigest()


def is_stale(chapter: str, summary: dict, root: str | Path | None = None) -> bool:
    """True when the summary's code hash differs from the current code's (unknown hashes are not stale)."""
    recorded = (summary.get("provenance") or {}).get("code_hash")
    current = code_hash(chapter, root)
    return bool(recorded and current and recorded != current)


def check(results: str | Path = "results", root: str | Path | None = None) -> list[tuple[str, str, bool]]:
    """(chapter, message, failed) for every chapter."""
    from morphlib.book import CHAPTERS
    from morphlib.results import changed_files, load_summary

    root = _root(root)
    rows = []
    for ch in CHAPTERS:
        summary = load_summary(ch.name, results)
        if summary is None:
            rows.append((ch.name, "missing (no committed results)", False))
            continue
        prov = summary.get("provenance") or {}
        recorded, current = prov.get("code_hash"), code_hash(ch.name, root)
        commit = ((prov.get("git") or {}).get("commit") or "unknown")[:7]
        if current is None:
            rows.append((ch.name, f"STALE (notebook {ch.notebook} not found; results made at {commit})", True))
        elif recorded != current:
            rows.append((ch.name, f"STALE (code changed since results were made: {commit})", True))
        elif changed := changed_files(ch.name, summary, results):
            rows.append((ch.name, f"MODIFIED (differs from the run's manifest: {', '.join(changed)})", True))
        else:
            rows.append((ch.name, "ok", False))
    return rows


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphlib.stale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="results root to check (default: results)")
    ap.add_argument("--root", default=None, help="repository root (default: this checkout)")
    ap.add_argument("--explain", action="store_true", help="also list the files each chapter's hash covers")
    args = ap.parse_args(argv)
    rows = check(args.results, args.root)
    width = max(len(r[0]) for r in rows)
    for name, message, _ in rows:
        print(f"{name:<{width}}  {message}")
        if args.explain:
            nb = notebook_path(name, _root(args.root))
            if nb.is_file():
                for dotted in dependencies(nb, _root(args.root)):
                    print(f"{'':<{width}}    + {dotted}")
    return 1 if any(failed for *_, failed in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
