"""Imports point one way: morphlib never imports morphbook; neither package has an import cycle; the library's
packages and top-level modules import only those below them in ``PACKAGE_ORDER``."""

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


# Bottom to top. Each unit (a top-level module, or a subpackage with all its modules) may import only units
# before it, at module level or inside a function:
# * errors, device, runtime, shapes, cards, workloads: plain checks, devices, determinism, architecture,
#   the GPU card table and serving arithmetic (workloads: traces and KV-cache sizes, nothing about models);
# * fingerprint (standard library only), producer (caches keyed by the code that made them);
# * assets (fetching files), convert (GGUF -> HF folders, a cached product);
# * quant: INT4 storage and kernels, no model; structure: a loaded model's layers, linears and head;
# * eval: corpus windows, metrics and the one greedy decode (through structure); sanity: the load-time
#   gate, measured with eval; models: loading, which runs the gate;
# * awq (needs a model's layers), morph (quantizes with awq, caches its scales), select (scores morphs);
# * engine (loads models, runs quant's kernels), bench (times quant's kernels and the engine),
#   vllm_morph (an external engine), cli and __main__ at the top.
PACKAGE_ORDER = ("errors", "device", "runtime", "shapes", "cards", "workloads", "fingerprint", "producer", "assets",
                 "convert", "quant", "structure", "eval", "sanity", "models", "awq", "morph", "select", "engine",
                 "bench", "vllm_morph", "cli", "__main__")


def _unit(module: str) -> str | None:
    """``morphlib.quant.int4`` -> ``quant``; the package ``morphlib`` itself (imports nothing) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def order_violations(graph: dict[str, set[str]], order: tuple[str, ...]) -> list[str]:
    """Imports (module level or deferred) from a unit to one above it in ``order``, and units missing from
    ``order``, as lines to read."""
    rank = {u: i for i, u in enumerate(order)}
    out = []
    for mod, deps in sorted(graph.items()):
        unit = _unit(mod)
        if unit is not None and unit not in rank:
            out.append(f"{mod}: unit {unit!r} is not in the package order")
            continue
        for dep in sorted(deps):
            dep_unit = _unit(dep)
            if unit is None or dep_unit is None or dep_unit == unit:
                continue
            if dep_unit not in rank or rank[dep_unit] > rank[unit]:
                out.append(f"{mod} ({unit}) imports {dep} ({dep_unit}), which is above it")
    return out


def test_library_packages_import_only_those_below_them():
    assert order_violations(_graph("morphlib"), PACKAGE_ORDER) == []


def test_package_order_check_finds_an_upward_import():
    graph = {"morphlib.quant.int4": {"morphlib.structure"}, "morphlib.structure": {"morphlib.quant.int4"},
             "morphlib.quant": set(), "morphlib.new_thing": set()}
    assert order_violations(graph, ("quant", "structure")) == [
        "morphlib.new_thing: unit 'new_thing' is not in the package order",
        "morphlib.quant.int4 (quant) imports morphlib.structure (structure), which is above it"]


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
