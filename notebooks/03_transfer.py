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
#
# A MorphServe swap is a copy: the INT4 version of a decoder layer waits in pinned host memory and
# is copied over PCIe into the GPU when the layer is swapped in; a restore copies the FP16 bytes
# back. The paper quotes about 4 ms for an INT4 Llama-2-7B layer over PCIe Gen4. This chapter
# measures such copies on our GPU, and asks two design questions:
#
# * **Packing.** Does it pay to store a layer as one contiguous buffer and copy it with one
#   `cudaMemcpyAsync` (then use views for its tensors), instead of one copy per tensor?
# * **Contiguity.** Is a *block* of adjacent layers cheaper to copy than the same number of
#   *scattered* layers? The seed project claimed so; here both move exactly the same bytes.
#
# Every copy lands in **real weight storage**: the layers' `nn.Linear` weights (and the INT4
# twins' packed buffers) are views into one device buffer per precision, so a copy overwrites the
# tensors the model computes with. Weights are random (a timing experiment needs real sizes, not
# real values), with the shapes of public models. The serving engine's own swap copies, measured
# while it decodes, are on the {doc}`/book/benchmarks` page.

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small, for CI (the labelled CPU fallback); "gpu": the published numbers (needs CUDA)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
shapes = None             # None: the profile's model shapes (cpu: smollm2-135m; gpu: tinyllama-1.1b, llama-2-7b)
layer_counts = None       # None: 1, 2, 4 and 8 layers
device = None             # None: CUDA when available, else the labelled CPU fallback; or "cuda" / "cpu"

# %% [markdown]
# ## The design
#
# For each model shape, payload (FP16 weights, or INT4 g64 weights plus their bf16 scales) and
# layer count *k*, we copy either a **block** (the *k* middle layers) or *k* **scattered** layers
# (spread evenly over the depth), each with three packings:
#
# :::{table} The three packings of a swap's copies
# :name: tbl-ch3-packings
#
# | packing | copies for *k* layers | what it models |
# | --- | --- | --- |
# | `tensor` | 7*k* (FP16) or 14*k* (INT4: packed + scales) | one copy per weight tensor, as a naive swap does |
# | `layer` | *k* | one contiguous buffer per layer, one copy each (MorphServe's design) |
# | `run` | one per run of adjacent layers: 1 for a block, *k* if scattered | a whole block stored and copied as one |
# :::
#
# Block and scattered with the `layer` packing issue the *same number of copies of the same
# sizes*: any difference between them would have to come from where the bytes sit in memory.
# All conditions run once per round, in a fresh random order each round (so drift hits all of
# them alike), after warm-up rounds. On a GPU each copy is timed with CUDA events on a side
# stream; the **ceiling** is one large contiguous pinned copy, measured the same way at several
# sizes. After timing, the copied device bytes are compared with the host bytes (they start zeroed).
# The experiment is `morphbook.experiments.transfer`; the banner below says whose numbers the
# figures show.

# %%
from morphbook.experiments.transfer import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(shapes=shapes, layer_counts=layer_counts, device=device))
shown = run_chapter("transfer", run, cfg, results_root)

# %% [markdown]
# ## Results
#
# Everything below is drawn from the results files the banner above names (the book shows the
# committed GPU results when this run used its profile's own settings, whatever machine builds it).

# %% tags=["hide-input"]
import altair as alt
from IPython.display import Markdown, display

from morphbook.publish import fmt
from morphbook.publish.tables import show_table

figures, params = shown.headline, shown.params
if shown.summary["provenance"].get("device") == "cpu" or "CPU fallback" in str(figures.get("timer")):
    display(Markdown("```{warning}\n**CPU fallback: no PCIe, numbers are memcpy.** These copies go from one host "
                     "buffer to another, timed by wall clock on a shared CPU; they say nothing about PCIe.\n```\n"))
timings, ceiling, layer_bytes = shown.frame("timings.json"), shown.frame("ceiling.json"), shown.frame("layer_bytes.json")
print(f"shapes {', '.join(params['shapes'])}; {params['repeats']} timed rounds after {params['warmup']} warm-up "
      f"rounds; device {params['device']}, {params['threads']} thread(s)")
show_table(timings.head(12), {"shape": "shape", "payload": "payload", "layers": "layers", "contiguity": "layout",
                               "packing": "packing", "copies": "copies", "median_ms": "median (ms)", "p99_ms": "p99 (ms)",
                               "gbps": "GB/s"},
           "Copy times, the first 12 conditions (all of them are in timings.json)", "tbl-ch3-timings",
           formats={"median_ms": fmt.auto, "p99_ms": fmt.auto, "gbps": lambda v: fmt.num(v, 1)})

# %%
show_table(layer_bytes.assign(fp16_mb=layer_bytes.fp16_bytes / 2**20, int4_mb=layer_bytes.int4_bytes / 2**20),
           {"shape": "shape", "layers": "layers", "fp16_mb": "FP16 per layer (MiB)", "int4_mb": "INT4 per layer (MiB)",
            "int4_ratio": "INT4 / FP16"},
           "Bytes a swap moves per decoder layer", "tbl-ch3-bytes",
           formats={"fp16_mb": fmt.num, "int4_mb": fmt.num, "int4_ratio": lambda v: fmt.num(v, 3)})

# %% [markdown]
# ### Bandwidth against copy size
#
# The line is the ceiling: one contiguous copy of the given size. Points are the layer copies
# (one copy per layer, block); their size is the total bytes of the *k* layers.

# %%
per_layer = timings[(timings.packing == "layer") & (timings.contiguity == "block")].assign(
    mb=lambda d: d.bytes / 2**20, what=lambda d: d["shape"] + " " + d["payload"])
line = alt.Chart(ceiling).mark_line(point=True, color="gray").encode(
    x=alt.X("mb:Q", scale=alt.Scale(type="log"), title="bytes copied (MiB, log)"),
    y=alt.Y("gbps:Q", title="GB/s (median)"), tooltip=["mb", "median_ms", "gbps"])
points = alt.Chart(per_layer).mark_point(size=70, filled=True).encode(
    x="mb:Q", y="gbps:Q", color=alt.Color("what:N", title="shape, payload"),
    tooltip=["shape", "payload", "layers", "median_ms", "p99_ms", "gbps"])
(line + points).properties(title="Layer copies against the one-big-copy ceiling")

# %% [markdown]
# ### Packing: one copy per layer against one per tensor
#
# Median time of copying a block of *k* layers with each packing; the black tick is the p99.

# %%
block = timings[timings.contiguity == "block"]
order = ["tensor", "layer", "run"]
base = alt.Chart().encode(x=alt.X("layers:O", title="layers copied (block)"),
                          xOffset=alt.XOffset("packing:N", sort=order))
bars = base.mark_bar().encode(y=alt.Y("median_ms:Q", title="median copy time (ms)"), color=alt.Color("packing:N", sort=order),
                              tooltip=["shape", "payload", "layers", "packing", "copies", "median_ms", "p99_ms"])
ticks = base.mark_tick(color="black", thickness=2, size=10).encode(y="p99_ms:Q")  # p99
alt.layer(bars, ticks, data=block).properties(width=220, height=180).facet(
    row=alt.Row("shape:N", title=None), column=alt.Column("payload:N", title=None)
).resolve_scale(y="independent").properties(title="Copy time by packing")

# %% [markdown]
# ### Contiguity: block against scattered
#
# Ratio of scattered to block median time for the same packing (1 = no difference).

# %%
pair = timings[timings.layers > 1].pivot_table(index=["shape", "payload", "layers", "packing"],
                                               columns="contiguity", values="median_ms").reset_index()
pair["scattered_over_block"] = pair["scattered"] / pair["block"]
rule = alt.Chart().mark_rule(color="gray", strokeDash=[4, 4]).encode(y=alt.datum(1.0))
dots = alt.Chart().mark_point(filled=True, size=60).encode(
    x=alt.X("layers:O", title="layers copied"), y=alt.Y("scattered_over_block:Q", title="scattered / block time"),
    color="packing:N", shape="payload:N", tooltip=list(pair.columns))
alt.layer(rule, dots, data=pair).properties(width=220, height=180).facet(column=alt.Column("shape:N", title=None)).properties(
    title="Does contiguity matter?")

# %% [markdown]
# ### What the numbers say

# %%
v = figures
kmax = max(params["layer_counts"])
lines = [f"* Shape **{v['shape']}**, timer: {v['timer']}. Ceiling (one big copy): **{v['ceiling_gbps']:.1f} GB/s**.",
         f"* One FP16 layer: **{v['fp16_layer_ms']:.3f} ms**; one INT4 layer: **{v['int4_layer_ms']:.3f} ms** "
         f"({v['fp16_layer_ms'] / v['int4_layer_ms']:.1f}x less time)."]
for p in ("fp16", "int4"):
    s1 = v[f"packed_vs_pertensor_speedup_{p}_1_layer"]
    lines.append(f"* {p.upper()}: per-tensor copies take **{s1:.2f}x** the time of one copy per layer for one layer"
                 + (f", {v[f'packed_vs_pertensor_speedup_{p}_{kmax}_layers']:.2f}x for {kmax} layers." if kmax > 1 else "."))
    if kmax > 1:
        r = v[f"scattered_vs_block_ratio_{p}_{kmax}_layers"]
        verdict = "no practical difference" if abs(r - 1) < 0.05 else ("block faster" if r > 1 else "scattered faster")
        lines.append(f"* {p.upper()}, {kmax} layers: scattered / block = **{r:.3f}** ({verdict}); one copy for the "
                     f"whole block instead of one per layer: {v[f'block_one_copy_speedup_{p}_{kmax}_layers']:.2f}x.")
lines.append(f"* Copied bytes bitwise equal to the host bytes: **{v['copies_bitwise_exact']}**.")
display(Markdown("\n".join(lines)))

# %% [markdown]
# Reading guide. Block and scattered layers with one copy per layer are the *same* operations on
# the same number of bytes, so a ratio near 1 is what physics predicts; the seed project's "block
# is faster" compared one large copy with several smaller ones, which is the `run` packing here,
# and any gain from it is a copy-size effect (small copies reach less of the ceiling), not a
# property of adjacent layers. The p99 column is computed from the repeats of each condition (40
# on the GPU profile), so it is close to the maximum observed.
#
# Not measured here (later issues): copies that compete with decode kernels for memory bandwidth
# (chapter 4 overlaps them), the time to re-pack INT4 weights on the device, and restores (FP16
# back) under a live KV cache.
