"""Benchmark: the serving engine's decode step against the HBM roofline, against Hugging Face, during swaps.

Wraps ``morphlib.engine.bench.run_bench`` so that its numbers are published like a chapter's
(``results/engine/summary.json`` with provenance): decode step time per batch size in FP16 and
all-INT4 for SmolLM2 (real weights when in the cache) and a Llama-2-7B shape (random weights) inside a
24 GiB budget (an L4's memory), beside the roofline measured in the same run and beside HF eager
``generate``; a side-stream swap of one Llama-2-7B layer while decoding; top-1 agreement with HF.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, int_tuple
from morphlib.engine.bench import run_bench

DEFAULTS = {"gpu": dict(batch_sizes=(1, 2, 4, 8, 16, 32, 64), hf_compiled=True), "cpu": dict(batch_sizes=(1, 2))}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ctx: int = 128  # tokens of context per sequence while decode steps are timed
    steps: int = 20
    big: str = "llama-2-7b"  # the large shape (random weights)
    big_budget_gib: float = 24.0  # one memory budget for weights + KV + workspace (an L4's 24 GB)
    hf_compiled: bool = False  # also time HF static cache + torch.compile (about a minute of compilation)

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", int_tuple("batch_sizes", self.batch_sizes))


def run(cfg: Config) -> Result:
    with Stopwatch() as sw:
        out = run_bench(batch_sizes=cfg.batch_sizes, ctx=cfg.ctx, steps=cfg.steps, hf_compiled=cfg.hf_compiled,
                        big=cfg.big, big_budget_gib=cfg.big_budget_gib)
    headline = {**out["headline"], "device": out["device"], "d2d_copy_gb_s": out.get("d2d_copy_gb_s"),
                "smollm2_weights": out.get("smollm2_weights")}
    detail = {k: v for k, v in out.items() if k not in ("rows", "headline")}
    return Result(as_params(cfg, device=out["device"]), headline, {"rows.json": out["rows"], "run.json": detail},
                  sw.seconds)
