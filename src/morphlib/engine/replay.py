"""One replay driver for ``LLM`` (wall clock) and ``Simulator`` (virtual clock): a trace's requests arrive at
their times, the engine steps while it has work, and while it has none the clock sleeps (or jumps) to the
next arrival, the next copy landing or the next idle tick, at which the controller is called too (so a
restore can start while nothing runs)."""

from __future__ import annotations

import numpy as np

from morphlib.engine.config import SamplingParams
from morphlib.engine.records import ReplayResult
from morphlib.engine.sequence import RequestOutput, Status
from morphlib.errors import MorphError


def trace_requests(trace, max_model_len: int, vocab: int, *, max_requests: int | None = None, seed: int = 0,
                   truncate: bool = True, time_scale: float = 1.0) -> tuple[list, int]:
    """[(arrival seconds, prompt ids, output tokens)] for a trace (seeded random prompt ids), and how many
    requests were clipped to the context (``truncate``; else a one-line error)."""
    if not (isinstance(time_scale, (int, float)) and time_scale > 0):
        raise MorphError(f"time_scale must be a positive number, got {time_scale!r}")
    n = len(trace) if max_requests is None else min(len(trace), max_requests)
    if n == 0:
        raise MorphError("the trace has no requests")
    rng = np.random.default_rng(seed)
    reqs, clipped = [], 0
    for i in range(n):
        c, g = int(trace.context_tokens[i]), int(trace.generated_tokens[i])
        if c + g > max_model_len:
            if not truncate:
                raise MorphError(f"trace request {i}: {c} + {g} tokens > the context ({max_model_len})")
            clipped += 1
            g = min(g, max_model_len // 2)
            c = min(c, max_model_len - g)
        reqs.append((float(trace.arrival_s[i]) * time_scale, rng.integers(0, vocab, c).tolist(), g))
    return reqs, clipped


def replay(engine, trace, *, time_scale: float = 1.0, max_requests: int | None = None, seed: int = 0,
           progress: bool = False, truncate: bool = True, warmup: int = 0, precapture=None,
           idle_tick_s: float | None = None) -> ReplayResult:
    """Drive ``engine`` from a ``morphlib.workloads.traces.Trace``: request i arrives ``arrival_s[i] *
    time_scale`` seconds after the start (engine clock) with ``context_tokens[i]`` random prompt ids (seed
    ``seed``: identical prompts on identical arrivals) and exactly ``generated_tokens[i]`` output tokens
    (EOS ignored). Requests longer than the context are clipped when ``truncate`` (counted), else refused.

    warmup: that many requests (the trace's first shapes, other prompts) run to completion first, outside
        the result. precapture: a swap order whose CUDA-graph states are captured before the start.
    idle_tick_s: while the engine has no request, call the controller (an idle step) at least this often
        (None: only at arrivals and copy landings)."""
    if idle_tick_s is not None and not (isinstance(idle_tick_s, (int, float)) and idle_tick_s > 0):
        raise MorphError(f"idle_tick_s must be a positive number of seconds, got {idle_tick_s!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MorphError(f"warmup must be a number of requests >= 0, got {warmup!r}")
    reqs, clipped = trace_requests(trace, engine.max_model_len, engine.spec.vocab, max_requests=max_requests,
                                   seed=seed, truncate=truncate, time_scale=time_scale)
    if warmup:
        warm, _ = trace_requests(trace, engine.max_model_len, engine.spec.vocab, max_requests=warmup,
                                 seed=seed + 1, truncate=True)
        engine.generate([ids for _, ids, _ in warm], [SamplingParams(max_tokens=g, ignore_eos=True) for *_, g in warm])
    if precapture is not None:
        engine.precapture(list(precapture))
    n = len(reqs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"replay {getattr(trace, 'name', '')}".strip(), leave=False)
    core, clock = engine.core, engine.clock
    first_step, first_op = len(core.steps), len(core.morph.history)
    start = clock.now()
    seqs, i, last_tick, stuck = [], 0, start, 0
    while True:
        now = clock.now()
        while i < n and start + reqs[i][0] <= now:
            t, ids, g = reqs[i]
            seqs.append(engine.add_request(ids, SamplingParams(max_tokens=g, ignore_eos=True), arrival=start + t))
            i += 1
        if not core.idle:
            engine.step()
            if bar is not None:
                done = sum(s.status is Status.FINISHED for s in seqs)
                if done != bar.n:
                    bar.n = done
                    bar.refresh()
            continue
        busy = core.morph.busy
        if i >= n and not busy:
            break
        wake = start + reqs[i][0] if i < n else float("inf")
        if busy:
            wake = min(wake, core.copies.next_landing(now))
        if idle_tick_s is not None and engine.controller is not None:
            wake = min(wake, last_tick + idle_tick_s)
        if wake > now:
            clock.sleep_until(wake)
            if i < n and start + reqs[i][0] <= clock.now():
                continue
        before = [(op.layer, op.phase) for op in core.morph.pending]
        engine.step()  # an idle step: the controller, the morph boundary, copies sent
        last_tick = clock.now()
        moved = before != [(op.layer, op.phase) for op in core.morph.pending] or last_tick > now
        stuck = 0 if moved or not clock.virtual else stuck + 1
        if stuck > 2:
            raise MorphError("the replay is stalled: a morph operation makes no progress on an idle engine")
    if bar is not None:
        bar.close()
    return ReplayResult([RequestOutput.of(s) for s in seqs], core.steps[first_step:], clipped, clock.now() - start,
                        [op for op in core.morph.history[first_op:]], getattr(trace, "name", ""), warmup)
