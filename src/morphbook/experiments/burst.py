"""Chapter 5: how bursty real request arrivals are, and how much KV capacity swapped layers buy.

An analytic first experiment (no model is loaded, no torch): trace statistics of the Azure LLM
Inference 2023 code and conversation traces (shipped with ``morphlib``), then KV-cache arithmetic for
a model *shape* on two cards, and a deliberately simple service model that turns the slowed-down
trace into KV demand (an upper bound) to set against the capacity with 0..k layers in INT4.

``run(Config.for_profile("gpu"))`` gives the published numbers (the analysis is the same on both
profiles; "gpu" uses a finer time grid and more Poisson simulations, and runs anywhere).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params
from morphlib.errors import MorphError
from morphlib.shapes import shape_config
from morphlib.workloads.kvcache import (CARDS, GIB, busiest_window, capacity_table, kv_bytes_per_token, kv_demand,
                                        overload_pct)
from morphlib.workloads.traces import TRACE_FILES, binned, burstiness, describe, load_named, resolve_traces_dir

BINS_S = (1, 10, 60)  # burstiness bins
AZURE = ("azure-code", "azure-conv")

DEFAULTS = {"gpu": dict(step_s=0.1, poisson_trials=1000), "cpu": dict(step_s=0.5, poisson_trials=200)}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    model: str = "llama-2-7b"  # model SHAPE for the KV arithmetic (MorphServe's Llama-2-7B; weights are not loaded)
    traces_dir: str | None = None  # folder with the trace CSVs; None: $MORPHLIB_TRACES, else the package's copies
    rate_divisor: float = 4.75  # MorphServe divides the Azure arrival rate by 4.75
    window_s: float = 72.0  # MorphServe's replay window
    swap_counts: tuple[int, ...] = (0, 4, 8, 16)  # layers in INT4 (0 = the FP16 baseline, required)
    block_size: int = 16  # tokens per paged KV block
    group_size: int = 64  # INT4 group size of the swapped layers
    reserve_gib: float = 1.0  # activations + CUDA context, kept out of the KV budget
    step_s: float = 0.1  # time grid of the KV demand
    poisson_trials: int = 1000  # simulations behind each Poisson peak-to-mean
    seed: int = 0

    def __post_init__(self):
        n = shape_config(self.model)["num_hidden_layers"]  # a one-line error naming the built-in shapes
        counts = tuple(self.swap_counts) if isinstance(self.swap_counts, (list, tuple)) else (self.swap_counts,)
        if any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n for k in counts):
            raise MorphError(f"swap_counts must be integers from 0 to {self.model}'s {n} layers, got {counts!r}")
        if 0 not in counts or len(counts) < 2 or len(set(counts)) != len(counts):
            raise MorphError(f"swap_counts must hold 0 (the baseline) and at least one other count, no duplicates; "
                             f"got {counts!r}")
        object.__setattr__(self, "swap_counts", counts)
        self.check_counts("block_size", "group_size", "poisson_trials")
        for name in ("rate_divisor", "window_s", "step_s"):
            if not getattr(self, name) > 0:
                raise MorphError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.reserve_gib >= 0:
            raise MorphError(f"reserve_gib must be zero or more, got {self.reserve_gib!r}")


def run(cfg: Config) -> Result:
    with Stopwatch() as sw:
        cards = {k: dataclasses.replace(c, reserve_bytes=cfg.reserve_gib * GIB) for k, c in CARDS.items()}
        folder = resolve_traces_dir(cfg.traces_dir)  # a one-line error if the traces are not there
        traces = {name: load_named(name, folder) for name in AZURE}
        # the BurstGPT head (38 requests per hour) only checks the format: too few for burst statistics
        traces["burstgpt-head"] = (load_named("burstgpt-head", folder)
                                   if (folder / TRACE_FILES["burstgpt-head"]).is_file() else None)
        for w in (w for t in traces.values() if t for w in t.warnings):
            print("warning:", w)  # e.g. BurstGPT's failed requests (0 tokens), dropped
        azure = {k: traces[k] for k in AZURE}
        bursts = pd.DataFrame([burstiness(t, b, cfg.poisson_trials, cfg.seed) for t in azure.values() for b in BINS_S])
        capacity = capacity_table(cfg.model, cards, cfg.swap_counts, cfg.block_size, cfg.group_size)

        demand_rows, overload_rows = [], []
        for name, trace in azure.items():
            slow = trace.slowed(cfg.rate_divisor)
            for key, card in cards.items():
                d = kv_demand(slow.arrival_s, slow.context_tokens, slow.generated_tokens, card, cfg.step_s)
                t0 = busiest_window(d, cfg.window_s)
                win = d[(d.t_s >= t0) & (d.t_s <= t0 + cfg.window_s)]
                demand_rows += [{"trace": name, "card": card.name, "t_s": r.t_s - t0, "kv_tokens": r.kv_tokens,
                                 "window_start_s": t0} for r in win.itertuples()]
                for row in capacity[capacity.card_key == key].itertuples():
                    overload_rows.append({"trace": name, "card": card.name, "swapped_layers": row.swapped_layers,
                                          "capacity_tokens": row.tokens, "mean_demand_tokens": float(d.kv_tokens.mean()),
                                          "overload_pct_hour": overload_pct(d, row.tokens),
                                          "overload_pct_window": overload_pct(win, row.tokens)})
        overload = pd.DataFrame(overload_rows)
        rates = pd.concat([binned(t, 10).assign(trace=n) for n, t in azure.items()])
        head = headline(cfg, cards, bursts, capacity, overload)
    params = as_params(cfg, traces={n: TRACE_FILES[n] if t else None for n, t in traces.items()},
                       cards={k: dataclasses.asdict(c) for k, c in cards.items()})
    files = {"traces.json": [describe(t) for t in traces.values() if t], "burstiness.json": bursts,
             "rates_10s.json": rates, "capacity.json": capacity, "demand_window.json": pd.DataFrame(demand_rows),
             "overload.json": overload}
    return Result(params, head, files, sw.seconds)


def headline(cfg: Config, cards: dict, bursts: pd.DataFrame, capacity: pd.DataFrame, overload: pd.DataFrame) -> dict:
    cap = lambda card_key, k: int(capacity[(capacity.card_key == card_key) & (capacity.swapped_layers == k)].tokens.iloc[0])  # noqa: E731
    ov = lambda trace, card_key, k: float(overload[(overload.trace == trace) & (overload.card == cards[card_key].name)  # noqa: E731
                                                   & (overload.swapped_layers == k)].overload_pct_hour.iloc[0])
    b = bursts.set_index(["trace", "bin_s"])
    fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
    kmax = max(cfg.swap_counts)
    out = {}
    for name, short in (("azure-code", "code"), ("azure-conv", "conv")):
        for bin_s in (1, 10):
            out[f"{short}_peak_to_mean_rps_{bin_s}s"] = fig(
                float(b.loc[(name, bin_s), "peak_to_mean_rps"]), "x",
                f"Azure {short}: peak / mean requests per {bin_s}-s bin (Poisson: "
                f"{b.loc[(name, bin_s), 'poisson_peak_to_mean_rps']:.1f})")
        out[f"{short}_peak_to_mean_tokens_10s"] = fig(float(b.loc[(name, 10), "peak_to_mean_tokens"]), "x",
                                                      f"Azure {short}: peak / mean tokens per 10-s bin")
    out["kv_kib_per_token"] = fig(kv_bytes_per_token(cfg.model) / 1024, " KiB", f"{cfg.model}: KV per token (all layers)")
    out["l4_kv_tokens_no_swap"] = fig(cap("L4-24GB", 0), " tokens", f"{cfg.model} on L4: KV capacity, FP16")
    for k in cfg.swap_counts:
        if k:
            out[f"l4_kv_gain_pct_{k}_layers"] = fig(100 * (cap("L4-24GB", k) / cap("L4-24GB", 0) - 1), " %",
                                                    f"L4: KV capacity gain, {k} layers INT4")
    out[f"h100_kv_gain_pct_{kmax}_layers"] = fig(100 * (cap("H100-80GB", kmax) / cap("H100-80GB", 0) - 1), " %",
                                                 f"80 GB card: KV capacity gain, {kmax} layers INT4")
    for short in ("code", "conv"):
        for k in (0, kmax):
            out[f"l4_{short}_overload_pct_{k}_layers"] = fig(
                ov(f"azure-{short}", "L4-24GB", k), " % of time",
                f"L4, Azure {short} at rate/{cfg.rate_divisor:g}: demand above capacity, {k} layers INT4 (analytic)")
    return out
