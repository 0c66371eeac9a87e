"""LLM-serving request traces: load and validate them, and measure how bursty their arrivals are.

Formats (chosen from the header):

* **Azure LLM Inference 2023** (Splitwise): ``TIMESTAMP,ContextTokens,GeneratedTokens`` with wall-clock
  timestamps ``YYYY-MM-DD HH:MM:SS.fffffff``, CRLF line ends;
* **BurstGPT**: ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` with integer
  seconds.

Arrival times become seconds from the first request. Errors (one-line :class:`MorphError` naming the
file and line): missing file or columns, a row with too few fields, a timestamp or token count that
does not parse, a negative token count, a timestamp earlier than the previous one, no requests.
Warnings (kept in ``Trace.warnings``): rows with 0 prompt or 0 output tokens (failed requests, as in
BurstGPT) are dropped; a BurstGPT total that is not request + response is kept.

The traces themselves (Azure LLM Inference 2023 code and conversation, a 400-row BurstGPT head; all
CC-BY-4.0, ~1 MB) ship with the package in ``morphlib/data/traces``; a parameter or
``$MORPHLIB_TRACES`` points elsewhere.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from morphlib.errors import MorphError

TRACE_FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "burstgpt-head": "BurstGPT_1_first400rows.csv",
}
COLUMNS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
}


@dataclass
class Trace:
    name: str
    format: str
    arrival_s: np.ndarray  # float64, seconds since the first request
    context_tokens: np.ndarray  # int64
    generated_tokens: np.ndarray  # int64
    start: str  # the first timestamp, as written in the file
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def span_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0])

    @property
    def mean_rate(self) -> float:
        """Requests per second, (n - 1) / span (the traces README's definition)."""
        return (len(self) - 1) / self.span_s if self.span_s > 0 else float("nan")

    def slowed(self, factor: float) -> "Trace":
        """The same requests with arrival times stretched by ``factor`` (rate divided by it)."""
        if not factor > 0:
            raise MorphError(f"rate scale factor must be positive, got {factor}")
        return Trace(f"{self.name} (rate/{factor:g})", self.format, self.arrival_s * factor, self.context_tokens,
                     self.generated_tokens, self.start, self.dropped, list(self.warnings))

    def window(self, start_s: float, length_s: float) -> "Trace":
        """The requests arriving in [start_s, start_s + length_s), their times counted from ``start_s`` (a quiet
        start of the window stays quiet); a one-line error when the window holds no request."""
        for name, v in (("start_s", start_s), ("length_s", length_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise MorphError(f"Trace.window: {name} must be a number of seconds, got {v!r}")
        if start_s < 0 or not length_s > 0:
            raise MorphError(f"Trace.window: needs start_s >= 0 and length_s > 0, got {start_s!r}, {length_s!r}")
        keep = (self.arrival_s >= start_s) & (self.arrival_s < start_s + length_s)
        if not keep.any():
            raise MorphError(f"Trace.window: no request of {self.name} arrives in [{start_s:g}, "
                             f"{start_s + length_s:g}) s (the trace spans {self.span_s:g} s)")
        return dataclasses.replace(self, name=f"{self.name} [{start_s:g}, {start_s + length_s:g}) s",
                                   arrival_s=self.arrival_s[keep] - start_s, context_tokens=self.context_tokens[keep],
                                   generated_tokens=self.generated_tokens[keep], warnings=list(self.warnings))

    def scaled(self, rate: float) -> "Trace":
        """The same requests with arrival times compressed or stretched so that the mean rate
        (``mean_rate``, (n - 1) / span) is ``rate`` requests per second; labelled with the rate."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0:
            raise MorphError(f"Trace.scaled: rate must be a positive number of requests per second, got {rate!r}")
        if not self.span_s > 0:
            raise MorphError(f"Trace.scaled: {self.name} has no mean rate to scale (its {len(self)} request(s) "
                             "arrive at one time)")
        return dataclasses.replace(self, name=f"{self.name} @ {rate:g} req/s",
                                   arrival_s=self.arrival_s * (self.mean_rate / rate), warnings=list(self.warnings))


# ----------------------------------------------------------------------------- locating traces
TRACES_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"  # shipped with the package (CC-BY-4.0)


def resolve_traces_dir(traces_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the trace CSVs: ``traces_dir``, else ``$MORPHLIB_TRACES``, else the copies
    shipped in ``morphlib/data/traces`` (see the README there: origin, columns, licence, citation)."""
    if traces_dir:
        path, why = Path(traces_dir).expanduser(), "traces_dir"
    elif os.environ.get("MORPHLIB_TRACES"):
        path, why = Path(os.environ["MORPHLIB_TRACES"]).expanduser(), "$MORPHLIB_TRACES"
    else:
        path, why = TRACES_DIR, "the package's own copy"
    if not path.is_dir():
        raise MorphError(f"traces folder not found: {path} ({why}); give a folder holding "
                         f"{', '.join(TRACE_FILES.values())}")
    return path.resolve()


def trace_path(name: str, traces_dir: str | os.PathLike | None = None) -> Path:
    if name not in TRACE_FILES:
        raise MorphError(f"unknown trace {name!r}: choose one of {', '.join(TRACE_FILES)}")
    path = resolve_traces_dir(traces_dir) / TRACE_FILES[name]
    if not path.is_file():
        raise MorphError(f"trace file not found: {path}")
    return path


# ----------------------------------------------------------------------------- parsing
def _int(text: str, column: str, where: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise MorphError(f"{where}: {column} {text!r} is not an integer") from None
    if value < 0:
        raise MorphError(f"{where}: {column} is negative ({value})")
    return value


def _time(text: str, fmt: str, where: str) -> np.datetime64 | float:
    text = text.strip()
    try:
        if fmt == "azure":
            if len(text) < 19 or text[10] != " ":
                raise ValueError
            return np.datetime64(text.replace(" ", "T", 1), "ns")
        return float(text)
    except ValueError:
        want = "YYYY-MM-DD HH:MM:SS.fffffff" if fmt == "azure" else "seconds (a number)"
        raise MorphError(f"{where}: timestamp {text!r} is not {want}") from None


def load_trace(path: str | os.PathLike, name: str | None = None) -> Trace:
    """Read and validate one trace CSV (Azure 2023 or BurstGPT format, detected from the header)."""
    path = Path(path)
    if not path.is_file():
        raise MorphError(f"trace file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise MorphError(f"{path.name}: empty file (no header)")
        header = [h.strip() for h in header]
        fmt = next((f for f, cols in COLUMNS.items() if cols[0] in header), None)
        if fmt is None:
            raise MorphError(f"{path.name}: unknown trace format: header {header} has neither "
                             f"{COLUMNS['azure'][0]!r} (Azure 2023) nor {COLUMNS['burstgpt'][0]!r} (BurstGPT)")
        missing = [c for c in COLUMNS[fmt] if c not in header]
        if missing:
            raise MorphError(f"{path.name}: missing column(s) {', '.join(map(repr, missing))} (found: {', '.join(header)})")
        idx = [header.index(c) for c in COLUMNS[fmt]]
        total_idx = header.index("Total tokens") if "Total tokens" in header else None
        times, ctx, gen, zero, bad_total, first, prev = [], [], [], 0, 0, None, None
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue  # a blank line
            where = f"{path.name}:{lineno}"
            if len(row) < len(header):
                raise MorphError(f"{where}: expected {len(header)} fields, got {len(row)}")
            t = _time(row[idx[0]], fmt, where)
            c = _int(row[idx[1]], COLUMNS[fmt][1], where)
            g = _int(row[idx[2]], COLUMNS[fmt][2], where)
            if prev is not None and t < prev:
                raise MorphError(f"{where}: timestamp {row[idx[0]].strip()} is earlier than the previous row's")
            prev = t
            if total_idx is not None and _int(row[total_idx], "Total tokens", where) != c + g:
                bad_total += 1
            if c == 0 or g == 0:
                zero += 1
                continue
            first = first or row[idx[0]].strip()
            times.append(t)
            ctx.append(c)
            gen.append(g)
    if not times:
        raise MorphError(f"{path.name}: no requests (rows with zero tokens dropped: {zero})")
    if fmt == "azure":
        ns = np.asarray(times, dtype="datetime64[ns]").astype(np.int64)
        seconds = (ns - ns[0]) / 1e9
    else:
        seconds = np.asarray(times, dtype=np.float64) - times[0]
    warnings = []
    if zero:
        warnings.append(f"{path.name}: dropped {zero} request(s) with 0 prompt or 0 output tokens (failed requests)")
    if bad_total:
        warnings.append(f"{path.name}: {bad_total} row(s) where Total tokens != request + response (kept)")
    return Trace(name or path.stem, fmt, seconds, np.asarray(ctx, dtype=np.int64), np.asarray(gen, dtype=np.int64),
                 first, zero, warnings)


def load_named(name: str, traces_dir: str | os.PathLike | None = None) -> Trace:
    """One of ``TRACE_FILES`` by short name, e.g. ``load_named("azure-conv")``."""
    return load_trace(trace_path(name, traces_dir), name)


# ----------------------------------------------------------------------------- burstiness
def binned(trace: Trace, bin_s: float) -> pd.DataFrame:
    """Requests and tokens (prompt + output) arriving in consecutive bins of ``bin_s`` seconds."""
    if not bin_s > 0:
        raise MorphError(f"bin width must be positive, got {bin_s}")
    n_bins = int(np.floor(trace.arrival_s[-1] / bin_s)) + 1
    which = np.minimum((trace.arrival_s // bin_s).astype(np.int64), n_bins - 1)
    requests = np.bincount(which, minlength=n_bins)
    tokens = np.bincount(which, weights=trace.context_tokens + trace.generated_tokens, minlength=n_bins)
    return pd.DataFrame({"t_s": np.arange(n_bins) * bin_s, "requests": requests, "tokens": tokens,
                         "requests_per_s": requests / bin_s, "tokens_per_s": tokens / bin_s})


def burstiness(trace: Trace, bin_s: float, poisson_trials: int = 200, seed: int = 0) -> dict:
    """Peak-to-mean ratios and the index of dispersion (variance / mean of counts: 1 for Poisson
    arrivals) in bins of ``bin_s`` s, with the peak-to-mean a Poisson process of the same mean rate
    and number of bins would show (median of ``poisson_trials`` simulations)."""
    b = binned(trace, bin_s)
    counts = b["requests"].to_numpy()
    rng = np.random.default_rng(seed)
    sim = rng.poisson(counts.mean(), size=(poisson_trials, len(counts)))
    return {"trace": trace.name, "bin_s": bin_s, "bins": len(counts),
            "mean_rps": counts.mean() / bin_s, "peak_rps": counts.max() / bin_s,
            "peak_to_mean_rps": counts.max() / counts.mean(),
            "poisson_peak_to_mean_rps": float(np.median(sim.max(axis=1) / sim.mean(axis=1))),
            "dispersion_rps": counts.var() / counts.mean(),
            "mean_tokens_per_s": b["tokens"].mean() / bin_s, "peak_tokens_per_s": b["tokens"].max() / bin_s,
            "peak_to_mean_tokens": b["tokens"].max() / b["tokens"].mean()}


def describe(trace: Trace) -> dict:
    return {"trace": trace.name, "format": trace.format, "requests": len(trace), "dropped": trace.dropped,
            "span_s": trace.span_s, "mean_rate": trace.mean_rate, "start": trace.start,
            "context_median": float(np.median(trace.context_tokens)), "context_mean": float(trace.context_tokens.mean()),
            "generated_median": float(np.median(trace.generated_tokens)),
            "generated_mean": float(trace.generated_tokens.mean())}
