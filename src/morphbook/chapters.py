"""The registry of the book's chapters (and of the two benchmarks that publish results like them).

A new chapter = one entry here + one experiment module (``morphbook/experiments/<name>.py``, with
``Config.for_profile`` and ``run``) + one notebook (``notebooks/NN_<name>.py``) + one line in ``_toc.yml``.
A chapter that builds on others' results declares them (``uses=("strategies",)``): its ``run(cfg, inputs)``
is handed them, checked, from the same results root (``morphbook.publish.inputs``), and its results
turn STALE when an input is re-run with other results.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphlib.errors import MorphError


@dataclass(frozen=True)
class Chapter:
    name: str  # short name, also the results subfolder
    number: int | None  # chapter number; None for a benchmark without a page
    title: str
    notebook: str | None  # jupytext percent source, relative to the repository root
    experiment: str  # the module whose code (plus the library modules it imports) made the numbers
    runs_on: str  # where the published profile runs: "gpu", "cpu" or "cpu or gpu"
    kernel: str = "python3"  # the Jupyter kernel papermill runs the notebook with
    uses: tuple[str, ...] = ()  # the chapters whose results this one reads (run(cfg, inputs))

    @property
    def docname(self) -> str:
        """Sphinx document name (toc path without extension)."""
        return self.notebook.rsplit(".", 1)[0] if self.notebook else ""


CHAPTERS: tuple[Chapter, ...] = (
    Chapter("sensitivity", 1, "Layer sensitivity to INT4", "notebooks/01_sensitivity.py",
            "morphbook.experiments.sensitivity", "cpu or gpu"),
    Chapter("strategies", 2, "Which layers to swap", "notebooks/02_strategies.py",
            "morphbook.experiments.strategies", "cpu or gpu"),
    Chapter("transfer", 3, "Swap transfer cost", "notebooks/03_transfer.py", "morphbook.experiments.transfer", "gpu"),
    Chapter("overlap", 4, "Overlapping swaps with decoding", "notebooks/04_overlap.py",
            "morphbook.experiments.overlap", "gpu"),
    Chapter("burst", 5, "Serving a bursty trace", "notebooks/05_burst.py", "morphbook.experiments.burst", "cpu or gpu"),
    Chapter("vllm", 6, "Swapping inside vLLM", "notebooks/06_vllm.py", "morphbook.experiments.vllm", "cpu",
            kernel="morphbook-vllm", uses=("strategies",)),
)
# Experiments without a page of their own (their numbers appear on a chapter's page, or in results/ only).
BENCHMARKS: tuple[Chapter, ...] = (
    Chapter("domains", None, "Chapter 2 across domains (shown on chapter 2's page)", None,
            "morphbook.experiments.domains", "cpu or gpu", uses=("strategies",)),
    Chapter("kernels", None, "INT4 linear kernels", None, "morphbook.experiments.kernels", "gpu"),
    Chapter("engine", None, "Serving engine", None, "morphbook.experiments.engine", "gpu"),
)
ALL: tuple[Chapter, ...] = CHAPTERS + BENCHMARKS
NAMES: tuple[str, ...] = tuple(c.name for c in ALL)
_bad_uses = [f"{c.name} uses {u}" for i, c in enumerate(ALL) for u in c.uses if u not in NAMES[:i] or u == c.name]
if _bad_uses:  # an input must be a chapter listed before: results are made in this order
    raise MorphError(f"chapters.py: inputs must name an earlier chapter: {', '.join(_bad_uses)}")


def chapter(name: str) -> Chapter:
    for c in ALL:
        if c.name == name:
            return c
    raise MorphError(f"unknown chapter {name!r} (expected one of {', '.join(NAMES)})")
