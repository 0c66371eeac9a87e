"""Dedicated micro-benchmarks of a serving engine, for the simulator's step-time model (``engine.steptime``),
and the unloaded latencies chapter 5's SLOs are defined from.

``run_microbench(engine, plan)`` serves short scenarios of random prompts, each isolating what a step's
time depends on: prefill chunks of given lengths, decode batches of given sizes at a short and a long
context, mixed steps (a prefill chunk beside running decodes), each at several numbers of INT4 layers,
decode while morph copies run on the side, and idle steps. It returns every step as a row
(``steptime.step_row`` plus ``period`` and the scenario's name) and the morph operations' records
(copy bandwidth). ``unloaded_latency`` times lone requests on the idle engine: TTFT per prompt length and
the batch-1 time per output token.

The benchmark never sees a trace: the model fitted on it is validated on replays it has not seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from morphlib.engine.config import SamplingParams
from morphlib.engine.steptime import step_row, with_periods
from morphlib.errors import MorphError, check_int


@dataclass(frozen=True)
class BenchPlan:
    """What the benchmark serves (sizes are clipped to what the engine's KV pool and batch limits hold)."""

    int4_counts: tuple = (0, 8, 16, 32)  # layers in INT4 (the first ones of ``order``)
    batches: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    contexts: tuple = (64, 1024)  # prompt lengths of the decode batches
    prefills: tuple = (16, 64, 200, 512, 1024)  # lone prompts: one prefill chunk each (longer: several)
    mixed: tuple = (4, 16)  # decode batches beside which a long prompt is prefilled
    decode_steps: int = 12
    copy_batches: tuple = (1, 8, 32)  # decode batches during a swap and a restore of ``copy_layers`` layers
    copy_layers: int = 4
    idle_steps: int = 20
    order: tuple | None = None  # the INT4 layers (default: 0, 1, 2, ...)
    seed: int = 0

    def __post_init__(self):
        for name in ("decode_steps", "copy_layers", "idle_steps"):
            check_int(f"BenchPlan.{name}", getattr(self, name))
        for name in ("int4_counts",):
            for k in getattr(self, name):
                check_int(f"BenchPlan.{name}[...]", k, 0)
        for name in ("batches", "contexts", "prefills", "mixed", "copy_batches"):
            for v in getattr(self, name):
                check_int(f"BenchPlan.{name}[...]", v)


def _prompt(rng, vocab: int, n: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def _serve(engine, rng, prompts: list[int], out: int, *, join=None, at_step: int = 0, during=None) -> None:
    """Serve ``prompts`` (lengths) to ``out`` tokens each; ``join`` prompt lengths arrive after ``at_step`` steps;
    ``during(step)`` is called before each step (e.g. to start a swap)."""
    vocab = engine.spec.vocab
    seqs = [engine.add_request(_prompt(rng, vocab, n), SamplingParams(max_tokens=out, ignore_eos=True)) for n in prompts]
    step = 0
    while any(s.finished is None for s in seqs):
        if join and step == at_step:
            seqs += [engine.add_request(_prompt(rng, vocab, n), SamplingParams(max_tokens=2, ignore_eos=True))
                     for n in join]
        if during is not None:
            during(step)
        engine.step()
        step += 1
        if step > 100_000:
            raise MorphError("the benchmark scenario does not finish")
    engine.wait_morph()


def _fits(engine, batch: int, ctx: int, out: int) -> bool:
    bs = engine.config.block_size
    per = -(-(ctx + out) // bs)
    return batch <= engine.config.max_num_seqs and batch * per <= engine.kv_capacity and ctx + out <= engine.max_model_len


def _set_int4(engine, layers: list[int]) -> None:
    now = set(engine.int4_layers)
    if now - set(layers):
        engine.restore(sorted(now - set(layers)), wait=True)
    if set(layers) - now:
        engine.swap([li for li in layers if li not in now], wait=True)
    engine.precapture(layers)


def run_microbench(engine, plan: BenchPlan | None = None, progress=None) -> dict:
    """Serve the benchmark's scenarios (see the module doc) on an idle engine and return
    ``{"steps": [rows], "ops": [op records], "scenarios": [names], "seconds": wall}``; the engine ends
    with every layer restored."""
    plan = plan or BenchPlan()
    if not engine.core.idle or engine.int4_layers:
        raise MorphError("the micro-benchmark needs an idle engine with no layer swapped (call reset() first)")
    rng = np.random.default_rng(plan.seed)
    n_layers = engine.spec.num_layers
    order = list(plan.order) if plan.order is not None else list(range(n_layers))
    counts = sorted({min(k, len(order)) for k in plan.int4_counts})
    rows, names = [], []
    t0 = time.perf_counter()

    def scenario(name: str, fn) -> None:
        first = len(engine.core.steps)
        fn()
        got = with_periods([step_row(r) for r in engine.core.steps[first:]])
        rows.extend({**r, "scenario": name} for r in got)
        names.append(name)
        if progress:
            progress(name)

    out = plan.decode_steps + 1
    first_op = len(engine.core.morph.history)
    for k in counts:
        _set_int4(engine, order[:k])
        for p in plan.prefills:
            if _fits(engine, 1, p, 2):
                scenario(f"int4={k} prefill={p}", lambda p=p: _serve(engine, rng, [p], 2))
        for ctx in plan.contexts:
            for b in plan.batches:
                c = ctx
                while not _fits(engine, b, c, out) and c > 16:
                    c //= 2
                if _fits(engine, b, c, out):
                    scenario(f"int4={k} decode b={b} ctx={c}", lambda b=b, c=c: _serve(engine, rng, [c] * b, out))
        for b in plan.mixed:  # b decodes at context 64, then a prompt of two chunks joins them
            long = min(engine.config.max_num_batched_tokens * 2, engine.max_model_len - 2)
            if _fits(engine, b + 1, max(long, 64 + out + 8), 2):
                scenario(f"int4={k} mixed b={b} + prompt {long}",
                         lambda b=b, long=long: _serve(engine, rng, [64] * b, out + 8, join=[long], at_step=3))
    _set_int4(engine, [])
    swap = order[: plan.copy_layers]
    for b in plan.copy_batches:
        if not _fits(engine, b, 64, 4 * out):
            continue

        def morph(step, swap=swap):
            if step == 2:
                engine.swap(swap)
            elif step > 2 and not engine.core.morph.busy and engine.int4_layers and engine.can_restore():
                engine.restore()

        scenario(f"copies b={b}", lambda b=b, morph=morph: _serve(engine, rng, [64] * b, 4 * out, during=morph))
        if engine.int4_layers:
            engine.restore(wait=True)

    def idle():
        for _ in range(plan.idle_steps):
            engine.step()

    scenario("idle", idle)
    ops = [op.record() for op in engine.core.morph.history[first_op:]]
    return {"steps": rows, "ops": ops, "scenarios": names, "seconds": time.perf_counter() - t0}


def copy_bandwidth(ops: list[dict]) -> float | None:
    """Bytes per second of morph copies as their records timed them (CUDA: device events; CPU: host
    timestamps of the synchronous copies), median; None where no copy was timed."""
    bw = [op["copy_bytes"] / (op["copy_device_ms"] * 1e-3) for op in ops if op.get("copy_device_ms")]
    return float(np.median(bw)) if bw else None


def unloaded_latency(engine, prompt_lengths, *, reps: int = 3, tpot_tokens: int = 64, seed: int = 1) -> dict:
    """Lone requests on the idle 16-bit engine: median TTFT (arrival to first token, engine clock) per prompt
    length, and the median batch-1 time per output token over ``tpot_tokens`` tokens."""
    check_int("reps", reps)
    if not engine.core.idle:
        raise MorphError("unloaded latency needs an idle engine")
    rng = np.random.default_rng(seed)
    ttft = {}
    for n in prompt_lengths:
        n = min(int(n), engine.max_model_len - 2)
        runs = [engine.generate(_prompt(rng, engine.spec.vocab, n), SamplingParams(max_tokens=1, ignore_eos=True))[0].ttft
                for _ in range(reps)]
        ttft[n] = float(np.median(runs))
    tpot = [engine.generate(_prompt(rng, engine.spec.vocab, 64), SamplingParams(max_tokens=tpot_tokens, ignore_eos=True))[0].tpot
            for _ in range(reps)]
    return {"ttft_s": ttft, "tpot_bs1_s": float(np.median(tpot)), "reps": reps, "tpot_tokens": tpot_tokens}
