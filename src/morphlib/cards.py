"""The GPU cards the book sizes things for, in one table: memory as the card reports it, the fraction an
engine may use, and pinned host-to-device (PCIe) bandwidth.

Both the serving engine (``EngineConfig(card="L4")``: its memory budget) and the capacity arithmetic of
``morphlib.workloads.kvcache`` (chapter 5) read their budgets from here, so that "Llama-2-7B on an L4"
is the same number of bytes in both.

* ``memory_bytes``: ``nvidia-smi``'s ``memory.total`` (MiB, as the driver reports the card: L4 23034,
  A100 40 GB 40960, A100 80 GB 81920, H100 80 GB HBM3 81559, H200 143771), in bytes.
* ``usable_fraction``: of that, what an engine may hold (vLLM's default ``gpu_memory_utilization``, 0.90);
  the rest is the CUDA context, other processes, the allocator's slack.
* ``h2d_bytes_per_s``: pinned host -> device copy bandwidth, an assumption for what was not measured
  (PCIe 4.0 x16 about 25 GB/s in practice; PCIe 5.0 x16 about 55 GB/s, measured on this project's H200:
  ``engine/NOTES.md``). The simulator's copies and the engine's first pacing estimate use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphlib.errors import MorphError

MIB = 2**20


@dataclass(frozen=True)
class Card:
    key: str
    name: str
    memory_bytes: int
    usable_fraction: float
    h2d_bytes_per_s: float

    @property
    def budget_bytes(self) -> int:
        """Bytes an engine may hold on this card: ``usable_fraction * memory_bytes``."""
        return int(self.usable_fraction * self.memory_bytes)


CARDS: dict[str, Card] = {c.key: c for c in (
    Card("L4", "NVIDIA L4 24 GB", 23034 * MIB, 0.90, 25e9),
    Card("A100-40GB", "NVIDIA A100 40 GB", 40960 * MIB, 0.90, 25e9),
    Card("A100-80GB", "NVIDIA A100 80 GB", 81920 * MIB, 0.90, 25e9),
    Card("H100-80GB", "NVIDIA H100 80 GB HBM3", 81559 * MIB, 0.90, 55e9),
    Card("H200", "NVIDIA H200 141 GB", 143771 * MIB, 0.90, 55e9),
)}


def get_card(key: str) -> Card:
    """The card called ``key`` (one of ``CARDS``), or a one-line error naming the choices."""
    if key not in CARDS:
        raise MorphError(f"unknown card {key!r}: choose one of {', '.join(CARDS)}")
    return CARDS[key]
