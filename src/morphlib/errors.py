"""One error type for bad input, printed as one line by the CLI and by notebooks."""

from __future__ import annotations

import functools
import sys


class MorphError(RuntimeError):
    """A user-facing error: bad model name, group size, layer index, text, trace, device..."""


def check_int(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """``value`` as an int if it is an integer (numpy integers too, never a bool) in [lo, hi], else a
    one-line MorphError naming ``name``. The library's one integer check."""
    ok = not isinstance(value, bool) and hasattr(value, "__index__")
    if ok:
        value = int(value.__index__())
        ok = value >= lo and (hi is None or value <= hi)
    if not ok:
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise MorphError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def one_line_errors(fn):
    """Decorator for command-line entry points: a MorphError exits with one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MorphError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def install_notebook_handler() -> None:
    """In IPython/Jupyter, show a MorphError as one line instead of a traceback (the cell still fails)."""
    try:
        ip = get_ipython()  # type: ignore[name-defined]  # noqa: F821
    except NameError:
        return

    def _handler(shell, etype, evalue, tb, tb_offset=None):
        print(f"error: {evalue}", file=sys.stderr)
        return None

    ip.set_custom_exc((MorphError,), _handler)
