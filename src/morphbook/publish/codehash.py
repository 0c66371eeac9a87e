"""What a saved result's fingerprint covers, and what of it changed since.

Every summary records the fingerprint of the code that made it (``morphlib.fingerprint``): one hash
per function or method that ran, and one per loaded module's skeleton (imports, constants, classes,
decorated defs). ``python -m morphbook.publish.codehash CHAPTER [--results results]`` lists a result's
units, module by module, with their state now: ``ok``, ``changed`` or ``gone``, and the counts
("412 units, 37 modules; 3 changed").

``imported_modules`` and ``module_file`` read a module's imports statically (the layout tests use them).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from morphbook.chapters import NAMES
from morphbook.publish.store import load_summary
from morphlib import fingerprint
from morphlib.errors import MorphError, one_line_errors

FOLLOWED = fingerprint.FOLLOWED


def unit_states(fp: dict[str, str]) -> dict[str, str]:
    """{unit name: "ok" | "changed" | "gone"} for a fingerprint, against the files now (sorted by name)."""
    moved = set(fingerprint.changed(fp))
    return {name: ("ok" if name not in moved else "gone" if fingerprint.unit_hash(name) is None else "changed")
            for name in sorted(fp)}


def module_file(dotted: str) -> Path | None:
    """The source file of a dotted module name under the source root (a package's __init__.py), or None."""
    base = fingerprint.source_root().joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _followed(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FOLLOWED)


def imported_modules(dotted: str, path: Path) -> set[str]:
    """Dotted names of the followed modules that ``path`` (module ``dotted``) imports, anywhere in it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise MorphError(f"cannot read {path}: syntax error at line {exc.lineno}") from None
    package = dotted if path.name == "__init__.py" else dotted.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in found:
            if _followed(name) and module_file(name) is not None:
                out.add(name)
                # importing a.b.c runs a/__init__ and a/b/__init__ too
                parts = name.split(".")
                out.update(".".join(parts[:i]) for i in range(1, len(parts)) if _followed(".".join(parts[:i])))
    return out


def report(chapter_name: str, results_root: str = "results") -> list[str]:
    """The lines ``main`` prints for one saved result."""
    summary = load_summary(chapter_name, results_root)
    if summary is None:
        return [f"{chapter_name}: no results in {results_root}"]
    fp = (summary.get("provenance") or {}).get("fingerprint")
    if not fp:
        return [f"{chapter_name}: made before per-function fingerprints (code hash "
                f"{(summary.get('provenance') or {}).get('code_hash', '?')[:16]}): re-run it"]
    states = unit_states(fp)
    by_module: dict[str, list[tuple[str, str]]] = {}
    for name, state in states.items():
        module, _, unit = name.partition("::")
        by_module.setdefault(module, []).append((unit, state))
    units = sum(1 for n in states if not n.endswith(f"::{fingerprint.MODULE}"))
    bad = {s: sum(1 for v in states.values() if v == s) for s in ("changed", "gone")}
    tail = "; ".join(f"{n} {s}" for s, n in bad.items() if n) or "all ok"
    lines = [f"{chapter_name}: {units} units, {len(by_module)} modules; {tail}"]
    for module, rows in by_module.items():
        lines.append(f"    {module}")
        lines += [f"        {state:<8} {unit}" for unit, state in rows]
    return lines


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m morphbook.publish.codehash",
                                 description="List the units a saved result's fingerprint covers, and their state now.")
    ap.add_argument("chapters", nargs="*", default=list(NAMES), help=f"chapter names (default: all: {', '.join(NAMES)})")
    ap.add_argument("--results", default="results", help="results root (default: results)")
    args = ap.parse_args(argv)
    for name in args.chapters:
        print("\n".join(report(name, args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
