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
# # Swap transfer cost

# %% tags=["parameters"]
profile = "cpu"           # "cpu": a tiny random Llama on the CPU, for CI; "gpu": the published numbers (needs CUDA)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
shapes = None             # None: the profile's model shapes (gpu: llama-2-7b, llama-3-8b; cpu: tiny)
device = None             # None: CUDA when available, else the CPU; or "cuda" / "cpu"

# %%
from morphbook.experiments.transfer import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(shapes=shapes, device=device))
shown = run_chapter("transfer", run, cfg, results_root, needs="engine")  # not old-format results

# %% tags=["remove-cell"]
import altair as alt
import pandas as pd
from IPython.display import Markdown, display

from morphbook.experiments.transfer import size_text
from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.plotting import box_stats, boxes
from morphbook.publish.readings import transfer as reading
from morphbook.publish.tables import show_table

H, P, raw_h = shown.headline, shown.params, shown.summary["headline"]
ops, groups, raw = shown.frame("engine_ops.json"), shown.frame("engine_groups.json"), shown.frame("raw_copies.json")
cont, plan = shown.frame("contention.json"), shown.frame("plan.json")
size = size_text
glue_all(reading.texts(raw_h, shown.json("contention.json")), prefix="ch3-")
glue_all({"cpu": ("**CPU run: no PCIe.** Copies go from one host buffer to another (memcpy, timed by the wall clock "
                  "and host timestamps on a shared CPU) and the tiny model decodes eagerly: the numbers exercise the "
                  "code, not a GPU, and no target is judged." if "CPU" in H["engine"] else
                  f"Measured on the engine: {H['engine']}.")}, prefix="ch3-")

# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch3-cpu`
#
# {glue:md}`ch3-alone`
#
# {glue:md}`ch3-claims`
#
# {glue:md}`ch3-contention`
#
# {glue:md}`ch3-use`
#
# {glue:md}`ch3-checks`

# %% [markdown]
# ## The question
#
# A MorphServe swap is a copy: a decoder layer's INT4 bytes wait in pinned host memory and cross PCIe
# into the GPU when the layer is swapped in; a restore copies its 16-bit bytes back. This chapter
# measures those copies **on the serving engine** (`morphlib.engine`), in the memory it computes with:
# what a swap or restore of 1, 4, 8 or 16 layers of a Llama-2-7B or Llama-3-8B shape costs alone and
# how close it comes to the link's ceiling; whether the original project's claims hold (one packed copy
# is faster than many, and jitters less); whether copies and a **GPU-bound decode** (CUDA graphs, near the
# HBM roofline) contend, and which chunk size and pacing make that vanish; and how long until a decode
# step **uses** a swapped layer. Chapter 4 runs the engine's default setting through a serving-like
# schedule.
#
# Three mechanisms make the numbers; each figure names its own:
#
# :::{table} The mechanisms behind this chapter's numbers
# :name: tbl-ch3-mechanisms
#
# | mechanism | what moves | timed by |
# | --- | --- | --- |
# | engine op | `LLM.swap` / `LLM.restore` on an idle engine: its copy backend sends a layer's INT4 head (swap) or 16-bit region (restore) in chunks on its copy stream into a staging slot or the region, then commits it at a step boundary | a CUDA event pair per chunk; the wall clock from request to the last commit |
# | raw copy | plain `torch` copies from host memory into free KV blocks of the same arena, on the engine's copy stream: one copy per layer or per tensor, pinned or pageable host memory, one contiguous pinned copy (the ceiling) | two CUDA events around each plan |
# | decode contention | the engine's own side-stream swaps and restores of one layer while it decodes, for every chunk size and pacing | chunk events against the idle engine's; step times against the nearest quiet steps in the same morph state |
# :::
#
# An earlier version of this chapter copied into a slab of its own, outside any engine; the raw copies
# keep what it measured where the engine adds nothing (packing, host memory, the ceiling), now on the
# engine's bytes and memory. Weights are random: a timing needs real sizes, not real values.

# %% [markdown]
# ## The design
#
# For each shape the engine holds its middle 16 layers' INT4 and 16-bit bytes in pinned host memory.
# **Engine ops**: a swap then a restore of the middle 1, 4, 8 and 16 layers on the idle engine at the
# engine's 16 MiB chunks, and of one layer at 4 and 64 MiB too. **Raw copies**: one layer's INT4 head
# and 16-bit region as one copy or one per tensor (the packed weights and scales of 7 projections; the
# 16-bit rows of 7 projections), 1 and 4 layers from pinned and from pageable memory, and the ceiling
# at 1–256 MiB, every condition once per round in a fresh random order. A condition is repeated 200
# times, fewer only where one repeat is long (a device-time budget per condition, never fewer than
# 30); the plan's estimate was printed, and checked against the chapter's limit, before anything ran.
# Afterwards every swapped head and restored region is compared with its host bytes.
#
# **Decode contention** (the first shape): batches of 1, 8 and 32 random prompts of 128 tokens decode
# with CUDA graphs while the middle layer is swapped and restored 8 times (an event every 8 steps), for
# chunks of 4, 16 and 64 MiB and pacing 0.5, 0.8 (the share of the last step's time the copies sent
# after one step may take, at the measured bandwidth) and unpaced (every chunk sent after one launch). A
# step is *quiet* when no copy is in flight and nothing commits; an overlapped step's baseline is the
# median of its 4 nearest quiet steps in the same morph state (so a layer's INT4 compute never counts as
# overlap). The setting "at which the contention vanishes" is fixed by rule: every batch within both
# targets (chunk bandwidth at least 0.90 of the idle engine's, overlapped-step slowdown at most 3 %),
# the fastest copy (the highest pace) winning.

# %%
short = plan[plan.what.str.startswith(("engine ops", "raw", "ceiling")) & (plan.repeats < P["repeats"])]
budget = (f"the plan estimated {fmt.num(P['plan_seconds'], 0)} s of device time on an H200, against a limit of "
          f"{fmt.num(P['time_limit_s'], 0)} s")
if len(short):
    show_table(short, {"shape": "shape", "what": "condition", "repeats": "repeats"},
               f"Conditions repeated fewer than {P['repeats']} times (the long ones; {budget})", "tbl-ch3-plan")
else:
    display(Markdown(f"Every condition ran its {P['repeats']} repeats ({budget})."))

# %% [markdown]
# ## Copies alone
#
# ### Engine ops on the idle engine
#
# A layer's op: the device time from its first chunk's start to its last chunk's end (its span), its
# commit (a device-to-device copy) and the host time the engine spent on it. A request of *k* layers:
# the wall time until the last of them committed (two staging slots: two layers in flight at a time).

# %%
OPS = {"int4": "swap (INT4 head)", "fp16": "restore (16-bit region)"}
show_table(ops.assign(op=ops.to.map(OPS), chunk=ops.chunk_bytes.map(size), mib=ops.bytes / 2**20),
           {"shape": "shape", "op": "op", "layers": "layers", "chunk": "chunk", "mib": "MiB",
            "n": "ops", "median_ms": "span, median (ms)", "p99_ms": "P99 (ms)",
            "copy_gbps": "chunk GB/s", "commit_ms": "commit (ms)", "host_ms": "host (ms)"},
           "Engine ops: one layer's copy, by request size and chunk size", "tbl-ch3-ops",
           formats={k: fmt.auto for k in ("mib", "median_ms", "p99_ms", "max_ms", "copy_gbps", "commit_ms", "host_ms")})

# %%
mine = groups[groups.chunk_bytes == P["engine_chunk_bytes"]]
show_table(mine.assign(op=mine.to.map({"int4": "swap", "fp16": "restore"})),
           {"shape": "shape", "op": "op", "layers": "layers", "n": "repeats", "median_ms": "median wall (ms)",
            "p99_ms": "P99 (ms)", "max_ms": "max (ms)", "gbps": "GB/s over the wall time"},
           f"Engine ops: a request of k layers, request to the last commit ({size(P['engine_chunk_bytes'])} chunks)",
           "tbl-ch3-groups", formats={k: fmt.auto for k in ("median_ms", "p99_ms", "max_ms", "gbps")})

# %% [markdown]
# The distribution of one layer's copy span at every chunk size: the box spans the quartiles, the
# whiskers reach the fastest and the slowest repeat (the table above gives the P99).

# %%
one = ops[ops.layers == 1]
long = pd.DataFrame([{"shape": r.shape, "op": OPS[r.to], "chunk": size(r.chunk_bytes), "ms": v}
                     for r in one.itertuples() for v in r.samples_ms])
boxes(box_stats(long, ["shape", "op", "chunk"], "ms"), alt.X("chunk:N", title="chunk size", sort=[size(n) for n in P["chunk_bytes"]]),
      "copy span of one layer (ms)", alt.Color("op:N", title="op")).properties(width=160, height=200).facet(
    column=alt.Column("op:N", title="op"), row=alt.Row("shape:N", title="shape")).resolve_scale(y="independent").properties(
    title="One layer's copy on the idle engine, every repeat")

# %% [markdown]
# ### Raw copies: packing, host memory, the ceiling
#
# The line is the ceiling (one contiguous pinned copy of the given size); the points are one layer's
# INT4 head or 16-bit region as one copy, as one copy per tensor, and from pageable memory.

# %%
ceil = raw[raw.packing == "ceiling"].assign(mib=lambda d: d.bytes / 2**20)
PACK = {"layer": "one copy", "tensor": "one per tensor"}
pts = raw[(raw.packing != "ceiling") & (raw.layers == 1)].assign(
    mib=lambda d: d.bytes / 2**20, what=lambda d: d.payload.str.upper() + ", " + d.packing.map(PACK) + ", " + d.memory)
line = alt.Chart(ceil).mark_line(point=True, color="gray").encode(
    x=alt.X("mib:Q", scale=alt.Scale(type="log"), title="bytes copied (MiB, log)"), y=alt.Y("gbps:Q", title="GB/s (median)"),
    detail="shape:N", tooltip=["shape", "mib", "median_ms", "gbps"])
dots = alt.Chart(pts).mark_point(size=70, filled=True).encode(
    x="mib:Q", y="gbps:Q", color=alt.Color("what:N", title="payload, packing, memory"), shape=alt.Shape("shape:N", title="shape"),
    tooltip=["shape", "payload", "packing", "memory", "copies", "median_ms", "p99_ms", "gbps"])
(line + dots).properties(title="One layer's copy against the one-big-copy ceiling")

# %%
copies = raw[raw.packing != "ceiling"].assign(
    payload=lambda d: d.payload.str.upper(), packing=lambda d: d.packing.map(PACK),
    memory=lambda d: d.memory.where((d.memory != "pinned") | d.host_pinned, "pinned, not granted"))
repeats = sorted(copies.n.unique())
show_table(copies,
           {"shape": "shape", "payload": "payload", "packing": "packing", "memory": "host memory", "layers": "layers",
            "copies": "copies", **({} if len(repeats) == 1 else {"n": "repeats"}), "median_ms": "median (ms)",
            "p99_ms": "P99 (ms)", "jitter": "jitter", "gbps": "GB/s"},
           "Raw copies into the engine's free KV blocks" + (f", {repeats[0]} repeats each" if len(repeats) == 1 else "")
           + " (jitter: P99 / median − 1; \"not granted\": the host could not pin, as on a machine without CUDA)",
           "tbl-ch3-raw",
           formats={"median_ms": fmt.auto, "p99_ms": fmt.auto, "jitter": fmt.frac_pct, "gbps": lambda v: fmt.num(v, 1)})

# %% [markdown]
# ## Copies while the engine decodes
#
# Each bar is one run of 8 swaps and 8 restores of the middle layer. Left: the slowdown of the steps
# the copies overlapped, against their quiet same-state baselines (dashed: the 3 % target). Right: the
# chunks' bandwidth while decoding over the same op's on the idle engine (dashed: 0.90).

# %%
order = [str(p) for p in P["paces"] if p is not None] + ["unpaced"]
chunks = [size(n) for n in P["chunk_bytes"]]
c = cont.assign(chunk=cont.chunk_bytes.map(size), slowdown_pct=100 * cont.slowdown)
base = alt.Chart().encode(x=alt.X("pace:N", title="pacing", sort=order), color=alt.Color("chunk:N", title="chunk", sort=chunks),
                          xOffset=alt.XOffset("chunk:N", sort=chunks))
slow = base.mark_bar().encode(y=alt.Y("slowdown_pct:Q", title="overlapped-step slowdown (%)"),
                              tooltip=["batch", "chunk", "pace", alt.Tooltip("slowdown_pct:Q", format=".1f"), "overlapped_steps"])
bw = base.mark_bar().encode(y=alt.Y("bw_vs_isolated:Q", title="chunk bandwidth / idle engine's"),
                            tooltip=["batch", "chunk", "pace", alt.Tooltip("bw_vs_isolated:Q", format=".3f")])
goal = lambda y: alt.Chart().mark_rule(strokeDash=[4, 4], color="black").encode(y=alt.datum(y))  # noqa: E731
alt.hconcat(alt.layer(slow, goal(3.0), data=c).properties(width=200, height=160).facet(row=alt.Row("batch:O", title="batch")),
            alt.layer(bw, goal(0.9), data=c).properties(width=200, height=160).facet(row=alt.Row("batch:O", title="batch"))
            ).properties(title="Do the copies and the decode contend?")

# %%
ci = lambda v: "n/a" if v is None else fmt.interval(100 * v[0], 100 * v[1], 1)  # noqa: E731
formats = {"quiet_step_ms": fmt.auto, "slowdown": lambda v: fmt.frac_pct(v), "swap_bw_vs_isolated": fmt.auto,
           "restore_bw_vs_isolated": fmt.auto, "swap_effective_gbs": fmt.auto, "commit_stall_ms": fmt.auto,
           "swap_to_use_ms": fmt.auto, "restore_to_use_ms": fmt.auto}
setting = {"batch": "batch", "chunk": "chunk", "pace": "pacing"}
show_table(c.assign(slow_ci=c.slowdown_ci95.map(ci)),
           {**setting, "quiet_step_ms": "quiet step (ms)", "slowdown": "overlapped-step slowdown",
            "slow_ci": "95 % CI over events (%)", "commit_stall_ms": "commit stall (ms)", "valid": "valid"},
           "Every decode-contention setting: what the copies cost the decode", "tbl-ch3-contention", formats=formats)
show_table(c, {**setting, "swap_bw_vs_isolated": "swap bandwidth / idle", "restore_bw_vs_isolated": "restore bandwidth / idle",
               "swap_effective_gbs": "swap GB/s with pacing gaps", "swap_to_use_ms": "swap to use (ms)",
               "restore_to_use_ms": "restore to use (ms)"},
           "Every decode-contention setting: what the decode costs the copies", "tbl-ch3-contention-copies", formats=formats)

# %% [markdown]
# ### A timeline
#
# The decode steps of one run (the middle batch, the engine's chunk size) and, beneath them, the copy
# stream's chunks (CUDA events placed on the steps' wall clock through one event recorded with it), for
# each pacing: grey quiet steps, orange steps overlapped by copies, red a commit at the boundary.

# %%
KINDS = {"domain": ["quiet", "overlapped", "commit", "chunk"], "range": ["#bbbbbb", "#f58518", "#e45756", "#4c78a8"]}
parts = []
for pace, r in shown.json("timeline.json").items():
    for s in r["steps"]:
        if s["index"] >= 0:
            parts.append({"pacing": pace, "start": s["start_ms"], "end": s["end_ms"], "row": "decode steps", "step": s["index"],
                          "kind": "commit" if s["committed"] else ("overlapped" if s["copy_in_flight"] else "quiet"), "ms": s["ms"]})
    for o in r["ops"]:
        parts += [{"pacing": pace, "start": a, "end": b, "kind": "chunk", "row": f"copy stream ({'swap' if o['to'] == 'int4' else 'restore'})"}
                  for a, b in o["chunks"]]
alt.Chart(pd.DataFrame(parts)).mark_bar(height=14).encode(
    x=alt.X("start:Q", title="time since the timed window began (ms)"), x2="end:Q", y=alt.Y("row:N", title="steps and copies"),
    color=alt.Color("kind:N", scale=alt.Scale(**KINDS), title="step or copy"),
    tooltip=["pacing", "kind", "step", alt.Tooltip("ms:Q", format=".3f")]).properties(width=620, height=70).facet(
    row=alt.Row("pacing:N", title="pacing")).resolve_scale(y="independent").properties(
    title="Decode steps and the copy stream").interactive()

# %% [markdown]
# ## The targets
#
# The targets for the copies under decode, at the chosen setting (or the engine's chunk size
# when none qualified), worst batch, met or missed as the data says (a CPU run, or an invalid one, judges
# none).

# %%
show_table([{"figure": raw_h[k]["label"], "value": raw_h[k]["value"], "target": raw_h[k]["target"],
             "verdict": reading.judged(raw_h[k]).strip("*")}
            for k in ("copy_bw_under_decode_vs_isolated", "decode_slowdown_during_copy")],
           {"figure": "figure", "value": "value", "target": "target", "verdict": "verdict"},
           "Chapter 3's targets", "tbl-ch3-targets", formats={"value": lambda v: fmt.num(v, 3)})

# %% [markdown]
# Reading guide. Engine ops and raw copies are the same PCIe transfers seen two ways: an op adds the
# engine's chunking, its per-chunk events, its staging slots and commits, and the host round trips of an
# idle engine between slot pairs (in a request's wall time, not in a layer's span). A chunk's bandwidth
# under decode measures contention on the copy engine and in HBM; the overlapped steps' slowdown measures
# what decode pays for it. Chapter 4's synchronous control is compared with these copy times.
