"""The simulator's step-time model, fitted on dedicated micro-benchmarks (``engine.microbench``), never on
the replays it is validated on.

A step's time (step start to the next step's start: the step, its bookkeeping and the driver's host time
between steps) is modelled from what the engine core decides at the boundary:

* a CUDA-graph decode step (``plan.bucket``): a time per graph bucket, plus per INT4-computing layer a
  time per bucket (INT4 and 16-bit kernels differ by batch size), plus terms in the context tokens read
  and the sequences prepared;
* any other (eager) step: piecewise-linear in the step's tokens (hat functions on ``knots``), the same per
  INT4 layer, plus context and sequence terms;
* while morph copies run on the side (a chunk sent in the step), times the fitted ``copy_factor``;
  bytes copied on the compute stream (sync swaps) add ``bytes / h2d_bytes_per_s``;
* an idle step (no batch): ``idle_s``.

The coefficients are non-negative (``scipy.optimize.nnls`` on relative residuals: every step counts for
its share of its own time), fitted on the medians of like steps (same scenario, path, bucket, tokens,
sequences and INT4 layers), so that a step the operating system delayed does not pull the model (on a
shared CPU a decode step takes either its time or several times it). ``fit_step_time(rows)`` takes step
rows (``step_row``: plain dicts of a ``StepRecord``) and returns the model with its report (fit and
held-out errors, over the individual steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from morphlib.errors import MorphError

DEFAULT_KNOTS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096)
ROW_FIELDS = ("index", "start", "end", "path", "num_seqs", "num_tokens", "prefill_tokens", "decode_seqs",
              "context_sum", "bucket", "int4", "copy_bytes", "sync_copy_bytes", "copy_in_flight", "kv_used",
              "kv_capacity", "waiting", "running", "preempted", "admitted", "finished", "committed")


def step_row(rec) -> dict:
    """A ``StepRecord`` as a plain dict (``int4``: layers swapped during the step; ``committed``: ops
    committed at its boundary)."""
    return {"index": rec.index, "start": rec.start, "end": rec.end, "path": rec.path, "num_seqs": rec.num_seqs,
            "num_tokens": rec.num_tokens, "prefill_tokens": rec.prefill_tokens, "decode_seqs": rec.decode_seqs,
            "context_sum": rec.context_sum, "bucket": rec.bucket, "int4": len(rec.state), "copy_bytes": rec.copy_bytes,
            "sync_copy_bytes": rec.sync_copy_bytes, "copy_in_flight": rec.copy_in_flight, "kv_used": rec.kv_used,
            "kv_capacity": rec.kv_capacity, "waiting": rec.waiting, "running": rec.running,
            "preempted": rec.preempted, "admitted": rec.admitted, "finished": rec.finished,
            "committed": len(rec.committed)}


def with_periods(rows: list[dict]) -> list[dict]:
    """Each busy step's ``period``: the next step's start minus its own when the next step follows it
    (consecutive indices), else its own duration."""
    out = []
    for a, b in zip(rows, rows[1:] + [None]):
        follows = b is not None and b["index"] == a["index"] + 1
        out.append({**a, "period": (b["start"] - a["start"]) if follows else a["end"] - a["start"]})
    return out


def _hats(x: float, knots) -> np.ndarray:
    """Hat-function weights of ``x`` on ``knots`` (linear interpolation; beyond the last knot, linear growth)."""
    w = np.zeros(len(knots))
    if x <= knots[0]:
        w[0] = 1.0
        return w
    if x >= knots[-1]:
        w[-1] = x / knots[-1]
        return w
    j = int(np.searchsorted(knots, x, side="right")) - 1
    frac = (x - knots[j]) / (knots[j + 1] - knots[j])
    w[j], w[j + 1] = 1 - frac, frac
    return w


@dataclass(frozen=True)
class StepTimeFit:
    """A fitted step-time model (see the module doc); ``step_seconds(plan)`` for the virtual clock."""

    buckets: tuple
    knots: tuple
    graph: tuple  # per bucket: seconds (None: no benchmark step ran in that bucket)
    graph_int4: tuple  # per bucket: seconds per INT4 layer
    eager: tuple  # per knot
    eager_int4: tuple  # per knot, per INT4 layer
    context_s: tuple  # (graph, eager) seconds per context token
    seq_s: tuple  # (graph, eager) seconds per sequence
    copy_factor: float = 1.0
    idle_s: float = 0.0
    h2d_bytes_per_s: float | None = None
    report: dict = field(default_factory=dict, compare=False)

    def _base(self, bucket, tokens: int, int4: int, context: int, seqs: int) -> float:
        i = self.buckets.index(bucket) if bucket in self.buckets else None
        if i is not None and self.graph[i] is not None:  # a bucket the benchmark never ran: as an eager step
            return self.graph[i] + int4 * self.graph_int4[i] + self.context_s[0] * context + self.seq_s[0] * seqs
        h = _hats(tokens, self.knots)
        return float(h @ self.eager + int4 * (h @ self.eager_int4)) + self.context_s[1] * context + self.seq_s[1] * seqs

    def seconds(self, *, bucket, tokens: int, int4: int, context: int, seqs: int, copying: bool = False,
                sync_bytes: int = 0) -> float:
        if not seqs:
            t = self.idle_s
        else:
            t = self._base(bucket, tokens, int4, context, seqs) * (self.copy_factor if copying else 1.0)
        if sync_bytes and self.h2d_bytes_per_s:
            t += sync_bytes / self.h2d_bytes_per_s
        return t

    def step_seconds(self, plan) -> float:
        """The virtual clock's step time for a ``StepPlan`` (INT4 = the layers computing in INT4)."""
        return self.seconds(bucket=plan.bucket, tokens=plan.num_tokens, int4=len(plan.compute), context=plan.context_sum,
                            seqs=plan.num_seqs, copying=plan.copy_bytes > plan.sync_copy_bytes,
                            sync_bytes=plan.sync_copy_bytes)

    def row_seconds(self, row: dict) -> float:
        """The model's time for a step row (``step_row``)."""
        return self.seconds(bucket=row["bucket"] if row["path"] == "graph" else None, tokens=row["num_tokens"],
                            int4=row["int4"], context=row["context_sum"], seqs=row["num_seqs"],
                            copying=row["copy_bytes"] > row["sync_copy_bytes"], sync_bytes=row["sync_copy_bytes"])

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "StepTimeFit":
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
        except TypeError as exc:
            raise MorphError(f"not a step-time model: {exc}") from None


def _design(rows: list[dict], buckets: tuple, knots: tuple) -> np.ndarray:
    nb, nk = len(buckets), len(knots)
    a = np.zeros((len(rows), 2 * nb + 2 * nk + 4))
    for i, r in enumerate(rows):
        if r["path"] == "graph" and r["bucket"] in buckets:
            j = buckets.index(r["bucket"])
            a[i, j], a[i, nb + j] = 1.0, r["int4"]
            a[i, 2 * nb + 2 * nk], a[i, 2 * nb + 2 * nk + 2] = r["context_sum"], r["num_seqs"]
        else:
            h = _hats(r["num_tokens"], knots)
            a[i, 2 * nb: 2 * nb + nk], a[i, 2 * nb + nk: 2 * nb + 2 * nk] = h, h * r["int4"]
            a[i, 2 * nb + 2 * nk + 1], a[i, 2 * nb + 2 * nk + 3] = r["context_sum"], r["num_seqs"]
    return a


def _errors(model: StepTimeFit, rows: list[dict]) -> dict:
    if not rows:
        return {"steps": 0}
    pred = np.array([model.row_seconds(r) for r in rows])
    obs = np.array([r["period"] for r in rows])
    rel = np.abs(pred - obs) / obs
    return {"steps": len(rows), "median_abs_pct": float(100 * np.median(rel)), "p90_abs_pct": float(100 * np.percentile(rel, 90)),
            "total_time_error_pct": float(100 * (pred.sum() / obs.sum() - 1))}


def fit_step_time(rows: list[dict], *, buckets=(), knots=DEFAULT_KNOTS, holdout=None, h2d_bytes_per_s=None) -> StepTimeFit:
    """Fit the model on step rows carrying a ``period`` (``with_periods``). Busy steps without copies fit the
    base terms; steps that sent side copies give ``copy_factor`` (median of observed / base); idle steps
    ``idle_s``. ``holdout``: rows kept out of the fit, whose errors the report gives."""
    from scipy.optimize import nnls

    busy = [r for r in rows if r["num_seqs"] and r["period"] > 0]
    plain = [r for r in busy if not r["copy_bytes"] and not r["committed"]]
    if len(plain) < 8:
        raise MorphError(f"too few benchmark steps to fit a step-time model ({len(plain)} plain busy steps)")
    top = max(r["num_tokens"] for r in plain)  # knots up to the largest step seen (linear beyond it)
    buckets = tuple(int(b) for b in buckets)
    knots = tuple(sorted({int(k) for k in knots if k < top} | {int(top)}))
    groups: dict[tuple, list[dict]] = {}
    for r in plain:
        groups.setdefault((r.get("scenario"), r["path"], r["bucket"], r["num_tokens"], r["num_seqs"], r["int4"]), []).append(r)
    like = [{**g[0], "context_sum": float(np.median([r["context_sum"] for r in g])),
             "period": float(np.median([r["period"] for r in g]))} for g in groups.values()]
    a = _design(like, buckets, knots)
    obs = np.array([r["period"] for r in like])
    used = a.any(axis=0)
    coef = np.zeros(a.shape[1])
    coef[used], _ = nnls(a[:, used] / obs[:, None], np.ones(len(like)), maxiter=50 * a.shape[1])
    coef = [float(c) for c in coef]
    nb, nk = len(buckets), len(knots)
    idle = [r["period"] for r in rows if not r["num_seqs"] and r["period"] > 0]
    graph = tuple(c if u else None for c, u in zip(coef[:nb], used[:nb]))
    model = StepTimeFit(buckets, knots, graph, tuple(coef[nb:2 * nb]), tuple(coef[2 * nb:2 * nb + nk]),
                        tuple(coef[2 * nb + nk:2 * nb + 2 * nk]), (coef[-4], coef[-3]), (coef[-2], coef[-1]),
                        idle_s=float(np.median(idle)) if idle else 0.0, h2d_bytes_per_s=h2d_bytes_per_s)
    copying = [r for r in busy if r["copy_bytes"] > r["sync_copy_bytes"] and not r["committed"]]
    factor = 1.0
    if copying:
        ratios = [r["period"] / model.row_seconds({**r, "copy_bytes": 0, "sync_copy_bytes": 0}) for r in copying]
        factor = float(np.median([x for x in ratios if math.isfinite(x)] or [1.0]))
    unused = [name for name, u in zip(_names(buckets, knots), used) if not u]
    model = StepTimeFit(**{**asdict(model), "copy_factor": factor})
    report = {"fit": _errors(model, plain), "copy_steps": len(copying), "copy_factor": factor,
              "idle_steps": len(idle), "terms_without_data": unused}
    if holdout is not None:
        report["holdout"] = _errors(model, [r for r in holdout if r["num_seqs"] and r["period"] > 0
                                            and not r["copy_bytes"] and not r["committed"]])
    return StepTimeFit(**{**asdict(model), "report": report})


def _names(buckets, knots) -> list[str]:
    return ([f"graph b{b}" for b in buckets] + [f"graph b{b} per INT4 layer" for b in buckets]
            + [f"eager {k} tokens" for k in knots] + [f"eager {k} tokens per INT4 layer" for k in knots]
            + ["graph context", "eager context", "graph sequences", "eager sequences"])
