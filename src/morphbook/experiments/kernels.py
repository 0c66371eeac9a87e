"""Benchmark: INT4 linear kernels against bf16 at every row count, on the linear shapes of real models.

Wraps ``morphlib.bench.kernels.run_bench`` so that its numbers are published like a chapter's
(``results/kernels/summary.json`` with provenance). Headline: the worst INT4/bf16 time ratio over
the Llama-2-7B shapes per row band (1 row, 1 row at 4096x4096, <= 16, 16-256, 512-2048), each with
issue #19's target and whether it was met, in the engine's "fast" dispatch and in the chapters'
bit-exact "exact" dispatch; and the worst time of ours over GemLite's and over tinygemm's on the same
(shape, rows), measured in the same run (GemLite found as ``morphlib.bench.gemlite`` says).
"""

from __future__ import annotations

from dataclasses import dataclass

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, int_tuple
from morphlib.bench.kernels import MODELS, ROWS, run_bench
from morphlib.errors import MorphError

DEFAULTS = {"gpu": dict(models=MODELS, rows=ROWS), "cpu": dict(models=("smollm2-135m",), rows=(1, 8, 64, 512))}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    models: tuple[str, ...] = MODELS  # shapes of morphlib.shapes.SHAPES whose linears are timed
    rows: tuple[int, ...] = ROWS
    group_size: int = 64
    mode: str = "fast"  # the dispatch timed as "the chosen kernel" ("exact" is timed beside it on CUDA)

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "rows", int_tuple("rows", self.rows))
        if self.mode not in ("fast", "exact"):
            raise MorphError(f"mode must be 'fast' or 'exact', got {self.mode!r}")


def run(cfg: Config) -> Result:
    with Stopwatch() as sw:
        out = run_bench(models=cfg.models, rows=cfg.rows, group_size=cfg.group_size, mode=cfg.mode)
    head = out["headline"]
    headline = dict(head)  # worst_time_ratio_rows_1, ..._1_4096x4096, ..._le_16, ..._16_256, ..._512_2048, worst_ratio_vs_*
    for band, v in (out.get("headline_exact_mode") or {}).items():
        headline[f"exact_mode_{band}"] = v
    headline.update(device=out["device"], copy_gbps=out.get("copy_gbps"), mode=out["mode"])
    return Result(as_params(cfg, device=out["device"], triton=out.get("triton"), gemlite=out.get("gemlite")), headline,
                  {"rows.json": out["rows"]}, sw.seconds)
