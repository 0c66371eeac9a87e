"""Imports point one way: morphlib never imports morphbook; neither package has an import cycle."""

from __future__ import annotations

from pathlib import Path

from morphbook.publish.codehash import imported_modules, module_file

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / package).rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _graph(package: str, deferred: bool = True) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports (``deferred``: imports inside functions too)."""
    import ast

    mods = _modules(package)
    graph = {}
    for name, path in mods.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for node in (ast.walk(tree) if deferred else tree.body):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                # `from pkg import submodule` depends on the submodule; any other name, on pkg itself
                deps |= (subs & mods.keys()) | ({node.module} if subs - mods.keys() else set())
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_morphlib_never_imports_morphbook():
    offenders = []
    for name, path in _modules("morphlib").items():
        text = path.read_text()
        if "import morphbook" in text or "from morphbook" in text:
            offenders.append(name)
    assert offenders == []


def test_no_import_cycles():
    for package in ("morphlib", "morphbook"):
        at_import = _graph(package, deferred=False)
        assert _cycle(at_import) is None, f"{package}: import-time cycle {_cycle(at_import)}"
        full = _graph(package)
        assert _cycle(full) is None, f"{package}: cycle through a deferred import {_cycle(full)}"


def test_experiments_never_import_the_publishing_side():
    for name, deps in _graph("morphbook").items():
        if name.startswith("morphbook.experiments"):
            assert not any(d.startswith("morphbook.publish") for d in deps), name


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert module_file("morphlib.select.strategies") is not None and imported_modules
