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
# # Overlapping swaps with decoding

# %% tags=["parameters"]
profile = "cpu"           # "cpu": a tiny random Llama on the CPU, for CI; "gpu": the published numbers (needs CUDA)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
models = None             # None: the profile's models (gpu: shape:llama-2-7b, smollm2-135m; cpu: tiny)
device = None             # None: CUDA when available, else the CPU; or "cuda" / "cpu"

# %%
from morphbook.experiments.overlap import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(models=models, device=device))
shown = run_chapter("overlap", run, cfg, results_root, needs="engine")  # not old-format results

# %% tags=["remove-cell"]
import altair as alt
import pandas as pd

from morphbook.experiments.overlap import MODES, TARGETS
from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.plotting import box_stats, boxes
from morphbook.publish.readings import overlap as reading
from morphbook.publish.tables import show_table

H, P, raw_h = shown.headline, shown.params, shown.summary["headline"]
M, R = shown.json("models.json"), shown.frame("runs.json")
glue_all(reading.texts(raw_h, M, P["block_layers"]), prefix="ch4-")
glue_all({"cpu": ("**CPU run.** A tiny random Llama decodes eagerly on a shared CPU and its copies are synchronous "
                  "memcpy: the numbers exercise the code and the records, not a GPU, and no target is judged."
                  if "CPU" in H["engine"] else f"Measured on the engine: {H['engine']}."),
          "models": "; ".join(f"{m['model']} ({m['weights']} weights) at batch {', '.join(m['batches'])}" for m in M)},
         prefix="ch4-")
NAMES = {"none": "no swap", "side": "side stream", "sync": "synchronous"}
ci = lambda c: "n/a" if not c or c.get("ci95") is None else f"{fmt.num(c['mean'], 3)} ({fmt.interval(*c['ci95'], 3)})"  # noqa: E731

# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch4-cpu`
#
# {glue:md}`ch4-answer`
#
# {glue:md}`ch4-tpot`
#
# {glue:md}`ch4-precision`
#
# {glue:md}`ch4-checks`

# %% [markdown]
# ## The question
#
# MorphServe swaps layers *while requests are served*: the host-to-GPU copies run on a side stream in
# small paced pieces and the new precision takes effect at a token boundary, so decoding should barely
# notice. This chapter tests that where it matters: on the serving engine (`morphlib.engine`), whose
# decode step with CUDA graphs is GPU-bound (the Llama-2-7B shape runs near its HBM roofline), so a copy
# has real work to hide behind and real memory bandwidth to contend for. A fixed batch decodes 256 timed
# steps; every 32 steps an event is asked for, in this order and again: swap a 16-layer middle block to
# INT4, restore it, swap its first layer alone, restore it. Three modes, interleaved over five rounds:
#
# * **no swap**: no event (the baseline);
# * **side stream**: the engine's swaps and restores (copies paced on its copy stream; each layer commits
#   at the first step boundary after its bytes landed);
# * **synchronous**: the control. The same layers switch precision at the *same* steps as in that round's
#   side-stream run (its commits are replayed as synchronous requests: the copy runs on the compute
#   stream and commits at once), so both runs decode under one precision schedule — they must sample the
#   same greedy tokens — and the steps that carry the copies show what a swap costs when nothing hides it.
#
# Models: {glue:text}`ch4-models`. A 7B step at batch 64 takes about 12 ms: five rounds of three
# 256-step runs there would add about 47 s to a chapter whose device time is budgeted at 180 s, so the
# 7B shape stops at batch 32 (memory would allow 64). Every state the fixed swap order passes through is
# captured as a CUDA graph before the first run; **a run with any lazy capture, or with fewer than 95 %
# of its timed steps replaying a graph, is invalid**, and then no target is judged.

# %% [markdown]
# ## What is read from the records
#
# Every number comes from the engine's own records (`StepRecord`, `MorphOp`) by rules fixed before any
# measurement (`morphbook.experiments.swapruns` and `overlap`):
#
# * **TPOT**: the mean gap between the ends of consecutive timed steps (each step gives every sequence one
#   token); its ratio to *no swap* per round, mean over rounds with a 95 % t interval.
# * **Inter-token latency**: P50, P99 and the maximum over every gap of every round.
# * A step is **quiet** when no copy is in flight and nothing commits at its boundary; a step's
#   **baseline** is the median of its 4 nearest quiet steps in the same morph state (a multi-layer swap's
#   intermediate states, one step each, are read off the line between the nearest quiet states with fewer
#   and more INT4 layers). The **boundary stall** is a commit step minus its baseline; the
#   **overlapped-step slowdown** is the overlapped steps' total over their baselines'.
# * **Latency**: from an event's request to the end of the first step computing with all its layers,
#   against the isolated copy time of its bytes (the same ops on the idle engine in this run, chapter 3's
#   mechanism) plus one and two steps.
# * **Precision**: each quiet step of a side-stream run against the *no swap* run's step at the same index
#   (same round, same context) gives the factor a step takes at that number of INT4 layers; the side-stream
#   runs' time then splits into the precision schedule's part and the rest (the overlap).

# %% [markdown]
# ## TPOT and inter-token latency

# %%
rows = [{"model": m["model"], "batch": int(b), "none": r["tpot_ms"]["none"]["mean"], "side": ci(r["tpot_ratio_side"]),
         "sync": ci(r["tpot_ratio_sync"]), "prec": ci(r["tpot_ratio_side_precision_only"]),
         "over": ci(r["tpot_ratio_side_overlap_only"]), "p99s": r["p99_itl_ratio_side"], "p99y": r["p99_itl_ratio_sync"],
         "maxs": r["itl_ms"]["side"]["max"], "maxy": r["itl_ms"]["sync"]["max"], "match": min(r["tokens_match"]),
         "valid": r["valid"]} for m in M for b, r in m["batches"].items()]
show_table(rows, {"model": "model", "batch": "batch", "none": "TPOT, no swap (ms)", "side": "side / no swap (95 % CI)",
                  "sync": "synchronous / no swap (95 % CI)", "prec": "side: precision part", "over": "side: overlap part"},
           "Time per output token against no swap, and its split into what INT4 compute changes and what remains",
           "tbl-ch4-tpot", formats={"none": fmt.auto})
show_table(rows, {"model": "model", "batch": "batch", "p99s": "P99 ITL side / no swap", "p99y": "P99 ITL sync / no swap",
                  "maxs": "max ITL side (ms)", "maxy": "max ITL sync (ms)", "match": "tokens side = sync", "valid": "valid"},
           "Inter-token latency (ITL) against no swap, and whether the side-stream and synchronous runs agree",
           "tbl-ch4-itl", formats={"p99s": lambda v: fmt.num(v, 3), "p99y": lambda v: fmt.num(v, 3),
                                   "maxs": fmt.auto, "maxy": fmt.auto, "match": fmt.frac_pct})

# %%
itl = pd.DataFrame([{"model": r.model, "batch": r.batch, "run": NAMES[r.mode], "ms": x} for r in R.itertuples() for x in r.itl_ms])
order = [NAMES[m] for m in MODES]
boxes(box_stats(itl, ["model", "batch", "run"], "ms"), alt.X("run:N", title="run", sort=order),
      "inter-token latency (ms, log)", alt.Color("run:N", title="run", sort=order), log=True, size=14).properties(
    width=120, height=180).facet(column=alt.Column("batch:O", title="batch"), row=alt.Row("model:N", title="model")).properties(
    title="Every inter-token gap of every round (box: quartiles; whiskers: fastest and slowest)")

# %% [markdown]
# ## FP16 against INT4 at each batch
#
# A quiet step's factor at *j* INT4 layers (its time over the no-swap run's step at the same index): what
# a swap does to TPOT by itself, beside the overlap. The factor at 0 layers compares two 16-bit steps of
# different runs: how far two runs agree at all.

# %%
pf = []
for m in M:
    for b, r in m["batches"].items():
        for j, factor in sorted(r["precision_factors"].items(), key=lambda kv: int(kv[0])):
            pf.append({"model": m["model"], "batch": int(b), "layers": int(j), "factor": factor,
                       "fp16": r["fp16_step_ms"], "step": r["int4_step_ms"][j]})
show_table(pf, {"model": "model", "batch": "batch", "layers": "INT4 layers", "factor": "step / 16-bit step",
                "fp16": "16-bit step (ms)", "step": "step at this many INT4 layers (ms)"},
           "Quiet-step time by number of INT4 layers", "tbl-ch4-precision",
           formats={"factor": lambda v: fmt.num(v, 3), "fp16": fmt.auto, "step": fmt.auto})

# %% [markdown]
# ## Stalls and latency of each event

# %%
show_table(reading.event_rows(M),
           {"model": "model", "batch": "batch", "event": "event", "isolated_copy_ms": "isolated copy (ms)",
            "latency_ms": "side: to use (ms)", "copy_plus_one_step_ms": "copy + 1 step (ms)",
            "copy_plus_two_steps_ms": "copy + 2 steps (ms)", "side_stall_ms": "side: stall (ms)",
            "sync_stall_ms": "sync: stall (ms)", "sync_stall_vs_copy": "sync: stall / copy"},
           "Per event kind (median over its repeats): the side stream's latency from request to use, and the stall "
           "the commit steps carried on the side stream and in the synchronous (sync) mode",
           "tbl-ch4-events", formats={k: fmt.auto for k in ("isolated_copy_ms", "latency_ms", "copy_plus_one_step_ms",
                                                           "copy_plus_two_steps_ms", "side_stall_ms", "sync_stall_ms",
                                                           "sync_stall_vs_copy")})

# %%
st = [{"model": m["model"], "batch": int(b), "stall": r["boundary_stall_ms"]["median"], "p99": r["boundary_stall_ms"]["p99"],
       "max": r["boundary_stall_ms"]["max"], "n": r["boundary_stall_ms"]["n"], "slow": r["overlapped_slowdown"]["value"],
       "slow_ci": r["overlapped_slowdown"]["ci95"], "steps": r["overlapped_slowdown"]["steps"],
       "host_s": r["host_ms_per_layer"]["int4"], "host_r": r["host_ms_per_layer"]["fp16"],
       "bw_s": r["copy_bw_vs_isolated"]["int4"], "bw_r": r["copy_bw_vs_isolated"]["fp16"], "dropped": r["dropped_events"]}
      for m in M for b, r in m["batches"].items()]
formats = {"stall": fmt.auto, "p99": fmt.auto, "max": fmt.auto, "slow": fmt.frac_pct,
           "slow_ci": lambda v: "n/a" if v is None else fmt.frac_interval(*v, 1), "host_s": fmt.auto,
           "host_r": fmt.auto, "bw_s": lambda v: fmt.num(v, 3), "bw_r": lambda v: fmt.num(v, 3)}
show_table(st, {"model": "model", "batch": "batch", "stall": "boundary stall, median (ms)", "p99": "P99 (ms)", "max": "max (ms)",
                "n": "commit steps", "slow": "overlapped-step slowdown", "slow_ci": "95 % CI over events",
                "steps": "overlapped steps"},
           "Side-stream runs: boundary stall and overlapped steps", "tbl-ch4-side", formats=formats)
show_table(st, {"model": "model", "batch": "batch", "host_s": "host time per layer, swap (ms)",
                "host_r": "host time per layer, restore (ms)", "bw_s": "copy bandwidth / isolated, swap",
                "bw_r": "copy bandwidth / isolated, restore", "dropped": "events never asked for"},
           "Side-stream runs: host time and copy bandwidth", "tbl-ch4-side-host", formats=formats)

# %% [markdown]
# ## A timeline
#
# One round of the headline model at its middle batch: the decode steps (grey quiet, orange overlapped by
# copies, red a commit at the boundary) and, beneath them, the copies' chunks (CUDA events placed on the
# steps' wall clock through one event recorded with it), side stream against synchronous. Zoom with the
# mouse wheel.

# %%
tl = shown.json("timeline.json")
KINDS = {"domain": ["quiet", "overlapped", "commit", "chunk"], "range": ["#bbbbbb", "#f58518", "#e45756", "#4c78a8"]}
parts = []
for mode in ("side", "sync"):
    for s in tl[mode]["steps"]:
        if s["index"] >= 0:
            parts.append({"run": NAMES[mode], "start": s["start_ms"], "end": s["end_ms"], "row": "decode steps", "step": s["index"],
                          "kind": "commit" if s["committed"] else ("overlapped" if s["copy_in_flight"] else "quiet"),
                          "ms": s["ms"], "int4": s["int4_layers"]})
    row = "copies (" + ("compute stream" if mode == "sync" else "copy stream") + ")"
    parts += [{"run": NAMES[mode], "start": a, "end": b, "kind": "chunk", "row": row, "step": o["layer"]}
              for o in tl[mode]["ops"] for a, b in o["chunks"]]
alt.Chart(pd.DataFrame(parts)).mark_bar(height=14).encode(
    x=alt.X("start:Q", title="time since the timed window began (ms)"), x2="end:Q", y=alt.Y("row:N", title="steps and copies"),
    color=alt.Color("kind:N", scale=alt.Scale(**KINDS), title="step or copy"),
    tooltip=["run", "kind", "step", "int4", alt.Tooltip("ms:Q", format=".3f")]).properties(width=640, height=70).facet(
    row=alt.Row("run:N", title="run")).resolve_scale(y="independent").properties(
    title=f"{tl['model']}, batch {tl['batch']}, round {tl['round'] + 1}").interactive()

# %% [markdown]
# ## The targets
#
# The targets for an H100/H200, each at the headline model's worst batch, met or missed as the
# data says (a CPU run, or an invalid one, judges none).

# %%
show_table([{"figure": raw_h[k]["label"], "value": raw_h[k]["value"], "target": raw_h[k]["target"],
             "verdict": reading.judged(raw_h[k]).strip("*")} for k in TARGETS],
           {"figure": "figure", "value": "value", "target": "target", "verdict": "verdict"},
           "Chapter 4's targets", "tbl-ch4-targets", formats={"value": lambda v: fmt.num(v, 3)})

# %% [markdown]
# Reading guide. The synchronous control pays the whole copy inside the steps that carry it, so its
# stall should match the isolated copy time of the same bytes; the side stream pays only what the overlap
# costs the steps it shares the GPU with (copy-engine and HBM contention) plus the commit (a
# device-to-device copy of the INT4 head, and the new state's graph). The difference between the two is
# this chapter's answer. A swap also changes what a step computes: at small batches INT4 layers read
# fewer bytes, at larger ones their kernels may cost more than 16-bit GEMMs; the precision split
# separates that from overlap. Chapter 3 measures the copies alone and under decode for every chunk size
# and pacing.
