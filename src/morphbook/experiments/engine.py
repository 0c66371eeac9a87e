"""Benchmark: the serving engine as a measuring instrument -- decode step against the HBM roofline and
Hugging Face, INT4 against FP16 at every batch size, a swap during decode, the memory budget, correctness.

Wraps ``morphlib.bench.engine.run_bench`` so that its numbers are published like a chapter's
(``results/engine/summary.json`` with provenance): decode step time per batch size in FP16 and all-INT4
for SmolLM2 (real weights when in the cache) and a Llama-2-7B shape (random weights) inside an L4's
budget (``EngineConfig(card="L4")``, the budget chapter 5's capacity arithmetic uses), beside the roofline
measured in the same run and beside HF eager ``generate`` and HF compiled; a side-stream swap of one
Llama-2-7B layer while decoding; the engine's top-1 agreement and KL against an fp32 reference on forced
continuations, beside HF's own incremental decode. The CPU profile runs the correctness measure only,
small (fp32 engine against fp32 HF: agreement must be exact).
"""

from __future__ import annotations

from dataclasses import dataclass

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, int_tuple
from morphlib.bench.engine import run_bench
from morphlib.cards import get_card
from morphlib.errors import MorphError

DEFAULTS = {"gpu": dict(batch_sizes=(1, 2, 4, 8, 16, 32, 64), hf_compiled=True, device="cuda"),
            "cpu": dict(batch_sizes=(1, 2), device="cpu", prompts=4, prompt_len=32, new_tokens=64)}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ctx: int = 128  # tokens of context per sequence while decode steps are timed
    steps: int = 20
    big: str = "llama-2-7b"  # the large shape (random weights)
    big_card: str = "L4"  # its memory budget: this card's (morphlib.cards), as chapter 5's arithmetic counts it
    hf_compiled: bool = False  # also time HF static cache + torch.compile (about a minute of compilation)
    prompts: int = 64  # correctness: held-out text prompts ...
    prompt_len: int = 128  # ... of this many tokens ...
    new_tokens: int = 256  # ... each with a forced continuation of this many (64 x 256 = 16,384 positions)
    device: str = "cuda"

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", int_tuple("batch_sizes", self.batch_sizes))
        self.check_counts("ctx", "steps", "prompts", "prompt_len", "new_tokens")
        get_card(self.big_card)
        if self.device not in ("cuda", "cpu"):
            raise MorphError(f"device must be 'cuda' or 'cpu', got {self.device!r}")


def run(cfg: Config) -> Result:
    with Stopwatch() as sw:
        out = run_bench(batch_sizes=cfg.batch_sizes, ctx=cfg.ctx, steps=cfg.steps, hf_compiled=cfg.hf_compiled,
                        big=cfg.big, big_card=cfg.big_card, prompts=cfg.prompts, prompt_len=cfg.prompt_len,
                        new_tokens=cfg.new_tokens, device=cfg.device)
    headline = {**out["headline"], "device": out["device"], "d2d_copy_gb_s": out.get("d2d_copy_gb_s"),
                "smollm2_weights": out.get("smollm2_weights")}
    detail = {k: v for k, v in out.items() if k not in ("rows", "headline")}
    return Result(as_params(cfg, device=out["device"]), headline, {"rows.json": out["rows"], "run.json": detail},
                  sw.seconds)
