"""Numbers as a reader reads them: fixed decimals, units, intervals, p-values. Prose, tables and
the findings all format through these, so one figure reads the same everywhere it appears.

``None`` (a value a result does not hold) is written ``n/a``; a negative number takes a true minus
sign; an interval whose ends may be negative is written "a to b", otherwise "a–b".
"""

from __future__ import annotations

import math

MINUS = "\u2212"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def num(value, digits: int = 2, signed: bool = False) -> str:
    """``digits`` decimals, thousands separated: num(13440.0, 0) == '13,440'; signed: '+0.26'."""
    if _missing(value):
        return "n/a"
    if round(value, digits) == 0:
        value = 0.0  # no "−0.00"
    text = f"{value:{'+' if signed else ''},.{digits}f}"
    return text.replace("-", MINUS)


def auto(value, signed: bool = False) -> str:
    """Decimals by magnitude, about three significant digits: 34.09 -> '34.1', 4.402 -> '4.40', 0.0081 -> '0.0081'."""
    if _missing(value):
        return "n/a"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 0.1 or size == 0 else \
        min(6, 1 - math.floor(math.log10(size)))
    return num(value, digits, signed)


def pct(value, digits: int = 1, signed: bool = False) -> str:
    """A value already in percent: pct(2.37, signed=True) == '+2.4 %'."""
    return "n/a" if _missing(value) else f"{num(value, digits, signed)}\u00a0%"  # no line break before the sign


def frac_pct(value, digits: int = 1) -> str:
    """A fraction as a percentage: frac_pct(0.59375) == '59.4 %'."""
    return "n/a" if _missing(value) else pct(100 * value, digits)


def interval(lo, hi, digits: int = 2) -> str:
    """'0.44–0.57'; '−0.07 to 0.60' when an end is negative (a dash would read as a minus)."""
    if _missing(lo) or _missing(hi):
        return "n/a"
    sep = " to " if min(lo, hi) < 0 else "\u2013"
    return f"{num(lo, digits)}{sep}{num(hi, digits)}"


def frac_interval(lo, hi, digits: int = 0) -> str:
    """Two fractions as a percentage interval: frac_interval(0.44, 0.57) == '44–57 %'."""
    if _missing(lo) or _missing(hi):
        return "n/a"
    return f"{interval(100 * lo, 100 * hi, digits)}\u00a0%"


def pval(p) -> str:
    """'p = 0.008', 'p = 0.033', 'p = 0.9', 'p < 0.001'."""
    if _missing(p):
        return "p = n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.1g}" if p < 0.01 else f"p = {p:.2g}"


def ms(value) -> str:
    return "n/a" if _missing(value) else f"{auto(value)} ms"


def times(value, digits: int = 2) -> str:
    """A ratio: times(1.093) == '1.09×'."""
    return "n/a" if _missing(value) else f"{num(value, digits)}\u00d7"


def listing(items) -> str:
    """'2', '2 and 4', '2, 4 and 12'."""
    items = [str(i) for i in items]
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 swap count', '3 swap counts'."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
