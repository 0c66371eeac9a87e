"""A chapter's code hash: its experiment module plus every library module it imports, transitively.

The closure starts at the chapter's experiment module (``morphbook.chapters``) and follows every
``import`` / ``from ... import`` statement — at module level or inside functions — that names a
module of ``morphlib`` or of ``morphbook.experiments`` (the publishing side, the notebooks and other
chapters' modules are never part of it, unless the experiment imports them). Each module's source
is normalised before hashing: docstrings, comment-only lines, blank lines and trailing spaces are
dropped, so prose edits never stale results while any code change does. The normalisation reads
line spans only, so the hash is the same under every Python version.

``python -m morphbook.publish.codehash CHAPTER`` lists the modules a chapter's hash covers.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

from morphbook.chapters import NAMES, chapter
from morphlib.errors import MorphError, one_line_errors

FOLLOWED = ("morphlib", "morphbook.experiments")


def source_root() -> Path:
    """The folder holding the ``morphlib`` and ``morphbook`` packages (``src/`` in a checkout;
    ``$MORPHBOOK_SRC`` points elsewhere, e.g. a test's copy)."""
    return Path(os.environ.get("MORPHBOOK_SRC") or Path(__file__).resolve().parents[2])


def module_file(dotted: str) -> Path | None:
    """The source file of a dotted module name under the source root (a package's __init__.py), or None."""
    base = source_root().joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _followed(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FOLLOWED)


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise MorphError(f"cannot hash {path}: syntax error at line {exc.lineno}") from None


def imported_modules(dotted: str, path: Path) -> set[str]:
    """Dotted names of the followed modules that ``path`` (module ``dotted``) imports, anywhere in it."""
    is_pkg = path.name == "__init__.py"
    package = dotted if is_pkg else dotted.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if _followed(name) and module_file(name) is not None:
                out.add(name)
                # importing a.b.c runs a/__init__ and a/b/__init__ too
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts)) if _followed(".".join(parts[:i])))
    return out


def closure(module: str) -> dict[str, Path]:
    """{dotted name: file} of ``module`` and every followed module it imports, transitively."""
    if module_file(module) is None:
        raise MorphError(f"experiment module {module} not found under {source_root()}")
    parts = module.split(".")
    todo = [module] + [".".join(parts[:i]) for i in range(1, len(parts)) if _followed(".".join(parts[:i]))]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        seen[name] = path
        todo.extend(imported_modules(name, path) - seen.keys())
    return dict(sorted(seen.items()))


@lru_cache(maxsize=256)
def _normalised(path: Path, mtime_ns: int) -> str:
    text = path.read_text(encoding="utf-8")
    lines = text.replace("\r\n", "\n").split("\n")
    drop: set[int] = set()
    for node in ast.walk(_parse(path)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno - 1, first.end_lineno))
    kept = [line.rstrip() for i, line in enumerate(lines) if i not in drop]
    return "\n".join(line for line in kept if line.strip() and not line.lstrip().startswith("#"))


def normalised_source(path: Path) -> str:
    return _normalised(path, path.stat().st_mtime_ns)


def code_hash(chapter_name: str) -> str:
    """sha256 hex over the chapter's experiment module and its closure (see the module doc)."""
    h = hashlib.sha256()
    for name, path in closure(chapter(chapter_name).experiment).items():
        h.update(f"module\0{name}\0".encode())
        h.update(normalised_source(path).encode("utf-8") + b"\0")
    return h.hexdigest()


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m morphbook.publish.codehash",
                                 description="List the modules a chapter's code hash covers, and the hash.")
    ap.add_argument("chapters", nargs="*", default=list(NAMES), help=f"chapter names (default: all: {', '.join(NAMES)})")
    args = ap.parse_args(argv)
    for name in args.chapters:
        mods = closure(chapter(name).experiment)
        print(f"{name}: {code_hash(name)[:16]}  ({len(mods)} modules)")
        for dotted, path in mods.items():
            print(f"    {dotted:<40} {len(normalised_source(path).splitlines()):>5} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
