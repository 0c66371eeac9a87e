# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Serving a bursty trace

# %% tags=["parameters"]
profile = "cpu"           # the analysis is the same on both profiles; "gpu" uses a finer time grid (and runs anywhere)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: llama-2-7b, the model SHAPE for the KV arithmetic (MorphServe's; no weights loaded)
traces_dir = None         # None: $MORPHLIB_TRACES, else the traces shipped with morphlib (morphlib/data/traces)
rate_divisor = None       # None: 4.75, MorphServe's division of the Azure arrival rate
swap_counts = None        # None: 0, 4, 8 and 16 layers in INT4

# %%
from morphbook.experiments.burst import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, traces_dir=traces_dir, rate_divisor=rate_divisor,
                                          swap_counts=swap_counts))
shown = run_chapter("burst", run, cfg, results_root)

# %% tags=["remove-cell"]
import altair as alt
import pandas as pd

from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.readings import burst as reading
from morphbook.publish.tables import show_table

h, p = shown.headline, shown.params
traces, bursts, capacity = shown.frame("traces.json"), shown.frame("burstiness.json"), shown.frame("capacity.json")
rates, demand, overload = shown.frame("rates_10s.json"), shown.frame("demand_window.json"), shown.frame("overload.json")
small = sorted(set(capacity["card"]), key=lambda c: capacity[capacity.card == c]["tokens"].min())[0]
per_trace = reading.texts(shown.json("overload.json"), shown.json("burstiness.json"), small)
glue_all({"bursts": " ".join(v for k, v in per_trace.items() if k.startswith("bursts_")),
          "capacity": "\n\n".join(v for k, v in per_trace.items() if k.startswith("capacity_")),
          "gain": reading.gain_sentence(shown.json("capacity.json"), p["model"], h["kv_kib_per_token"]),
          "assumed": reading.assumptions_sentence(p["cards"])},
         prefix="ch5-")

# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch5-bursts`
#
# {glue:md}`ch5-gain` (MorphServe reports up to +32.97 % in its own setting {cite}`morphserve`.)
#
# ```{glue:md} ch5-capacity
# :format: myst
# ```
#
# *What this chapter cannot yet measure:* how long users wait (time to first token, time per token)
# when a serving engine swaps layers during these bursts. The demand below is arithmetic from a
# simple service model, not a replay; replays on the serving engine ({doc}`/book/benchmarks`) come next.

# %% [markdown]
# ## The question
#
# MorphServe swaps layers to INT4 *when memory runs short*: when a burst of requests needs more
# KV cache than the GPU holds. Whether that ever happens depends on two things this chapter
# measures before any serving engine runs: **how bursty real arrivals are**, and **how much KV
# capacity a swapped layer buys**. The paper replays 72-second windows of the Azure LLM Inference
# 2023 traces {cite}`splitwise` (arrival rate divided by 4.75) on an NVIDIA L4 (24 GB). This is an
# analytic first experiment (`morphbook.experiments.burst`): trace statistics and KV-cache
# arithmetic, with a deliberately simple service model, computed in seconds on any machine with no
# model loaded.

# %% [markdown]
# ## The traces
#
# Two one-hour Azure traces (code completion and conversation) with one row per request: arrival
# time, prompt tokens, output tokens. They ship with `morphlib` (`morphlib/data/traces`, CC-BY-4.0,
# with their licence and a README of origin and columns). The loader checks every row (field count,
# timestamp and integer formats, no negative counts, timestamps never going back) and stops with a
# one-line error naming the file and line otherwise. The 400-row BurstGPT head is loaded only to
# check its format: it spans ten hours with 38 requests per hour, far too few for burst statistics.

# %%
show_table(traces.assign(trace=traces["trace"].map(reading.trace_name)), {"trace": "trace", "requests": "requests", "span_s": "span (s)", "mean_rate": "requests / s",
                    "context_median": "median prompt (tokens)", "generated_median": "median output (tokens)",
                    "dropped": "rows dropped"},
           "The request traces", "tbl-ch5-traces",
           formats={"span_s": lambda v: fmt.num(v, 0), "mean_rate": fmt.auto, "context_median": lambda v: fmt.num(v, 0),
                    "generated_median": lambda v: fmt.num(v, 0)})

# %% [markdown]
# ## How bursty are the arrivals?
#
# Requests and tokens per bin of 1, 10 and 60 seconds. The **peak-to-mean** ratio is the busiest
# bin over the average one. It grows with the number of bins even for perfectly random arrivals,
# so each is set against the peak-to-mean of a Poisson process with the same rate and number of
# bins (median of simulations); the **index of dispersion** (variance over mean of the counts) is 1
# for Poisson arrivals and larger when arrivals cluster.

# %%
show_table(bursts.assign(trace=bursts["trace"].map(reading.trace_name)), {"trace": "trace", "bin_s": "bin (s)", "mean_rps": "mean requests / s", "peak_rps": "peak requests / s",
                    "peak_to_mean_rps": "peak / mean", "poisson_peak_to_mean_rps": "Poisson peak / mean",
                    "dispersion_rps": "index of dispersion", "peak_to_mean_tokens": "peak / mean tokens"},
           "Burstiness of the arrivals per bin size", "tbl-ch5-bursts",
           formats={k: (lambda v: fmt.num(v, 2)) for k in ("mean_rps", "peak_rps", "peak_to_mean_rps",
                                                           "poisson_peak_to_mean_rps", "dispersion_rps",
                                                           "peak_to_mean_tokens")})

# %%
alt.Chart(rates).mark_line(interpolate="step-after").encode(
    x=alt.X("t_s:Q", title="seconds since the first request"),
    y=alt.Y("requests_per_s:Q", title="requests / s (10-s bins)"),
    tooltip=["trace", "t_s", "requests_per_s", "tokens_per_s"],
).properties(width=520, height=140).facet(row=alt.Row("trace:N", title="trace")).resolve_scale(y="independent").properties(
    title="Arrival rate over the hour")

# %% [markdown]
# ## KV capacity, and what swapped layers add
#
# For the model shape, one token of KV cache takes `2 * kv_heads * head_dim * 2` bytes per layer;
# a paged block holds `block_size` tokens for all layers. The KV budget is a share of the card's
# nominal memory minus the FP16 weights minus a reserve (below). A swapped layer frees its FP16 bytes
# minus its INT4 bytes; each freed range holds a whole number of blocks.

# %%
show_table(capacity, {"card": "card", "swapped_layers": "layers in INT4", "weights_gib": "weights (GiB)",
                      "kv_budget_gib": "KV budget (GiB)", "blocks": "KV blocks", "tokens": "KV tokens",
                      "gain_pct": "capacity gain (%)"},
           f"KV capacity of a {p['model']}-shape model per card, by layers in INT4 (INT4 g{p['group_size']}, "
           f"blocks of {p['block_size']} tokens, {p['reserve_gib']:g} GiB reserve)", "tbl-ch5-capacity",
           formats={"weights_gib": fmt.num, "kv_budget_gib": fmt.num, "gain_pct": lambda v: fmt.num(v, 1)})

# %%
alt.Chart(capacity[capacity.swapped_layers > 0]).mark_bar().encode(
    x=alt.X("swapped_layers:O", title="layers swapped to INT4"), y=alt.Y("gain_pct:Q", title="KV capacity gain (%)"),
    column=alt.Column("card:N", title="card"), tooltip=["card", "swapped_layers", "blocks", "tokens", "gain_pct"],
).properties(width=200, height=160, title="What swapped layers buy")

# %% [markdown]
# ## Demand against capacity
#
# Each request is assumed to hold its prompt + output tokens of KV from arrival until it is done,
# after `prompt / prefill rate + output * time per output token`, with per-card speeds that are
# **assumptions**, set from each card's memory roofline for the model ({glue:text}`ch5-assumed`).
# Holding the full length from the
# start overstates demand while a request is still decoding: it is an upper bound. Arrival times
# are stretched by `rate_divisor`, as in MorphServe. The table gives how often demand would exceed
# the capacity over the whole hour and within the busiest 72-second window, beside the mean demand
# over the hour: when the mean alone is above the capacity, the card is too small for the trace,
# bursts or not.

# %%
show_table(overload.assign(trace=overload["trace"].map(reading.trace_name),
                           size=overload["card"].map(capacity.groupby("card")["tokens"].min()))
           .sort_values(["size", "trace", "swapped_layers"]),
           {"card": "card", "trace": "trace", "swapped_layers": "layers in INT4", "capacity_tokens": "capacity (tokens)",
            "mean_demand_tokens": "mean demand (tokens)", "overload_pct_hour": "over capacity, hour (%)",
            "overload_pct_window": "over capacity, busiest 72 s (%)"},
           f"Analytic KV demand against capacity (arrival rate / {p['rate_divisor']:g})", "tbl-ch5-overload",
           formats={"mean_demand_tokens": lambda v: fmt.num(v, 0), "overload_pct_hour": lambda v: fmt.num(v, 1),
                    "overload_pct_window": lambda v: fmt.num(v, 1)})

# %%
caps = capacity.rename(columns={"tokens": "capacity_tokens"})[["card", "swapped_layers", "capacity_tokens"]]
caps["layers in INT4"] = caps["swapped_layers"].astype(str)
rules = alt.Chart(caps).mark_rule(strokeDash=[5, 3]).encode(
    y=alt.Y("capacity_tokens:Q", title="KV tokens"),
    color=alt.Color("layers in INT4:N", sort=[str(k) for k in sorted(caps.swapped_layers.unique())]),
    tooltip=["card", "swapped_layers", "capacity_tokens"])
rows = []
for trace, part in demand.groupby("trace"):
    cells = []
    for card, sub in sorted(part.groupby("card"), key=lambda g: g[0] != small):
        line = alt.Chart(sub).mark_line(color="black").encode(
            x=alt.X("t_s:Q", title="seconds into the busiest 72-s window"), y=alt.Y("kv_tokens:Q", title="KV tokens"))
        cells.append(alt.layer(line, rules.transform_filter(alt.datum.card == card)).properties(
            title=f"{reading.trace_name(trace)}, {card}", width=220, height=150))
    rows.append(alt.hconcat(*cells).resolve_scale(y="independent"))
alt.vconcat(*rows).properties(title="KV demand (black, analytic) against KV capacity (dashed, by layers in INT4)")

# %% [markdown]
# What this does and does not show. The capacity gains are exact arithmetic for the stated budget;
# they depend on the reserve and utilization (a smaller KV budget makes each freed layer count for
# more). The demand curves are an upper bound from a service model that ignores queueing and
# batching: they say *when* a card would be short of KV memory, not what latency users would see.
