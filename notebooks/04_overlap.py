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
#
# MorphServe swaps layers *while requests are being served*: the host-to-GPU copy runs on a side
# CUDA stream at token granularity, so decoding should not stall. This chapter checks that on the
# real default model (SmolLM2-135M-Instruct). A batch of sequences decodes greedily with a KV
# cache, one timed step per output token; every few steps a block of layers is swapped to INT4,
# then restored, and we compare:
#
# * **no swap**: the baseline time per output token (TPOT);
# * **synchronous swap**: the copy runs at the token boundary and the step waits for it (the stall);
# * **side-stream swap**: the copy is enqueued on a second stream right after the previous step's
#   work, and the compute stream waits for it (an event) only before the step that uses the layers.
#
# The synchronous and side-stream runs switch the weights before the same forward pass, so they
# must produce **identical tokens**; we check that too (a missing wait would be a race). The serving
# engine's decode slowdown while a layer is copied, with CUDA graphs, is on the {doc}`/book/benchmarks` page.

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small, for CI (CPU fallback: no streams); "gpu": the published numbers (needs CUDA)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: the book's model (SmolLM2-135M-Instruct); or a local HF folder, a .gguf file, a hub id
layers_swapped = None     # None: the profile's block (cpu: 4 layers; gpu: 16 layers)
device = None             # None: CUDA when available, else the labelled CPU fallback; or "cuda" / "cpu"

# %% [markdown]
# ## Setup
#
# The model is loaded in bf16 and every decoder layer gets an INT4 twin (g64 round-to-nearest).
# On a GPU both precisions of each layer wait in pinned host memory, and a swap really copies
# bytes into fresh device tensors and frees the FP16 ones. The swapped layers are a block in the
# middle of the model. Prompts are held-out text windows (Moby-Dick and recent State of the Union
# addresses). The experiment is `morphbook.experiments.overlap`; the banner below says whose
# numbers the figures show.

# %%
from morphbook.experiments.overlap import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, layers_swapped=layers_swapped, device=device))
shown = run_chapter("overlap", run, cfg, results_root)

# %% [markdown]
# ## Results
#
# Drawn from the results files the banner above names (the committed GPU results when this run used
# its profile's own settings).

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
from IPython.display import Markdown, display

from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.readings import overlap as reading
from morphbook.publish.tables import show_table

if shown.summary["provenance"].get("device") == "cpu":
    display(Markdown("```{warning}\n**CPU fallback: no CUDA streams.** A swap on CPU only re-points modules (host "
                     "memory is the device), so there is no copy to overlap: only the no-swap and synchronous runs "
                     "exist, and their step times are a shared 2-core CPU's.\n```\n"))
params = shown.params
print(f"{params['model']} on {params['device']}: swapping layers {params['layers'][0]}..{params['layers'][-1]}; "
      f"batch {params['batch']}, prompts of {params['prompt_len']} tokens, {params['steps']} steps, a swap or "
      f"restore every {params['interval']}, {params['rounds']} round(s)")
steps_df = shown.frame("steps.json")
stats = shown.json("stats.json")
glue_all(reading.texts(stats, shown.json("steps.json"), shown.headline), prefix="ch4-")
RUNS = {"none": "no swap", "sync": "synchronous", "async": "side stream"}
show_table([{"mode": RUNS[m], "plain": stats.get(f"{m}_plain_ms"), "swap": stats.get(f"{m}_swap_step_ms"),
             "swap_stall": stats.get(f"{m}_swap_stall_ms"), "restore": stats.get(f"{m}_restore_step_ms"),
             "restore_stall": stats.get(f"{m}_restore_stall_ms")} for m in ("none", "sync", "async")
            if stats.get(f"{m}_plain_ms") is not None],
           {"mode": "run", "plain": "uneventful step (ms)", "swap": "step carrying a swap (ms)",
            "swap_stall": "its stall, like for like (ms)", "restore": "step carrying a restore (ms)",
            "restore_stall": "its stall (ms)"},
           "Median step times of each run (the stall compares a carrying step with uneventful steps of the same "
           "precision)", "tbl-ch4-steps", formats={k: fmt.auto for k in ("plain", "swap", "swap_stall", "restore",
                                                                         "restore_stall")})

# %% [markdown]
# ### Per-step latency
#
# Each line is one decode run; marked points are the steps that carried a swap (to INT4) or a
# restore (to FP16). In the synchronous run the swap happens before that step's forward pass; in
# the side-stream run it is enqueued after the step's forward pass and must finish before the next.

# %%
steps_df["run"] = steps_df["mode"].map(RUNS) + " #" + steps_df["round"].astype(str)
steps_df["mode name"] = steps_df["mode"].map(RUNS)
top = float(steps_df["ms"].quantile(0.99)) * 1.15  # a few outliers above the 99th percentile would flatten the rest
line = alt.Chart().mark_line(strokeWidth=1, clip=True).encode(
    x=alt.X("step:Q", title="decode step"),
    y=alt.Y("ms:Q", title="step time (ms)", scale=alt.Scale(domain=[0, top], clamp=True)),
    detail="run:N", color=alt.Color("mode name:N", title="run", sort=list(RUNS.values())))
marks = alt.Chart().mark_point(size=80, filled=True, clip=True).encode(
    x="step:Q", y="ms:Q", shape=alt.Shape("carried:N", title="step carried"), color=alt.value("black"),
    tooltip=["mode name", "round", "step", "ms", "state", "carried"]).transform_filter(alt.datum.carried != "")
alt.layer(line, marks, data=steps_df).properties(width=520, height=140).facet(
    row=alt.Row("mode name:N", title="run", sort=list(RUNS.values()))).properties(
    title=f"Decode step times (axis cut at {top:.0f} ms; {int((steps_df['ms'] > top).sum())} slower steps above it)")

# %%
table = steps_df.assign(kind=steps_df.carried.replace("", "no swap")).groupby(["mode name", "kind", "state"])["ms"].agg(
    ["count", "median", lambda s: s.quantile(0.9)]).rename(columns={"<lambda_0>": "p90"}).reset_index()
alt.Chart(table).mark_bar().encode(
    x=alt.X("kind:N", title="step", sort=["no swap", "swap", "restore"]), y=alt.Y("median:Q", title="median step (ms)"),
    color=alt.Color("state:N", title="forward in"), xOffset="state:N",
    column=alt.Column("mode name:N", title="run", sort=list(RUNS.values())),
    tooltip=["mode name", "kind", "state", "count", "median", "p90"]).properties(width=140, height=170,
                                                                               title="Median step time")

# %% [markdown]
# ### What the numbers say
#
# {glue:md}`ch4-overlap`

# %% [markdown]
# Reading guide. At this model size a decode step of Hugging Face's eager implementation is
# dominated by Python and kernel-launch overhead, not by GPU work (the platform notes measured
# ~25 ms per token on an H100), so there is little GPU work for a copy to hide behind, and also
# little to stall: a few MiB per layer cross PCIe in well under a millisecond. The stall of a
# synchronous swap is then mostly the host-side cost of the swap call and its synchronizations.
# Larger models, larger batches and a compiled or CUDA-graph decode loop change that balance;
# chapter 3 gives the copy times of 1B and 7B layers to set against their step times.
