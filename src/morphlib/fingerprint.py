"""Which project code ran, function by function, and whether it is still the code on disk.

    with fingerprint.recording() as rec:
        value = produce(...)
    fp = rec.fingerprint()      # {"morphlib/quant/int4.py::quantize_groupwise": "3f1c0e...", ...}
    fingerprint.changed(fp)     # [] while the files still hold that code

Project code = the files of the followed packages (``FOLLOWED``: ``morphlib`` and
``morphbook.experiments``) under the source root (``src/``, or ``$MORPHBOOK_SRC``). A recording notes
every code object of project code that *executes* inside it, once: on Python >= 3.12 through
``sys.monitoring`` (each code object's ``PY_START`` event is disabled after its first firing), on
older Pythons through ``sys.setprofile`` (and ``threading.setprofile`` for threads started inside).
Recordings nest: code run inside an inner one counts in every enclosing one.

A fingerprint holds two kinds of entries, each the sha256 (16 hex digits) of normalised source lines
(docstrings, comment-only and blank lines dropped, trailing spaces stripped; line spans only, so every
Python version gives the same hash):

* a **unit** that ran: a top-level function, or a method of a class (nested classes too), with its
  decorators, named ``morphlib/engine/llm.py::LLM.step``. Nested functions, lambdas and comprehensions
  belong to the unit that holds them;
* the **skeleton** of every project module that was loaded, ``morphlib/quant/kernels.py::<module>``:
  the module without its plain (undecorated) functions and methods, i.e. imports, module-level
  statements and constants, classes with their fields and defaults, and every decorated def in full
  (a Triton kernel never executes as a Python code object; a registered strategy must stay covered).

The hashes are taken from each file as it was when the recording first met it, so
``changed(rec.fingerprint())`` at the end names the files edited during the run, and
``rec.loaded_mismatches()`` names units whose running code is older than their file (a notebook kernel
that imported a module before it was edited).

Contract for a cache of computed values::

    with fingerprint.recording() as rec:
        value = produce(...)
    meta = {"producer": rec.fingerprint(), "transformers": transformers.__version__}
    # a hit only if not fingerprint.changed(meta["producer"]) and the version matches; then
    fingerprint.merge_into_current(meta["producer"])

Standard library only, and nothing from the project: every module may import it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import CodeType

FOLLOWED = ("morphlib", "morphbook.experiments")
MODULE = "<module>"
HOOKS = ("monitoring", "setprofile")
_TOOL_NAME = "morphlib.fingerprint"
_CO_OPTIMIZED = 0x1  # functions, lambdas, comprehensions; not module or class bodies


def source_root() -> Path:
    """The folder holding the project's packages: ``$MORPHBOOK_SRC``, else the ``src/`` this file is in."""
    return _resolved(os.environ.get("MORPHBOOK_SRC") or str(Path(__file__).parents[1]))


@lru_cache(maxsize=8)
def _resolved(path: str) -> Path:
    return Path(path).resolve()


def default_hook() -> str:
    """``"monitoring"`` where ``sys.monitoring`` exists (Python >= 3.12), else ``"setprofile"``."""
    return "monitoring" if hasattr(sys, "monitoring") else "setprofile"


# --------------------------------------------------------------------------- normalised source
def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _docstring_lines(tree: ast.AST) -> set[int]:
    """0-based line numbers of every docstring (module, classes, functions)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.update(range(first.lineno - 1, first.end_lineno))
    return out


def _digest(lines: list[str], keep) -> str:
    kept = (line.rstrip() for i, line in enumerate(lines) if keep(i))
    text = "\n".join(line for line in kept if line.strip() and not line.lstrip().startswith("#"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _defs(body: list[ast.stmt], prefix: str = ""):
    """(qualified name, def node) of every def reachable without entering a function body: top-level
    functions, methods of classes and nested classes, defs inside module-level if/try/with blocks."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _defs(node.body, f"{prefix}{node.name}.")
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, None) or ():
                    yield from _defs(child.body if isinstance(child, (ast.excepthandler, ast.match_case)) else [child],
                                     prefix)


@dataclass(frozen=True)
class _Table:
    """The hashes of one source text: {qualified name: hash} of its units and its skeleton's."""

    units: dict[str, str]
    skeleton: str
    spans: tuple[tuple[int, int, str], ...]  # (first line, last line, name) of each def, 1-based

    def unit_of(self, code: CodeType) -> str:
        """The unit an executed code object belongs to; MODULE for module and class bodies and for
        lambdas or comprehensions outside any def."""
        qualname = getattr(code, "co_qualname", None)
        if qualname is not None:
            top = qualname.split(".<locals>", 1)[0]
            return top if top in self.units else MODULE
        inside = [s for s in self.spans if s[0] <= code.co_firstlineno <= s[1]]  # Python 3.10: by line
        return max(inside)[2] if inside else MODULE

    def hash_of(self, unit: str) -> str | None:
        return self.skeleton if unit == MODULE else self.units.get(unit)


@lru_cache(maxsize=512)
def _plain_def_lines(tree: ast.Module) -> set[int]:
    """The 0-based lines of undecorated defs: not part of the module's skeleton."""
    return {i for _, node in _defs(tree.body) if not node.decorator_list for i in range(node.lineno - 1, node.end_lineno)}


def _table(text: str) -> _Table | None:
    """The unit and skeleton hashes of a source text (None when it does not parse)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    lines = _lines(text)
    docs = _docstring_lines(tree)
    spans: dict[str, list[tuple[int, int]]] = {}
    for name, node in _defs(tree.body):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        spans.setdefault(name, []).append((first, node.end_lineno))
    plain = _plain_def_lines(tree)
    units = {}
    for name, ranges in spans.items():  # a name defined twice (if/else) hashes both defs
        wanted = {i for a, b in ranges for i in range(a - 1, b)} - docs
        units[name] = _digest(lines, wanted.__contains__)
    skeleton = _digest(lines, lambda i: i not in plain and i not in docs)
    flat = tuple(sorted((a, b, name) for name, ranges in spans.items() for a, b in ranges))
    return _Table(units, skeleton, flat)


PROFILE_DEFAULTS = "DEFAULTS"  # a module-level {profile: {field: value}} dict (the experiments' configs)


def _profile_entry_lines(tree: ast.Module) -> dict[str, set[int]] | None:
    """{profile: the 0-based lines of its entry} in the module's ``DEFAULTS = {"<profile>": ..., ...}``
    assignment; {} when there is none; None when an entry shares a line with anything else (then the
    entries cannot be told apart line by line)."""
    found: dict[str, set[int]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == PROFILE_DEFAULTS and isinstance(node.value, ast.Dict)):
            continue
        d = node.value
        spans = []
        for key, value in zip(d.keys, d.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                return None
            spans.append((key.value, key.lineno, value.end_lineno))
        owner: dict[int, str] = {}
        for name, a, b in spans:
            for i in range(a, b + 1):
                if i in owner:
                    return None
                owner[i] = name
        if owner and (min(owner) <= node.lineno or max(owner) >= node.end_lineno):
            return None  # "DEFAULTS = {" or the closing brace on an entry's line
        for name, a, b in spans:
            found.setdefault(name, set()).update(range(a - 1, b))
    return found


def skeleton_for_profile(text: str, profile: str) -> str | None:
    """The skeleton hash of a source text without the ``DEFAULTS`` entries of profiles other than
    ``profile``: what a result made with ``profile`` depends on. None when the text does not parse or its
    entries cannot be told apart by line."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    entries = _profile_entry_lines(tree)
    if entries is None:
        return None
    left_out = _plain_def_lines(tree) | _docstring_lines(tree)
    left_out |= set().union(*(ls for name, ls in entries.items() if name != profile)) if entries else set()
    return _digest(_lines(text), lambda i: i not in left_out)


def skeleton(text: str) -> str | None:
    """The skeleton hash of a source text (as a fingerprint's ``<module>`` entry); None when it does not parse."""
    table = _table(text)
    return table.skeleton if table is not None else None


def only_other_profiles_changed(rel: str, old_text: str, profile: str) -> bool:
    """True when file ``rel`` on disk now and ``old_text`` (the same file at an earlier commit) differ in their
    skeletons only by the ``DEFAULTS`` entries of profiles other than ``profile``."""
    now = _read(source_root() / rel)
    if now is None:
        return False
    before, after = skeleton_for_profile(old_text, profile), skeleton_for_profile(now, profile)
    return before is not None and before == after


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _split(name: str) -> tuple[str, str]:
    rel, sep, unit = name.partition("::")
    if not sep or not rel or not unit:
        raise ValueError(f"not a unit name: {name!r} (expected 'path/to/module.py::name')")
    return rel, unit


def unit_hash(name: str) -> str | None:
    """The hash of unit ``name`` (``"morphlib/quant/int4.py::quantize_groupwise"`` or ``"...::<module>"``)
    in the file on disk now; None when the file or the unit no longer exists."""
    return _disk_hashes([name])[name]


def _disk_hashes(names) -> dict[str, str | None]:
    """{name: hash on disk now, or None}; each file read once."""
    tables: dict[str, _Table | None] = {}
    out = {}
    for name in names:
        rel, unit = _split(name)
        if rel not in tables:
            text = _read(source_root() / rel)
            tables[rel] = _table(text) if text is not None else None
        out[name] = tables[rel].hash_of(unit) if tables[rel] is not None else None
    return out


def changed(fingerprint: dict[str, str]) -> list[str]:
    """Names of ``fingerprint`` whose unit differs on disk now, or is gone (sorted)."""
    now = _disk_hashes(fingerprint)
    return sorted(name for name, digest in fingerprint.items() if now[name] != digest)


# --------------------------------------------------------------------------- code objects vs disk
def _consts(code: CodeType) -> tuple:
    consts = code.co_consts
    # a function's first constant is its docstring (or None): prose, not code
    if code.co_flags & _CO_OPTIMIZED and not code.co_name.startswith("<") and consts and (
            consts[0] is None or isinstance(consts[0], str)):
        consts = consts[1:]
    return consts


def same_code(a: CodeType, b: CodeType) -> bool:
    """Same bytecode, names and constants (code constants compared the same way), whatever the line
    numbers and file names."""
    if (a.co_code, a.co_names, a.co_varnames, a.co_freevars, a.co_cellvars) != (
            b.co_code, b.co_names, b.co_varnames, b.co_freevars, b.co_cellvars):
        return False
    ca, cb = _consts(a), _consts(b)
    if len(ca) != len(cb):
        return False
    for x, y in zip(ca, cb):
        if isinstance(x, CodeType) or isinstance(y, CodeType):
            if not (isinstance(x, CodeType) and isinstance(y, CodeType) and same_code(x, y)):
                return False
        elif type(x) is not type(y) or repr(x) != repr(y):
            return False
    return True


def _all_codes(code: CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _all_codes(const)


@lru_cache(maxsize=128)
def _compiled(text: str, filename: str) -> dict[str, list[CodeType]] | None:
    """{qualified name (co_qualname, or co_name before 3.11): code objects} of a source text."""
    try:
        module = compile(text, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    out: dict[str, list[CodeType]] = {}
    for code in _all_codes(module):
        out.setdefault(getattr(code, "co_qualname", code.co_name), []).append(code)
    return out


# --------------------------------------------------------------------------- recordings
_WHERE: dict[tuple, dict[str, str | None]] = {}
_SELF = os.path.realpath(__file__)


class Recording:
    """What one ``recording()`` saw: the project code objects that executed and the source of each
    project file when first met (see the module doc)."""

    def __init__(self, followed: tuple[str, ...] = FOLLOWED):
        if isinstance(followed, str) or not followed or not all(isinstance(f, str) and f for f in followed):
            raise ValueError(f"followed must be a tuple of package names, got {followed!r}")
        self.followed = tuple(followed)
        self.root = source_root()
        self._prefixes = tuple(f.replace(".", "/") + "/" for f in self.followed)
        self._where = _WHERE.setdefault((self.root, self._prefixes), {})  # co_filename -> relative path or None
        self._codes: dict[str, dict[CodeType, None]] = {}  # relative path -> code objects that executed, in order
        self._texts: dict[str, str | None] = {}  # relative path -> source when first met
        self._merged: dict[str, str] = {}
        self._snapshot_loaded()

    def _relative(self, filename: str | None) -> str | None:
        if not filename:
            return None
        if filename in self._where:
            return self._where[filename]
        rel = None
        real = os.path.realpath(filename)
        try:
            rel = Path(real).relative_to(self.root).as_posix() if real != _SELF else None  # not this module
        except ValueError:
            pass
        if rel is not None and not (rel.endswith(".py") and rel.startswith(self._prefixes)):
            rel = None
        self._where[filename] = rel
        return rel

    def _snapshot(self, rel: str) -> None:
        if rel not in self._texts:
            self._texts[rel] = _read(self.root / rel)

    def _loaded(self) -> list[str]:
        """Project files of the modules in ``sys.modules`` now."""
        files = (getattr(m, "__file__", None) for m in list(sys.modules.values()))
        return [rel for rel in map(self._relative, files) if rel is not None]

    def _snapshot_loaded(self) -> None:
        for rel in self._loaded():
            self._snapshot(rel)

    def _see(self, code: CodeType) -> None:
        rel = self._relative(code.co_filename)
        if rel is not None:
            self._snapshot(rel)
            self._codes.setdefault(rel, {})[code] = None

    def merge(self, units: dict[str, str]) -> None:
        """Add units recorded elsewhere (a cache hit brings in the code that made the cache)."""
        if not isinstance(units, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in units.items()):
            raise ValueError("merge() takes a fingerprint: a dict of unit name -> hash")
        for name in units:
            _split(name)
        self._merged.update(units)

    def fingerprint(self) -> dict[str, str]:
        """{unit name: hash} of the units that ran, the skeletons of the project modules loaded now (or
        that ran), and the merged units; sorted by name. Hashes are of the files as first met."""
        self._snapshot_loaded()
        out: dict[str, str] = {}
        for rel in sorted(set(self._texts)):
            text = self._texts[rel]
            table = _table(text) if text is not None else None
            if table is None:
                out[f"{rel}::{MODULE}"] = "unreadable"
                continue
            out[f"{rel}::{MODULE}"] = table.skeleton
            for code in self._codes.get(rel, ()):
                unit = table.unit_of(code)
                out[f"{rel}::{unit}"] = table.hash_of(unit)
        return dict(sorted({**out, **self._merged}.items()))

    def units_run(self) -> list[str]:
        """Names of the units (not skeletons) whose code executed, sorted."""
        return sorted(name for name in self.fingerprint() if not name.endswith(f"::{MODULE}"))

    def loaded_mismatches(self) -> list[str]:
        """What the process holds that is older than the files on disk (a module imported before its
        file was edited), sorted: units whose executed code objects differ from what their file
        compiles to now (a gone file counts too), and, in every loaded project module, decorated
        top-level defs and upper-case literal constants whose live value differs from the file's."""
        out = set()
        for rel, codes in self._codes.items():
            text = _read(self.root / rel)
            disk = _compiled(text, str(self.root / rel)) if text is not None else None
            table = _table(text) if text is not None else None
            for code in codes:
                if not code.co_flags & _CO_OPTIMIZED:
                    continue  # module and class bodies: checked through the module's values below
                key = getattr(code, "co_qualname", code.co_name)
                if disk is None or not any(same_code(code, other) for other in disk.get(key, ())):
                    qualname = key.split(".<locals>", 1)[0]
                    out.add(f"{rel}::{qualname if table is None or qualname in table.units else MODULE}")
        for module in list(sys.modules.values()):
            rel = self._relative(getattr(module, "__file__", None))
            if rel is not None:
                out.update(f"{rel}::{name}" for name in _stale_values(module, self.root / rel))
        return sorted(out)


_CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")
_LITERAL_TYPES = (int, float, complex, str, bytes, bool, tuple, frozenset)


def _stale_values(module, path: Path) -> list[str]:
    """Names of ``module``'s decorated top-level defs and upper-case literal constants whose live value
    differs from what ``path`` holds now (all of them when the file is gone or does not parse)."""
    text = _read(path)
    try:
        tree = ast.parse(text) if text is not None else None
    except SyntaxError:
        tree = None
    if tree is None:
        return [MODULE]
    disk = _compiled(text, str(path)) or {}
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.decorator_list:
            live = getattr(module, node.name, None)
            for _ in range(8):  # functools.wraps chains, Triton's JITFunction.fn
                inner = getattr(live, "__wrapped__", None) or getattr(live, "fn", None)
                if inner is None or inner is live:
                    break
                live = inner
            code = getattr(live, "__code__", None)
            if isinstance(code, CodeType) and os.path.realpath(code.co_filename) == os.path.realpath(path):
                if not any(same_code(code, other) for other in disk.get(node.name, ())):
                    out.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) != 1 or not isinstance(targets[0], ast.Name) or not _CONSTANT.fullmatch(targets[0].id):
                continue
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            live = getattr(module, targets[0].id, None)
            if isinstance(value, _LITERAL_TYPES) and isinstance(live, _LITERAL_TYPES) and (
                    type(live) is not type(value) or repr(live) != repr(value)):
                out.append(f"{MODULE} ({targets[0].id})")
    return out


_active: list[Recording] = []
_seen: set[CodeType] = set()  # code objects met since the last recording started (project or not)
_installed: dict = {}  # the hook in place: {"hook", "tool" or "previous"}
_lock = threading.RLock()


def _first_sight(code: CodeType) -> None:
    _seen.add(code)
    for rec in list(_active):
        rec._see(code)


def _on_profile(frame, event, arg):  # the setprofile hook: "call" events only, a set lookup first
    if event == "call":
        code = frame.f_code
        if code not in _seen:
            _first_sight(code)


def _on_start(code, offset):  # the sys.monitoring PY_START callback
    if code not in _seen:
        _first_sight(code)
    return sys.monitoring.DISABLE


def _install(hook: str) -> None:
    if hook == "monitoring":
        mon = sys.monitoring
        free = [i for i in (4, 3, 2, 1, 0) if mon.get_tool(i) is None]
        if not free:
            raise RuntimeError("no free sys.monitoring tool id for the fingerprint recording")
        mon.use_tool_id(free[0], _TOOL_NAME)
        mon.register_callback(free[0], mon.events.PY_START, _on_start)
        mon.set_events(free[0], mon.events.PY_START)
        mon.restart_events()
        _installed.update(hook=hook, tool=free[0])
    else:
        _installed.update(hook=hook, previous=(sys.getprofile(), threading.getprofile()))
        sys.setprofile(_on_profile)
        threading.setprofile(_on_profile)


def _uninstall() -> None:
    if _installed.get("hook") == "monitoring":
        mon = sys.monitoring
        mon.set_events(_installed["tool"], 0)
        mon.register_callback(_installed["tool"], mon.events.PY_START, None)
        mon.free_tool_id(_installed["tool"])
    elif _installed.get("hook") == "setprofile":
        previous, previous_threads = _installed["previous"]
        sys.setprofile(previous)
        threading.setprofile(previous_threads)
    _installed.clear()


@contextlib.contextmanager
def recording(followed: tuple[str, ...] = FOLLOWED, hook: str | None = None):
    """Record the project code that executes inside the block; yields the :class:`Recording`, which
    stays readable afterwards. ``hook``: ``"monitoring"`` (Python >= 3.12) or ``"setprofile"``; default
    :func:`default_hook`. Nested recordings share the outer one's hook."""
    hook = hook or default_hook()
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}: use one of {', '.join(HOOKS)}")
    if hook == "monitoring" and not hasattr(sys, "monitoring"):
        raise RuntimeError(f"the monitoring hook needs Python >= 3.12 (this is {sys.version.split()[0]})")
    rec = Recording(followed)
    with _lock:
        if _active and _installed.get("hook") != hook:
            raise RuntimeError(f"a {_installed.get('hook')} recording is active: a nested one cannot use {hook}")
        _seen.clear()  # code met by an earlier recording must be met again by this one
        _active.append(rec)
        if len(_active) == 1:
            _install(hook)
        elif hook == "monitoring":
            sys.monitoring.restart_events()
    try:
        yield rec
    finally:
        with _lock:
            _active.remove(rec)
            if not _active:
                _uninstall()


def current() -> Recording | None:
    """The innermost active recording, or None."""
    return _active[-1] if _active else None


def merge_into_current(units: dict[str, str]) -> None:
    """Merge ``units`` (a cache's producer fingerprint) into every active recording; none active: no-op."""
    for rec in list(_active):
        rec.merge(units)
