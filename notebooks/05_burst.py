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
#
# MorphServe swaps layers to INT4 *when memory runs short*: when a burst of requests needs more
# KV cache than the GPU holds. Whether that ever happens depends on two things this chapter
# measures before any serving engine runs: **how bursty real arrivals are**, and **how much KV
# capacity a swapped layer buys**. The paper replays 72-second windows of the Azure LLM Inference
# 2023 traces {cite}`splitwise` (arrival rate divided by 4.75) on an NVIDIA L4 (24 GB).
#
# ```{note}
# This is an **analytic first experiment**: trace statistics and KV-cache arithmetic, with a
# deliberately simple service model. The serving engine (queueing, batching, preemption, TTFT and
# TPOT under swaps) comes in a later issue.
# ```

# %% tags=["parameters"]
profile = "cpu"           # the analysis is the same on both profiles; "gpu" uses a finer time grid (and runs anywhere)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: llama-2-7b, the model SHAPE for the KV arithmetic (MorphServe's; no weights loaded)
traces_dir = None         # None: $MORPHLIB_TRACES, else the traces shipped with morphlib (morphlib/data/traces)
rate_divisor = None       # None: 4.75, MorphServe's division of the Azure arrival rate
swap_counts = None        # None: 0, 4, 8 and 16 layers in INT4

# %% [markdown]
# ## Run
#
# The experiment is `morphbook.experiments.burst`: it loads the traces, measures their burstiness,
# and does the KV arithmetic (seconds on any machine; no model is loaded). The banner below says
# whose numbers the tables and figures show.

# %%
from morphbook.experiments.burst import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, traces_dir=traces_dir, rate_divisor=rate_divisor,
                                          swap_counts=swap_counts))
shown = run_chapter("burst", run, cfg, results_root)

# %% tags=["hide-input"]
import altair as alt
from IPython.display import Markdown, display

h, p = shown.headline, shown.params
traces, bursts, capacity = shown.frame("traces.json"), shown.frame("burstiness.json"), shown.frame("capacity.json")
rates, demand, overload = shown.frame("rates_10s.json"), shown.frame("demand_window.json"), shown.frame("overload.json")

# %% [markdown]
# ## The traces
#
# Two one-hour Azure traces (code completion and conversation) with one row per request: arrival
# time, prompt tokens, output tokens. They ship with `morphlib` (`morphlib/data/traces`, CC-BY-4.0,
# with their licence and a README of origin and columns). The loader checks every row (field count,
# timestamp and integer formats, no negative counts, timestamps never going back) and stops with a
# one-line error naming the file and line otherwise. The 400-row BurstGPT head is loaded only to
# check its format: it spans ten hours with 38 requests per hour, far too few for burst statistics.
# Every table and chart below is drawn from the results files the banner above names.

# %%
traces.round(2)

# %% [markdown]
# ## How bursty are the arrivals?
#
# Requests and tokens per bin of 1, 10 and 60 seconds. The **peak-to-mean** ratio is the busiest
# bin over the average one. It grows with the number of bins even for perfectly random arrivals,
# so each is set against the peak-to-mean of a Poisson process with the same rate and number of
# bins (median of simulations); the **index of dispersion** (variance / mean of the counts) is 1
# for Poisson arrivals and larger when arrivals cluster.

# %%
bursts[["trace", "bin_s", "mean_rps", "peak_rps", "peak_to_mean_rps", "poisson_peak_to_mean_rps",
        "dispersion_rps", "peak_to_mean_tokens"]].round(2)

# %% [markdown]
# ## KV capacity, and what swapped layers add
#
# For the model shape, one token of KV cache takes `2 * kv_heads * head_dim * 2` bytes per layer;
# a paged block holds `block_size` tokens for all layers. The KV budget is 90 % of the card's
# nominal memory minus the FP16 weights minus a reserve. A swapped layer frees its FP16 bytes minus
# its INT4 bytes; each freed range holds a whole number of blocks.

# %%
print(f"{p['model']}: {h['kv_kib_per_token']:.0f} KiB of KV per token over all layers; paged blocks of "
      f"{p['block_size']} tokens; INT4 g{p['group_size']}; reserve {p['reserve_gib']:g} GiB per card")
capacity[["card", "swapped_layers", "weights_gib", "kv_budget_gib", "blocks", "tokens", "gain_pct"]].round(2)

# %% [markdown]
# ## Demand against capacity
#
# Each request is assumed to hold its prompt + output tokens of KV from arrival until it is done,
# after `prompt / prefill rate + output * time per output token`, with per-card speeds that are
# **assumptions** (L4: 4,000 prompt tokens/s and 45 ms per output token, from its 300 GB/s memory
# roofline for a 13.5 GB model; H100: 20,000 tokens/s and 15 ms). Holding the full length from the
# start overstates demand while a request is still decoding: it is an upper bound. Arrival times
# are stretched by `rate_divisor`, as in MorphServe. We report how often demand would exceed the
# capacity over the whole hour, and draw the busiest 72-second window.

# %%
overload.round(1)

# %%
alt.Chart(rates).mark_line(interpolate="step-after").encode(
    x=alt.X("t_s:Q", title="seconds since the first request"),
    y=alt.Y("requests_per_s:Q", title="requests / s (10-s bins)"),
    tooltip=["trace", "t_s", "requests_per_s", "tokens_per_s"],
).properties(width=560, height=150).facet(row=alt.Row("trace:N", title=None)).resolve_scale(y="independent").properties(
    title="Arrival rate over the hour")

# %%
caps = capacity.rename(columns={"tokens": "capacity_tokens"})[["card", "swapped_layers", "capacity_tokens"]]
caps["layers INT4"] = caps["swapped_layers"].astype(str)
lines = alt.Chart(demand).mark_line(color="black").encode(
    x=alt.X("t_s:Q", title="seconds into the busiest 72-s window"), y=alt.Y("kv_tokens:Q", title="KV tokens"))
rules = alt.Chart(caps).mark_rule(strokeDash=[5, 3]).encode(
    y="capacity_tokens:Q", color=alt.Color("layers INT4:N", sort=[str(k) for k in sorted(caps.swapped_layers.unique())]),
    tooltip=["card", "swapped_layers", "capacity_tokens"])
charts = []
for (trace, card), part in sorted(demand.groupby(["trace", "card"]), key=lambda g: (g[0][0], "L4" not in g[0][1])):
    charts.append(alt.layer(lines.properties(data=part), rules.transform_filter(alt.datum.card == card)).properties(
        title=f"{trace} on {card}", width=260, height=170))
alt.vconcat(*[alt.hconcat(*charts[i:i + 2]) for i in range(0, len(charts), 2)]).properties(
    title=f"KV demand (black, analytic) against KV capacity with {min(p['swap_counts'])}-{max(p['swap_counts'])} "
          "layers in INT4")

# %%
alt.Chart(capacity[capacity.swapped_layers > 0]).mark_bar().encode(
    x=alt.X("swapped_layers:O", title="layers swapped to INT4"), y=alt.Y("gain_pct:Q", title="KV capacity gain (%)"),
    column=alt.Column("card:N", title=None), tooltip=["card", "swapped_layers", "blocks", "tokens", "gain_pct"],
).properties(width=200, height=160, title="What swapped layers buy")

# %%
kmax = max(p["swap_counts"])
pois = bursts.set_index(["trace", "bin_s"])["poisson_peak_to_mean_rps"]
disp = bursts.set_index(["trace", "bin_s"])["dispersion_rps"]
display(Markdown("\n".join([
    f"* Azure **code**: the busiest 1-s bin holds **{h['code_peak_to_mean_rps_1s']:.1f}x** the mean request "
    f"count (Poisson arrivals at the same rate: {pois[('azure-code', 1)]:.1f}x); 10-s bins: "
    f"{h['code_peak_to_mean_rps_10s']:.1f}x (Poisson {pois[('azure-code', 10)]:.1f}x), index of dispersion "
    f"{disp[('azure-code', 10)]:.1f}.",
    f"* Azure **conversation**: {h['conv_peak_to_mean_rps_1s']:.1f}x (Poisson {pois[('azure-conv', 1)]:.1f}x) "
    f"and {h['conv_peak_to_mean_rps_10s']:.1f}x (Poisson {pois[('azure-conv', 10)]:.1f}x), dispersion "
    f"{disp[('azure-conv', 10)]:.1f}. A ratio near the Poisson value is what randomness alone gives.",
    f"* {p['model']}: {h['kv_kib_per_token']:.0f} KiB of KV per token; on the L4 the FP16 model leaves room for "
    f"**{h['l4_kv_tokens_no_swap']:,.0f} tokens**. INT4 layers add "
    + ", ".join(f"{h[f'l4_kv_gain_pct_{k}_layers']:.1f} % ({k} layers)" for k in p["swap_counts"] if k)
    + f" on the L4, but only {h[f'h100_kv_gain_pct_{kmax}_layers']:.1f} % ({kmax} layers) on an 80 GB card, "
    "where the same freed bytes are a small part of a much larger budget. (MorphServe reports up to "
    "+32.97 % in its own setting.)",
    f"* Under the simple service model, L4 demand exceeds capacity for "
    f"{h['l4_conv_overload_pct_0_layers']:.1f} % of the conversation hour with no layer swapped and "
    f"{h[f'l4_conv_overload_pct_{kmax}_layers']:.1f} % with {kmax}; code: {h['l4_code_overload_pct_0_layers']:.1f} % "
    f"and {h[f'l4_code_overload_pct_{kmax}_layers']:.1f} %.",
])))

# %% [markdown]
# What this does and does not show. The capacity gains are exact arithmetic for the stated budget;
# they depend on the reserve and utilization (a smaller KV budget makes each freed layer count for
# more). The demand curves are an upper bound from a service model that ignores queueing and
# batching: they say *when* a card would be short of KV memory, not what latency users would see.
# Measuring TTFT and TPOT when a real engine swaps layers during these windows is the next issue.
