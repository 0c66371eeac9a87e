"""Layer sets as plain index arithmetic: blocks, spreads and runs of adjacent layers."""

from __future__ import annotations

from morphlib.errors import MorphError


def _check(num_layers: int, k: int) -> None:
    if not 1 <= k <= num_layers:
        raise MorphError(f"cannot pick {k} of {num_layers} layers")


def middle_block(num_layers: int, k: int) -> list[int]:
    """The contiguous block of ``k`` layers centred in the model."""
    _check(num_layers, k)
    start = (num_layers - k) // 2
    return list(range(start, start + k))


def middle_third(num_layers: int) -> tuple[int, int]:
    """``(first, end)`` of the middle third of the depth: ``num_layers // 3`` layers left off at each end."""
    cut = num_layers // 3
    return cut, num_layers - cut


def middle_third_starts(num_layers: int, k: int) -> list[int]:
    """First layers of the ``k``-layer blocks that overlap the middle third as far as ``k`` allows: the blocks
    inside it when ``k`` fits, else those covering it."""
    _check(num_layers, k)
    lo, hi = middle_third(num_layers)
    if k <= hi - lo:
        return list(range(lo, hi - k + 1))
    return list(range(max(0, hi - k), min(lo, num_layers - k) + 1))


def spread(num_layers: int, k: int) -> list[int]:
    """``k`` layers spread evenly over the depth (centre of each of k equal parts; none adjacent if k <= L/2)."""
    _check(num_layers, k)
    return sorted({min(num_layers - 1, int((i + 0.5) * num_layers / k)) for i in range(k)})


def runs(layers) -> list[tuple[int, int]]:
    """Maximal runs of adjacent layer indices, as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for li in sorted(layers):
        if out and li == out[-1][1] + 1:
            out[-1] = (out[-1][0], li)
        else:
            out.append((li, li))
    return out


def is_contiguous(layers) -> bool:
    return len(runs(layers)) <= 1
