"""What the engine records: one ``StepRecord`` per step, what a controller sees (``StepInfo``), and a trace
replay's result with its summary (latency percentiles, SLO attainment, goodput, morph activity)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from morphlib.engine.sequence import RequestOutput
from morphlib.errors import MorphError


@dataclass(slots=True)
class StepRecord:
    """One engine step (engine clock, seconds; ``host_ms`` host milliseconds by phase: schedule = the core's
    boundary work and scheduling, prepare / launch / sync = the executor's input preparation, device
    launch and wait + sampling, bookkeeping = the core's update after the step)."""

    index: int
    start: float
    end: float
    path: str  # "graph", "eager" or "idle" (the simulator: the path the real engine would take)
    num_seqs: int
    num_tokens: int
    num_sampled: int
    state: tuple  # swapped (INT4) layers during the step
    kv_used: int
    kv_capacity: int
    waiting: int
    running: int
    committed: list | tuple = ()  # MorphOps committed at this step's boundary
    gpu_ms: float | None = None  # device time of the step (when ``llm.runner.time_gpu``)
    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_sum: int = 0  # tokens of context the step's attention reads (sum over its sequences)
    bucket: int | None = None  # the decode graph bucket (decode-only steps within the largest bucket)
    copy_bytes: int = 0  # host->device morph bytes sent in this step (side chunks and sync copies)
    sync_copy_bytes: int = 0  # of which on the compute stream at the boundary (sync mode)
    copy_in_flight: bool = False  # a morph copy was issued and not yet committed during the step
    capture_s: float = 0.0  # CUDA-graph captures this step had to make (lazily)
    host_ms: dict | None = None
    preempted: int = 0
    admitted: int = 0
    finished: int = 0
    seq_ids: tuple = ()  # the scheduled sequences, in batch order
    seq_tokens: tuple = ()  # and the tokens each fed (flat tuples: few objects per record for the GC)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def batch(self) -> tuple:
        """(sequence id, tokens) per scheduled sequence."""
        return tuple(zip(self.seq_ids, self.seq_tokens))


@dataclass
class StepInfo:
    """What a controller sees at a step boundary (and on the idle ticks of a replay)."""

    step: int
    now: float
    kv_used: int
    kv_capacity: int
    kv_free: int
    waiting: int
    running: int
    oldest_wait_s: float
    int4_layers: tuple
    pending: tuple
    preemptions: int = 0  # so far

    @property
    def kv_usage(self) -> float:
        return self.kv_used / max(1, self.kv_used + self.kv_free)


def _pct(a, p) -> float:
    return float(np.percentile(a, p)) if len(a) else float("nan")


def chatter(ops, dwell_s: float) -> int:
    """Reversals within a dwell: ops requested less than ``dwell_s`` after the same layer's opposite op
    committed (a swap soon undone, or a restore soon redone)."""
    last: dict[int, object] = {}
    n = 0
    for op in sorted((o for o in ops if o.committed is not None), key=lambda o: o.committed):
        prev = last.get(op.layer)
        if prev is not None and prev.to != op.to and op.requested - prev.committed < dwell_s:
            n += 1
        last[op.layer] = op
    return n


@dataclass
class ReplayResult:
    outputs: list[RequestOutput]
    steps: list[StepRecord]
    clipped: int
    duration_s: float
    morph_ops: list = field(default_factory=list)  # MorphOps committed during the replay
    trace: str = ""
    warmup: int = 0  # requests served before the replay started (not in ``outputs``)

    def summary(self, slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.2, dwell_s: float = 10.0) -> dict:
        """Latency percentiles named for what they are (``tpot_request_mean_*``: over requests, of each
        request's mean time per output token; ``itl_*``: over every gap between two tokens of a request),
        SLO attainment (share of requests meeting the TTFT SLO, the TPOT SLO by their mean, both), goodput
        (requests per second meeting both), preemptions and recomputed tokens, swaps / restores and
        chatter (reversals within ``dwell_s``), time-weighted INT4 layer count, KV-use percentiles and
        the share of busy steps that ran a CUDA graph."""
        for name, v in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s), ("dwell_s", dwell_s)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise MorphError(f"summary: {name} must be a positive number of seconds, got {v!r}")
        outs = self.outputs
        ttft = np.array([o.ttft for o in outs])
        tpot = np.array([o.tpot for o in outs])
        multi = np.array([len(o.token_ids) > 1 for o in outs], dtype=bool)
        itl = np.array([g for o in outs for g in o.inter_token_s])
        e2e = np.array([o.e2e for o in outs])
        queue = np.array([o.queueing_s for o in outs])
        ttft_ok = ttft <= slo_ttft_s
        tpot_ok = tpot <= slo_tpot_s  # a one-token request has no TPOT (0): it meets the SLO
        joint = ttft_ok & tpot_ok
        toks = sum(len(o.token_ids) for o in outs)
        dur = self.duration_s
        busy = [r for r in self.steps if r.path != "idle"]
        kv = np.array([r.kv_used / r.kv_capacity for r in self.steps if r.kv_capacity])
        weights = [b.start - a.start for a, b in zip(self.steps, self.steps[1:])] + \
                  ([self.steps[-1].seconds] if self.steps else [])
        layers = [len(r.state) for r in self.steps]
        span = sum(weights)
        share = (lambda m: float(m.mean()) if len(m) else float("nan"))
        return {
            "trace": self.trace, "requests": len(outs), "warmup_requests": self.warmup, "clipped": self.clipped,
            "duration_s": dur, "output_tokens": toks,
            "tokens_per_s": toks / dur if dur else float("nan"),
            "requests_per_s": len(outs) / dur if dur else float("nan"),
            **{f"ttft_p{p}_s": _pct(ttft, p) for p in (50, 90, 95, 99)},
            "tpot_mean_s": float(tpot[multi].mean()) if multi.any() else float("nan"),
            **{f"tpot_request_mean_p{p}_s": _pct(tpot[multi], p) for p in (50, 90, 99)},
            **{f"itl_p{p}_s": _pct(itl, p) for p in (50, 90, 95, 99)},
            "itl_max_s": float(itl.max()) if len(itl) else float("nan"),
            **{f"e2e_p{p}_s": _pct(e2e, p) for p in (50, 90, 99)},
            **{f"queueing_p{p}_s": _pct(queue, p) for p in (50, 99)},
            "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
            "ttft_attainment": share(ttft_ok), "tpot_attainment": share(tpot_ok), "slo_attainment": share(joint),
            "goodput_rps": float(joint.sum()) / dur if dur else float("nan"),
            "preemptions": int(sum(o.preemptions for o in outs)),
            "recomputed_tokens": int(sum(o.recomputed_tokens for o in outs)),
            "swaps": sum(op.to == "int4" for op in self.morph_ops),
            "restores": sum(op.to == "fp16" for op in self.morph_ops),
            "chatter": chatter(self.morph_ops, dwell_s), "dwell_s": dwell_s,
            "int4_layers_time_weighted": float(np.dot(layers, weights) / span) if span > 0 else
            (float(np.mean(layers)) if layers else 0.0),
            **{f"kv_use_p{p}": _pct(kv, p) for p in (50, 95, 99)},
            "steps": len(self.steps), "busy_steps": len(busy),
            "graph_step_fraction": sum(r.path == "graph" for r in busy) / len(busy) if busy else float("nan"),
        }
