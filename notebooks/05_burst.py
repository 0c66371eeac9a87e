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
profile = "cpu"           # "cpu": the CPU instrument, measured now (CI); "gpu": merge the GPU slices' replays on disk
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
traces_dir = None         # None: $MORPHLIB_TRACES, else the traces shipped with morphlib (morphlib/data/traces)
replays_dir = None        # None: the profile's (gpu: results/burst-replays; cpu: none, measured now)
workers = None            # None: every CPU for the simulator's worker processes

# %%
from morphbook.experiments.burst import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(traces_dir=traces_dir, replays_dir=replays_dir, workers=workers))
shown = run_chapter("burst", run, cfg, results_root, needs="engine_replays")

# %% tags=["remove-cell"]
import tomllib

import altair as alt
import pandas as pd
from IPython.display import Markdown, display

from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.readings import burst as reading
from morphbook.publish.readings import serving
from morphbook.publish.tables import show_table

h, p = shown.headline, shown.params
prereg = shown.json("preregistration.json")
plan = tomllib.loads(prereg["text"])
labels = {k: v["label"] for k, v in plan["policies"].items()}
cal = shown.json("calibration.json")
setting = next(iter(cal))
replays = shown.json("replays.json")
policies = shown.json("policies.json")
simulated = pd.DataFrame(shown.json("simulated.json"))
validation = shown.json("validation.json")
leads = shown.json("leads.json")
sweep = pd.DataFrame(shown.json("sweep.json"))
traces, bursts, capacity = shown.frame("traces.json"), shown.frame("burstiness.json"), shown.frame("capacity.json")
rates = shown.frame("rates_10s.json")
texts = serving.texts(h, policies, replays["todo"], leads, validation["bounds"], labels, setting)
glue_all({**texts, "gain": reading.gain_sentence(shown.json("capacity.json"), p["model"], h["kv_kib_per_token"]),
          "bursts": " ".join(reading.burstiness_sentence(shown.json("burstiness.json"), t, 1) for t in ("azure-code", "azure-conv")),
          "setting": cal[setting]["label"]}, prefix="ch5-")


def window_label(key):
    return serving.window_name(key).removeprefix("the ")


def pol(name):
    return labels.get(name, name)


# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch5-replays`
#
# {glue:md}`ch5-effect`
#
# {glue:md}`ch5-ablation`
#
# {glue:md}`ch5-simulator`
#
# {glue:md}`ch5-verdict`
#
# {glue:md}`ch5-bursts` {glue:md}`ch5-gain` (MorphServe reports up to +32.97 % in its own setting {cite}`morphserve`.)

# %% [markdown]
# ## The question
#
# MorphServe {cite}`morphserve` claims that under bursts, swapping less important 16-bit decoder layers for
# INT4 copies at runtime and giving the freed memory to the KV cache cuts SLO violations by 92.45 % and
# P95 time to first token (TTFT) by 2.2–3.9× against 16-bit serving. This chapter replays windows of the
# Azure LLM Inference 2023 traces {cite}`splitwise` on this book's engine, on identical arrivals and
# prompts for every policy, in the setting {glue:text}`ch5-setting`, and compares a simulator built on the
# engine's own core (scheduler, block pool, morph planner, controller; only the clock and the step time
# replaced) against every engine replay.
#
# Two questions sit inside the claim, and the ablations split them: does the **freed KV capacity** shorten
# the queue, and what does **INT4 compute** cost or save per step? On this engine INT4 linears are slower
# than 16-bit ones at mid-size batches ({doc}`/book/benchmarks`), so the two can pull apart.

# %% [markdown]
# ## Fixed in advance
#
# Every choice below — windows, the rate rule, SLO multipliers, controller thresholds and dwell times,
# policies, layer orders, repeat counts, validation bounds, the slice matrix and the verdict rule — is in
# the pre-registration file, committed before any replay existed; every replay records its digest, and one
# made under another pre-registration is never merged.

# %% tags=["remove-input"]
display(Markdown(f"Pre-registration `{prereg['digest']}` (`src/morphbook/experiments/burst_preregistration.toml`):"))
display(Markdown("````{dropdown} The pre-registration file\n```toml\n" + prereg["text"] + "\n```\n````"))

# %% [markdown]
# ## The traces
#
# Two one-hour Azure traces (code completion and conversation) with one row per request: arrival time,
# prompt tokens, output tokens, and a 400-row BurstGPT sample (ten hours, far too sparse to replay as it
# is: replayed time-compressed by the rate rule, and labelled so). They ship with `morphlib`
# (`morphlib/data/traces`, CC-BY-4.0). The loader checks every row and stops with a one-line error
# naming the file and line otherwise.

# %%
show_table(traces.assign(trace=traces["trace"].map(reading.trace_name)),
           {"trace": "trace", "requests": "requests", "span_s": "span (s)", "mean_rate": "requests / s",
            "context_median": "median prompt (tokens)", "generated_median": "median output (tokens)",
            "dropped": "rows dropped"},
           "The request traces", "tbl-ch5-traces",
           formats={"span_s": lambda v: fmt.num(v, 0), "mean_rate": fmt.auto, "context_median": lambda v: fmt.num(v, 0),
                    "generated_median": lambda v: fmt.num(v, 0)})

# %%
show_table(bursts.assign(trace=bursts["trace"].map(reading.trace_name)),
           {"trace": "trace", "bin_s": "bin (s)", "mean_rps": "mean requests / s", "peak_rps": "peak requests / s",
            "peak_to_mean_rps": "peak / mean", "poisson_peak_to_mean_rps": "Poisson peak / mean",
            "dispersion_rps": "index of dispersion", "peak_to_mean_tokens": "peak / mean tokens"},
           "Burstiness of the arrivals per bin size (Poisson: the same rate, median of simulations)", "tbl-ch5-bursts",
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
# For the model shape, one token of KV cache takes `2 * kv_heads * head_dim * 2` bytes per layer; a paged
# block holds `block_size` tokens for all layers. The KV budget is the card's usable memory minus the FP16
# weights minus a reserve; a swapped layer frees its FP16 bytes minus its INT4 bytes, and each freed range
# holds a whole number of blocks. This arithmetic sizes the engine's pool too (`morphlib.cards`): the same
# card is the same number of bytes in both.

# %%
show_table(capacity, {"card": "card", "swapped_layers": "layers in INT4", "weights_gib": "weights (GiB)",
                      "kv_budget_gib": "KV budget (GiB)", "blocks": "KV blocks", "tokens": "KV tokens",
                      "gain_pct": "capacity gain (%)"},
           f"KV capacity of a {p['model']}-shape model per card, by layers in INT4 (INT4 g{p['group_size']}, "
           f"blocks of {p['block_size']} tokens, {p['reserve_gib']:g} GiB reserve)", "tbl-ch5-capacity",
           formats={"weights_gib": fmt.num, "kv_budget_gib": fmt.num, "gain_pct": lambda v: fmt.num(v, 1)})

# %% [markdown]
# ## How a replay is made
#
# **Windows** are chosen from arrivals alone: at a trace-wide rate, a window lasts 72 s of replay time
# (the busiest by tokens arriving, and a median one), after a 10-s pre-roll whose requests fill the
# engine but are not measured, and every request is served to the end (a full drain). Requests longer
# than the context are clipped and counted. Each replay starts on a reset engine, serves a warm-up of
# the trace's first shapes, and has its CUDA graphs captured ahead for the states its order passes
# through.
#
# **The rate** is fixed by a rule before any policy runs: on 16-bit static serving, simulated with the
# step-time model fitted on the micro-benchmark, each window is swept over a rate grid and the rate
# whose share of requests over the TTFT SLO is closest to 30 % within 10–50 % is kept. The paper's rate
# divisors (Azure ÷ 4.75 on an L4) do not carry over: an H100 or H200 computes about ten times faster
# than an L4 but copies over PCIe only about twice as fast, so the same arrivals on the same memory
# budget are a different load, and a swap costs relatively more time.
#
# **SLOs** come from the same engine, unloaded and 16-bit: TTFT SLO = 5× its TTFT at the window's median
# prompt; TPOT SLO = 5× its batch-1 time per output token (also reported at 2× and 10×).

# %% tags=["remove-input"]
c = cal[setting]
if not c.get("calibrated"):
    display(Markdown(f"The setting's calibration slice (`{setting}.calibrate`: micro-benchmark, unloaded latencies, "
                     "rate rule) has not run yet: no rate, SLO or simulator number exists for it."))
else:
    sw = pd.DataFrame(c["rate_sweep"])
    sw["window"] = (sw["trace"] + "-" + sw["kind"]).map(window_label)
    band = alt.Chart(pd.DataFrame({"lo": [10.0], "hi": [50.0]})).mark_rect(opacity=0.12).encode(
        y=alt.Y("lo:Q", title="requests over the TTFT SLO (%)"), y2="hi:Q")
    lines = alt.Chart(sw).mark_line(point=True).encode(
        x=alt.X("rate:Q", scale=alt.Scale(type="log"), title="trace-wide arrival rate (requests / s)"),
        y=alt.Y("ttft_violation_pct:Q", title="requests over the TTFT SLO (%)"),
        color=alt.Color("window:N", title="window"), tooltip=["window", "rate", "ttft_violation_pct", "ttft_p95_s"])
    display(alt.layer(band, lines).properties(width=480, height=220,
                                              title="The rate rule: 16-bit static serving on the simulator (band: 10–50 %)"))
    show_table([{"window": window_label(k.replace(":", "-")), "rate": r["rate"], "violation": r["ttft_violation_pct"],
                 "in band": r["in_band"], **{x: c["windows"].get(k.replace(":", "-"), {}).get(x) for x in
                                              ("requests", "median_prompt", "slo_ttft_s", "slo_tpot_s")}}
                for k, r in c["rates"].items()],
               {"window": "window", "rate": "rate (requests / s)", "violation": "16-bit TTFT violations, simulated (%)",
                "in band": "within 10–50 %", "requests": "measured requests", "median_prompt": "median prompt (tokens)",
                "slo_ttft_s": "TTFT SLO (s)", "slo_tpot_s": "TPOT SLO (s)"},
               "Rates fixed by the rule, and the SLOs of each window", "tbl-ch5-rates",
               formats={"violation": lambda v: fmt.num(v, 1), "slo_ttft_s": fmt.auto, "slo_tpot_s": fmt.auto})

# %% [markdown]
# ## Policies on identical arrivals
#
# Every policy replays the same arrivals and prompts of a window: 16-bit static; all layers INT4 static;
# MorphServe-style morphing (swap four layers of an order when the KV demand — blocks in use plus those
# the queue needs — stays above 85 % for 100 ms, restore last-in-first-out after 2 s below 60 % when the
# freed tail can be vacated, never within 5 s of the opposite action) with three layer orders (chapter
# 2's calibrated middle block, greedy LIS, front to back); the two ablations (INT4 compute without the
# grown pool; the grown pool with 16-bit compute, an oracle whose KV blocks sit outside the budget); and
# a predictive controller the paper does not have. Intervals are 95 % bootstrap intervals over the
# window's requests (paired across policies) and over repeats. The quality cost is the time-weighted
# held-out perplexity change of the layers running INT4 (chapter 2's measurements for the matching
# strategy and count).

# %% tags=["remove-input"]
ci = lambda v, d=1: fmt.interval(*v, d) if v and v[0] is not None else "n/a"  # noqa: E731
change = lambda r: (f"{fmt.num(-r['slo_violation_reduction_vs_fp16'], 1, signed=True)} ({ci([-x if x is not None else None for x in r['slo_violation_reduction_vs_fp16_ci95'][::-1]])})"  # noqa: E731
                    if "slo_violation_reduction_vs_fp16" in r else "–")
speedup = lambda r: (f"{fmt.times(r['p95_ttft_speedup_vs_fp16'])} ({ci(r['p95_ttft_speedup_vs_fp16_ci95'], 2)})"  # noqa: E731
                     if "p95_ttft_speedup_vs_fp16" in r else "–")
mine = [r for r in policies if r["setting"] == setting]
if not mine:
    display(Markdown("**No engine replay yet.** The simulator's predictions for every policy follow below, once the "
                     "calibration slice has run."))
for w in sorted({r["window"] for r in mine}):
    rows = [{**r, "policy": pol(r["policy"]), "slo_ci": ci(r.get("slo_violation_pct_ci95")), "change": change(r),
             "speedup": speedup(r), "swaps": f"{fmt.num(r['swaps'], 0)} / {fmt.num(r['restores'], 0)}"}
            for r in sorted(mine, key=lambda r: list(labels).index(r["policy"])) if r["window"] == w]
    show_table(rows, {"policy": "policy", "replays": "replays", "slo_violation_pct": "SLO violations (%)",
                      "slo_ci": "95 % CI", "ttft_violation_pct": "TTFT SLO missed (%)",
                      "tpot_violation_pct": "TPOT SLO missed (%)", "change": "violations vs 16-bit (%, CI)",
                      "goodput": "goodput (req / s)", "quality_cost": "quality cost (ppl %)"},
               f"Engine replays, {window_label(w)}: SLOs", f"tbl-ch5-slo-{w}",
               formats={"slo_violation_pct": lambda v: fmt.num(v, 1), "ttft_violation_pct": lambda v: fmt.num(v, 1),
                        "tpot_violation_pct": lambda v: fmt.num(v, 1), "goodput": fmt.auto,
                        "quality_cost": lambda v: fmt.num(v, 2)})
    show_table(rows, {"policy": "policy", "p50_ttft_s": "TTFT P50 (s)", "p95_ttft_s": "TTFT P95 (s)",
                      "p99_ttft_s": "TTFT P99 (s)", "speedup": "P95 TTFT speedup (CI)", "p50_tpot_ms": "TPOT P50 (ms)",
                      "p99_tpot_ms": "TPOT P99 (ms)", "preemptions": "preemptions", "recomputed_tokens": "tokens recomputed",
                      "swaps": "swaps / restores", "int4_layers_time_weighted": "INT4 layers (time-weighted)"},
               f"Engine replays, {window_label(w)}: latencies and what the engine did (means over repeats)",
               f"tbl-ch5-latency-{w}",
               formats={k: fmt.auto for k in ("p50_ttft_s", "p95_ttft_s", "p99_ttft_s", "p50_tpot_ms", "p99_tpot_ms")}
               | {"preemptions": lambda v: fmt.num(v, 0), "recomputed_tokens": lambda v: fmt.num(v, 0),
                  "int4_layers_time_weighted": lambda v: fmt.num(v, 1)})

# %% tags=["remove-input"]
if len(simulated):
    sim = simulated[simulated.setting == setting].copy()
    sim["policy label"] = sim["policy"].map(pol)
    sim["window label"] = sim["window"].map(window_label)
    display(alt.Chart(sim).mark_bar().encode(
        x=alt.X("slo_violation_pct:Q", title="requests violating an SLO (%), simulator"),
        y=alt.Y("policy label:N", title="policy", sort=[pol(k) for k in labels]),
        color=alt.Color("quality_cost_pct:Q", title="quality cost (ppl %)", scale=alt.Scale(scheme="oranges")),
        tooltip=["policy label", "slo_violation_pct", "ttft_p95_s", "tpot_p99_ms", "quality_cost_pct"],
    ).properties(width=320, height=160).facet(column=alt.Column("window label:N", title="window")).properties(
        title="Every policy on the simulator (one replay each, the micro-benchmark's step-time model)"))

# %% [markdown]
# ## Inside a replay
#
# Per policy, the first replay of a window: arrivals, the KV pool's capacity and use, the layers in INT4
# and the queue, in half-second bins.

# %% tags=["remove-input"]
tl = pd.DataFrame(shown.json("timelines.json"))
if len(tl):
    tl = tl[tl.setting == setting]
    w = sorted(tl["window"].unique())[0]
    keep = [k for k in ("fp16-static", "morph-middle", "predictive-middle", "int4-static", "growth-fp16-oracle") if k in set(tl.policy)]
    long = pd.concat([pd.DataFrame({"t": r.t, "arrivals": r.arrivals_per_s, "capacity": r.kv_capacity, "used": r.kv_used,
                                    "int4": r.int4, "queue": r.waiting}).assign(policy=pol(r.policy))
                      for r in tl[(tl.window == w) & tl.policy.isin(keep)].itertuples()])
    base = alt.Chart(long).encode(x=alt.X("t:Q", title="seconds into the replay"),
                                  color=alt.Color("policy:N", title="policy"))
    display(alt.vconcat(
        base.mark_line(color="gray").encode(y=alt.Y("arrivals:Q", title="arrivals / s")).transform_filter(
            alt.datum.policy == pol("fp16-static")).properties(height=80, width=540),
        alt.layer(base.mark_line(strokeDash=[4, 2]).encode(y=alt.Y("capacity:Q", title="KV blocks (dashed: capacity)")),
                  base.mark_line().encode(y="used:Q")).properties(height=140, width=540),
        base.mark_line(interpolate="step-after").encode(y=alt.Y("int4:Q", title="layers in INT4")).properties(height=90, width=540),
        base.mark_line().encode(y=alt.Y("queue:Q", title="queued requests")).properties(height=90, width=540),
    ).properties(title=f"Timeline of {window_label(w)}"))
else:
    display(Markdown("No engine replay yet: no timeline."))

# %% [markdown]
# ## SLO attainment as the SLO moves
#
# The share of requests meeting both SLOs when the SLO is a multiple of the unloaded latencies, from 1×
# to 20× (the chapter's numbers use 5×).

# %% tags=["remove-input"]
att = pd.DataFrame(shown.json("attainment.json"))
if len(att):
    att = att[att.setting == setting].assign(policy=lambda d: d["policy"].map(pol), window=lambda d: d["window"].map(window_label))
    display(alt.Chart(att).mark_line(point=True).encode(
        x=alt.X("multiplier:Q", scale=alt.Scale(type="log"), title="SLO, multiple of the unloaded latency"),
        y=alt.Y("attainment_pct:Q", title="requests meeting both SLOs (%)"), color=alt.Color("policy:N", title="policy"),
        tooltip=["policy", "multiplier", "attainment_pct"]).properties(width=260, height=200).facet(
        column=alt.Column("window:N", title="window")).properties(title="SLO attainment curves (engine replays)"))
else:
    display(Markdown("No engine replay yet: no attainment curve."))

# %% [markdown]
# ## Swapping ahead of a surge
#
# A surge's onset is the moment the 16-bit replay's KV demand reaches the high mark after having been
# below the low mark; a controller's lead time is how long before that onset it asked for its first swap.
#
# {glue:md}`ch5-leads`

# %% tags=["remove-input"]
mine_leads = [r for r in leads if r["setting"] == setting]
if mine_leads:
    show_table([{**r, "window": window_label(r["window"]), "policy": pol(r["policy"])} for r in mine_leads],
               {"window": "window", "policy": "controller", "surge": "surge", "onset_s": "onset (s)",
                "first_swap_s": "first swap asked (s)", "lead_s": "lead time (s)"},
               "Lead times per surge (positive: ahead of the onset)", "tbl-ch5-leads",
               formats={"onset_s": fmt.auto, "first_swap_s": fmt.auto, "lead_s": lambda v: fmt.num(v, 2)})

# %% [markdown]
# ## Does the simulator match the engine?
#
# The simulator is the engine's core on a virtual clock, its step time modelled from dedicated
# micro-benchmarks (prefill chunks, decode batches at two contexts, mixed steps, each at several INT4
# layer counts, decode under side copies, idle steps) and never fitted on the replays it is checked
# against. Each engine replay is replayed on it with the same arrivals, prompts, policy, engine
# configuration and KV blocks; the engine's own run-to-run spread (repeats) is the floor no model can beat.

# %% tags=["remove-input"]
fr = c.get("fit_report") or {}
if fr:
    ho = fr.get("holdout", {})
    display(Markdown(f"Step-time model: {fmt.count(fr['fit']['steps'], 'benchmark step')}, median error "
                     f"{fmt.pct(fr['fit']['median_abs_pct'])} on them; fitted on three scenarios in four, "
                     f"{fmt.pct(ho.get('median_abs_pct'))} median and {fmt.pct(ho.get('p90_abs_pct'))} 90th-percentile "
                     f"error on the fourth; copy factor {fmt.times(fr['copy_factor'])}."))
vrows = [r for r in validation["rows"] if r["setting"] == setting]
if vrows:
    show_table([{**r, "window": window_label(r["window"]), "policy": pol(r["policy"])} for r in vrows],
               {"window": "window", "policy": "policy", "repeat": "repeat", "ttft_p50_s_error_pct": "TTFT P50 error (%)",
                "ttft_p95_s_error_pct": "TTFT P95 error (%)", "ttft_p99_s_error_pct": "TTFT P99 error (%)",
                "tpot_mean_ms_error_pct": "mean TPOT error (%)", "slo_violation_error_pts": "SLO violations error (points)"},
               "Simulator against each engine replay (simulator minus engine)", "tbl-ch5-validation",
               formats={k: (lambda v: fmt.num(v, 1, signed=True)) for k in ("ttft_p50_s_error_pct", "ttft_p95_s_error_pct",
                                                                          "ttft_p99_s_error_pct", "tpot_mean_ms_error_pct",
                                                                          "slo_violation_error_pts")})
srows = [r for r in validation["spread"] if r["setting"] == setting]
if srows:
    show_table([{**r, "window": window_label(r["window"]), "policy": pol(r["policy"])} for r in srows],
               {"window": "window", "policy": "policy", "repeats": "repeats", "ttft_p50_s_spread_pct": "TTFT P50 range (%)",
                "ttft_p95_s_spread_pct": "TTFT P95 range (%)", "tpot_mean_ms_spread_pct": "mean TPOT range (%)",
                "slo_violation_spread_pts": "SLO violations range (points)"},
               "The engine's own run-to-run spread (range over repeats, % of their mean)", "tbl-ch5-spread",
               formats={k: (lambda v: fmt.num(v, 1)) for k in ("ttft_p50_s_spread_pct", "ttft_p95_s_spread_pct",
                                                              "tpot_mean_ms_spread_pct", "slo_violation_spread_pts")})
vr = shown.json("virtual_replay.json")
for name, v in vr.items():
    display(Markdown(f"Deterministic check ({name}): the CPU engine with real forward passes on a virtual clock replayed "
                     f"the MorphServe-style policy twice with {'identical' if v['repeatable'] else '**different**'} records "
                     f"(digest `{v['digests'][0][:12]}`), {'equal to' if v['matches_simulator'] else '**unlike**'} the "
                     f"simulator's ({v['steps']} steps, {v['swaps']} swaps)."))

# %% [markdown]
# ## What the GPU cannot: the simulator's sweep
#
# On the fitted model, in parallel worker processes: every whole window of each trace (at its median
# window's rate), the whole rate grid on the busiest windows, the controller's high mark and persistence,
# the three layer orders (same shapes: the same timing, as they must), and other cards' memory budgets
# with this GPU's step times.

# %% tags=["remove-input"]
if len(sweep):
    sw = sweep[sweep.setting == setting].copy()
    sw["policy"] = sw["policy"].map(pol)
    tiled = sw[sw.what == "tiled"]
    if len(tiled):
        display(alt.Chart(tiled).mark_boxplot().encode(
            x=alt.X("slo_violation_pct:Q", title="requests violating an SLO (%), per window"),
            y=alt.Y("policy:N", title="policy"), color=alt.Color("policy:N", title="policy", legend=None)
        ).properties(width=420, height=90).facet(row=alt.Row("trace:N", title="trace")).properties(
            title="Every whole window of each trace, simulated"))
    byrate = sw[sw.what == "rate"]
    if len(byrate):
        display(alt.Chart(byrate).mark_line(point=True).encode(
            x=alt.X("rate:Q", scale=alt.Scale(type="log"), title="trace-wide arrival rate (requests / s)"),
            y=alt.Y("slo_violation_pct:Q", title="requests violating an SLO (%)"), color=alt.Color("policy:N", title="policy"),
        ).properties(width=260, height=180).facet(column=alt.Column("trace:N", title="trace")).properties(
            title="Busiest windows across the rate grid, simulated"))
    thr = sw[sw.what == "threshold"]
    if len(thr):
        show_table(thr.sort_values(["trace", "high", "persist_s"]),
                   {"trace": "trace", "high": "high mark", "persist_s": "persistence (s)",
                    "slo_violation_pct": "SLO violations (%)", "ttft_p95_s": "P95 TTFT (s)", "swaps": "swaps"},
                   "The MorphServe-style controller's thresholds on the busiest windows, simulated", "tbl-ch5-thresholds",
                   formats={"slo_violation_pct": lambda v: fmt.num(v, 1), "ttft_p95_s": fmt.auto})
    cards = sw[sw.what == "card"]
    if len(cards):
        show_table(cards.sort_values(["trace", "card", "policy"]),
                   {"trace": "trace", "card": "memory budget of", "policy": "policy", "kv_main_blocks": "KV blocks",
                    "slo_violation_pct": "SLO violations (%)", "ttft_p95_s": "P95 TTFT (s)"},
                   "Other cards' memory budgets with this GPU's step times, simulated", "tbl-ch5-cards",
                   formats={"slo_violation_pct": lambda v: fmt.num(v, 1), "ttft_p95_s": fmt.auto})
else:
    display(Markdown("No sweep: the calibration slice has not run yet."))

# %% [markdown]
# ## Replays on disk
#
# Each GPU call runs a named slice (a trace window and a few policies) and leaves one file per replay with
# its own provenance; this page merges every one of them. A replay made by code that has changed since is
# stale: listed here, left out of the numbers, and re-run by its slice.

# %% tags=["remove-input"]
idx = [r for r in replays["index"] if r["setting"] == setting]
show_table([{"key": r["key"] or r["file"], "state": r["state"] + (f": {r['why']}" if r["why"] else ""),
             "made": r["made"] or "n/a"} for r in idx] or [{"key": "none", "state": "no record on disk", "made": "n/a"}],
           {"key": "record", "state": "state", "made": "device, commit, date"},
           f"Records of the {setting} setting", "tbl-ch5-records")
todo = replays["todo"]
if todo:
    show_table([{"slice": t["slice"], "missing": len(t["missing"]), "stale": len(t["stale"])} for t in todo],
               {"slice": "slice", "missing": "replays missing", "stale": "replays stale"},
               "Slices still to run, in order (one device call each; the reproduce page gives the command)", "tbl-ch5-todo")

# %% [markdown]
# ## The paper's comparison

# %% tags=["remove-input"]
show_table(shown.json("comparison.json"), {"aspect": "aspect", "paper": "MorphServe (paper)", "here": "this book"},
           "The paper's headline beside ours, and every difference in setup", "tbl-ch5-comparison")

# %% [markdown]
# ## Closing note
#
# {glue:md}`ch5-verdict`
#
# {glue:md}`ch5-effect`
#
# {glue:md}`ch5-ablation`
#
# What these numbers do and do not show. They are one engine's, on one GPU, with an L4's memory budget
# and this book's INT4 kernels; a window is 72 s of one trace. The simulator's sweep widens the view to
# every window, other rates, thresholds and budgets, but it is only as good as its validation above.
