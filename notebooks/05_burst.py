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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/morphbook/morphbook/blob/main/notebooks/05_burst.ipynb)
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
profile = "cpu"  # the analysis is the same on both profiles; "gpu" uses a finer time grid
model = "llama-2-7b"  # model SHAPE for the KV arithmetic (MorphServe's Llama-2-7B; weights are not loaded)
seed = 0
results_root = "results"
traces_dir = None  # folder with the Azure CSVs; None: $MORPHBOOK_TRACES, else ../shared/traces next to the repo
rate_divisor = 4.75  # MorphServe divides the Azure arrival rate by 4.75
window_s = 72.0  # MorphServe's replay window
swap_counts = [0, 4, 8, 16]
block_size = 16  # tokens per paged KV block
group_size = 64  # INT4 group size of the swapped layers
reserve_gib = 1.0  # activations + CUDA context, kept out of the KV budget

# %%
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab: the library, and the two public Azure traces (CC-BY-4.0)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/morphbook/morphbook"],
                   check=True)
    import os
    import urllib.request
    os.makedirs("traces", exist_ok=True)
    for f in ("AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv"):
        urllib.request.urlretrieve(
            f"https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data/{f}", f"traces/{f}")
    traces_dir = traces_dir or "traces"

# %%
import dataclasses
import json

import altair as alt
import pandas as pd
from IPython.display import Markdown, display

from morphlib.book import provenance_banner, shown_results
from morphlib.errors import MorphError, install_notebook_handler
from morphlib.kvcache import (CARDS, GIB, busiest_window, capacity_table, kv_bytes_per_token,
                              kv_bytes_per_token_layer, kv_demand, overload_pct)
from morphlib.plotting import setup_altair
from morphlib.results import save_summary
from morphlib.stale import is_stale
from morphlib.traces import TRACE_FILES, binned, burstiness, describe, load_named, resolve_traces_dir

install_notebook_handler()
setup_altair()
if profile not in ("cpu", "gpu"):
    raise MorphError(f"unknown profile {profile!r}: use 'cpu' or 'gpu'")
step_s, poisson_trials = (0.1, 1000) if profile == "gpu" else (0.5, 200)
cards = {k: dataclasses.replace(c, reserve_bytes=reserve_gib * GIB) for k, c in CARDS.items()}
folder = resolve_traces_dir(traces_dir)  # a one-line error if the traces are not there
print(f"traces: {folder}")

# %% [markdown]
# ## The traces
#
# Two one-hour Azure traces (code completion and conversation) with one row per request: arrival
# time, prompt tokens, output tokens. The loader checks every row (field count, timestamp and
# integer formats, no negative counts, timestamps never going back) and stops with a one-line
# error naming the file and line otherwise. The 400-row BurstGPT head is loaded only to check
# its format: it spans ten hours with 38 requests per hour, far too few for burst statistics.

# %%
traces = {name: load_named(name, folder) for name in ("azure-code", "azure-conv")}
traces["burstgpt-head"] = load_named("burstgpt-head", folder) if (folder / TRACE_FILES["burstgpt-head"]).is_file() else None
for t in traces.values():
    for w in (t.warnings if t else []):
        print("warning:", w)
pd.DataFrame([describe(t) for t in traces.values() if t]).round(2)

# %% [markdown]
# ## How bursty are the arrivals?
#
# Requests and tokens per bin of 1, 10 and 60 seconds. The **peak-to-mean** ratio is the busiest
# bin over the average one. It grows with the number of bins even for perfectly random arrivals,
# so each is set against the peak-to-mean of a Poisson process with the same rate and number of
# bins (median of simulations); the **index of dispersion** (variance / mean of the counts) is 1
# for Poisson arrivals and larger when arrivals cluster.

# %%
azure = {k: v for k, v in traces.items() if k.startswith("azure")}
bursts = pd.DataFrame([burstiness(t, b, poisson_trials, seed) for t in azure.values() for b in (1, 10, 60)])
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
capacity = capacity_table(model, cards, swap_counts, block_size, group_size)
print(f"{model}: {kv_bytes_per_token_layer(model)} bytes per token per layer, "
      f"{kv_bytes_per_token(model) / 1024:.0f} KiB per token over all layers")
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
demand_rows, overload_rows = [], []
for name, trace in azure.items():
    slow = trace.slowed(rate_divisor)
    for key, card in cards.items():
        d = kv_demand(slow.arrival_s, slow.context_tokens, slow.generated_tokens, card, step_s)
        t0 = busiest_window(d, window_s)
        win = d[(d.t_s >= t0) & (d.t_s <= t0 + window_s)]
        demand_rows += [{"trace": name, "card": card.name, "t_s": r.t_s - t0, "kv_tokens": r.kv_tokens,
                         "window_start_s": t0} for r in win.itertuples()]
        for row in capacity[capacity.card_key == key].itertuples():
            overload_rows.append({"trace": name, "card": card.name, "swapped_layers": row.swapped_layers,
                                  "capacity_tokens": row.tokens, "mean_demand_tokens": float(d.kv_tokens.mean()),
                                  "overload_pct_hour": overload_pct(d, row.tokens),
                                  "overload_pct_window": overload_pct(win, row.tokens)})
overload = pd.DataFrame(overload_rows)
overload.round(1)

# %%
cap = lambda card_key, k: int(capacity[(capacity.card_key == card_key) & (capacity.swapped_layers == k)].tokens.iloc[0])  # noqa: E731
ov = lambda trace, card_key, k: float(overload[(overload.trace == trace) & (overload.card == cards[card_key].name)  # noqa: E731
                                               & (overload.swapped_layers == k)].overload_pct_hour.iloc[0])
b = bursts.set_index(["trace", "bin_s"])
fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
kmax = max(swap_counts)
headline = {}
for name, short in (("azure-code", "code"), ("azure-conv", "conv")):
    for bin_s in (1, 10):
        headline[f"{short}_peak_to_mean_rps_{bin_s}s"] = fig(
            float(b.loc[(name, bin_s), "peak_to_mean_rps"]), "x",
            f"Azure {short}: peak / mean requests per {bin_s}-s bin (Poisson: "
            f"{b.loc[(name, bin_s), 'poisson_peak_to_mean_rps']:.1f})")
    headline[f"{short}_peak_to_mean_tokens_10s"] = fig(float(b.loc[(name, 10), "peak_to_mean_tokens"]), "x",
                                                       f"Azure {short}: peak / mean tokens per 10-s bin")
headline["kv_kib_per_token"] = fig(kv_bytes_per_token(model) / 1024, " KiB", f"{model}: KV per token (all layers)")
headline["l4_kv_tokens_no_swap"] = fig(cap("L4-24GB", 0), " tokens", f"{model} on L4: KV capacity, FP16")
for k in swap_counts:
    if k:
        headline[f"l4_kv_gain_pct_{k}_layers"] = fig(100 * (cap("L4-24GB", k) / cap("L4-24GB", 0) - 1), " %",
                                                     f"L4: KV capacity gain, {k} layers INT4")
headline[f"h100_kv_gain_pct_{kmax}_layers"] = fig(100 * (cap("H100-80GB", kmax) / cap("H100-80GB", 0) - 1), " %",
                                                  f"80 GB card: KV capacity gain, {kmax} layers INT4")
for short in ("code", "conv"):
    for k in (0, kmax):
        headline[f"l4_{short}_overload_pct_{k}_layers"] = fig(
            ov(f"azure-{short}", "L4-24GB", k), " % of time",
            f"L4, Azure {short} at rate/{rate_divisor:g}: demand above capacity, {k} layers INT4 (analytic)")
rates = pd.concat([binned(t, 10).assign(trace=n) for n, t in azure.items()])
params = {"profile": profile, "model": model, "seed": seed, "traces": {n: TRACE_FILES[n] for n in traces},
          "rate_divisor": rate_divisor, "window_s": window_s, "swap_counts": swap_counts, "block_size": block_size,
          "group_size": group_size, "reserve_gib": reserve_gib, "step_s": step_s, "poisson_trials": poisson_trials,
          "cards": {k: dataclasses.asdict(c) for k, c in cards.items()}}
saved = save_summary("burst", params, headline, results_root, extra_files={
    "traces.json": [describe(t) for t in traces.values() if t], "burstiness.json": bursts,
    "rates_10s.json": rates, "capacity.json": capacity, "demand_window.json": pd.DataFrame(demand_rows),
    "overload.json": overload})
print(f"saved {saved}")

# %% [markdown]
# ## Results
#
# Drawn from the saved results files.

# %%
summary, root, label = shown_results("burst", results_root)
display(Markdown(provenance_banner(summary, is_stale("burst", summary))))
load = lambda name: pd.DataFrame(json.loads((root / "burst" / name).read_text()))  # noqa: E731
rates, bursts, capacity = load("rates_10s.json"), load("burstiness.json"), load("capacity.json")
demand, overload = load("demand_window.json"), load("overload.json")

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
    title="KV demand (black, analytic) against KV capacity with 0-16 layers in INT4")

# %%
alt.Chart(capacity[capacity.swapped_layers > 0]).mark_bar().encode(
    x=alt.X("swapped_layers:O", title="layers swapped to INT4"), y=alt.Y("gain_pct:Q", title="KV capacity gain (%)"),
    column=alt.Column("card:N", title=None), tooltip=["card", "swapped_layers", "blocks", "tokens", "gain_pct"],
).properties(width=200, height=160, title="What swapped layers buy")

# %%
h = {k: (x["value"] if isinstance(x, dict) else x) for k, x in summary["headline"].items()}
p = summary["provenance"]["params"]
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
