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
# must produce **identical tokens**; we check that too (a missing wait would be a race).

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

if shown.summary["provenance"].get("device") == "cpu":
    display(Markdown("```{warning}\n**CPU fallback: no CUDA streams.** A swap on CPU only re-points modules (host "
                     "memory is the device), so there is no copy to overlap: only the no-swap and synchronous runs "
                     "exist, and their step times are a shared 2-core CPU's.\n```\n"))
params = shown.params
print(f"{params['model']} on {params['device']}: swapping layers {params['layers'][0]}..{params['layers'][-1]}; "
      f"batch {params['batch']}, prompts of {params['prompt_len']} tokens, {params['steps']} steps, a swap or "
      f"restore every {params['interval']}, {params['rounds']} round(s)")
steps_df = shown.frame("steps.json")
pd.Series(shown.json("stats.json")).round(3)

# %% [markdown]
# ### Per-step latency
#
# Each line is one decode run; marked points are the steps that carried a swap (to INT4) or a
# restore (to FP16). In the synchronous run the swap happens before that step's forward pass; in
# the side-stream run it is enqueued after the step's forward pass and must finish before the next.

# %%
steps_df["run"] = steps_df["mode"] + " #" + steps_df["round"].astype(str)
line = alt.Chart().mark_line(strokeWidth=1).encode(
    x=alt.X("step:Q", title="decode step"), y=alt.Y("ms:Q", title="step time (ms)"),
    detail="run:N", color=alt.Color("mode:N", sort=["none", "sync", "async"]))
marks = alt.Chart().mark_point(size=80, filled=True).encode(
    x="step:Q", y="ms:Q", shape=alt.Shape("carried:N", title="step carried"), color=alt.value("black"),
    tooltip=["mode", "round", "step", "ms", "state", "carried"]).transform_filter(alt.datum.carried != "")
alt.layer(line, marks, data=steps_df).properties(width=560, height=150).facet(
    row=alt.Row("mode:N", title=None, sort=["none", "sync", "async"])).properties(title="Decode step times")

# %%
table = steps_df.assign(kind=steps_df.carried.replace("", "no swap")).groupby(["mode", "kind", "state"])["ms"].agg(
    ["count", "median", lambda s: s.quantile(0.9)]).rename(columns={"<lambda_0>": "p90"}).reset_index()
alt.Chart(table).mark_bar().encode(
    x=alt.X("kind:N", title=None, sort=["no swap", "swap", "restore"]), y=alt.Y("median:Q", title="median step (ms)"),
    color=alt.Color("state:N", title="forward in"), xOffset="state:N", column=alt.Column("mode:N", title=None),
    tooltip=["mode", "kind", "state", "count", "median", "p90"]).properties(width=150, height=170, title="Median step time")

# %%
h = shown.headline
f = lambda x, spec=".2f": "n/a" if x is None else format(x, spec)  # noqa: E731
lines = [f"* No swap: **{f(h['tpot_ms_no_swap'])} ms** per decode step (batch {params['batch']}).",
         f"* Synchronous swap of {h['layers_swapped']} layers: the call takes {f(h['swap_ms'])} ms and its step "
         f"{f(h['tpot_ms_sync_swap_step'])} ms ({f(h['sync_swap_stall_ms'])} ms more than a plain step); a restore "
         f"call takes {f(h['restore_ms'])} ms ({f(h['sync_restore_stall_ms'])} ms of stall)."]
if h.get("tpot_ms_async_swap_step") is not None:
    lines.append(f"* Side-stream swap: the carrying step takes {f(h['tpot_ms_async_swap_step'])} ms "
                 f"({f(h['async_swap_stall_ms'])} ms over a plain step); restore: {f(h['async_restore_stall_ms'])} ms. "
                 f"Tokens equal to the synchronous run: **{f(h['async_tokens_match_sync'], '.0%')}**.")
if h.get("freed_mib_measured") is not None:
    lines.append(f"* A swap released {f(h['freed_mib_measured'], '.1f')} MiB of device memory "
                 f"(expected {f(h['freed_mib_expected'], '.1f')} MiB).")
display(Markdown("\n".join(lines)))

# %% [markdown]
# Reading guide. At this model size a decode step of Hugging Face's eager implementation is
# dominated by Python and kernel-launch overhead, not by GPU work (the platform notes measured
# ~25 ms per token on an H100), so there is little GPU work for a copy to hide behind, and also
# little to stall: a few MiB per layer cross PCIe in well under a millisecond. The stall of a
# synchronous swap is then mostly the host-side cost of the swap call and its synchronizations.
# Larger models, larger batches and a compiled or CUDA-graph decode loop change that balance;
# chapter 3 gives the copy times of 1B and 7B layers to set against their step times.
