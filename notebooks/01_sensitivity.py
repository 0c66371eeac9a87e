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
# # Layer sensitivity to INT4

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small sizes for CI; "gpu": the book's published run
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: the book's model (SmolLM2-135M-Instruct); or a local HF folder, a .gguf file, a hub id
texts = None              # None: the book's corpus; or a .txt file or folder, or "hf:<dataset>"
calibration_texts = None  # None: as texts; or your own calibration texts (a .txt file or folder), with:
heldout_texts = None      # your own held-out texts (a .txt file or folder; this chapter reads calibration only)

# %%
from morphbook.experiments.sensitivity import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, texts=texts, calibration_texts=calibration_texts,
                                          heldout_texts=heldout_texts))
shown = run_chapter("sensitivity", run, cfg, results_root)

# %% tags=["remove-cell"]
import altair as alt
import numpy as np
import pandas as pd

from morphbook.publish import fmt
from morphbook.publish.glue import glue, glue_all
from morphbook.publish.page import show_saved
from morphbook.publish.plotting import heatmap
from morphbook.publish.readings import sensitivity as reading
from morphbook.publish.tables import show_table

L, S, G, T, H = (shown.frame("layers.json"), shown.json("spearman.json"), shown.frame("angular.json"),
                 shown.json("lis_terms.json"), shown.headline)
glue_all(reading.texts(H, S, len(L)), prefix="ch1-")

# %% [markdown]
# ## What this chapter finds
#
# {glue:md}`ch1-dominant`
#
# {glue:md}`ch1-bi`
#
# Against the quantity every importance score stands in for, each layer's **direct cost** (the
# increase of next-token loss when that layer alone runs in INT4), LIS ranks the layers with
# {glue:md}`ch1-cost`; the normalised LIS (each term min–max scaled first) with {glue:md}`ch1-cost_norm`.
# {glue:md}`ch1-dearest`
#
# *What this chapter cannot yet measure:* costs here are one layer at a time, on calibration text,
# for one small model at the published size (Gemma-3 270M below only at the small CPU size); how the
# costs of several swapped layers add up, and whether the rankings travel to held-out text, is
# chapter 2's question.

# %% [markdown]
# ## The question
#
# MorphServe decides *which* decoder layers to swap to INT4 with a **layer importance score**
# (LIS), a weighted sum of three cosine similarities measured offline on calibration text:
#
# :::{table} MorphServe's layer importance score and its three terms
# :name: tbl-ch1-lis
#
# | term | definition | reads as |
# | --- | --- | --- |
# | LTS$_\ell$ | $\cos(h_{\ell-1}, h_\ell)$ | how little 16-bit layer $\ell$ transforms its input |
# | LRS$_\ell$ | $\cos(h_\ell, h_\ell^{\mathrm{INT4}})$, same input | how close the layer's own INT4 twin is |
# | MDS$_{\ell\mid Q}$ | $\cos(z_Q, z_{Q\cup\{\ell\}})$, $z$ = final hidden state | how much the model's output moves |
# | LIS$_\ell$ | $0.25\,$LTS + $0.25\,$LRS + $0.5\,$MDS | higher = safer to swap |
# :::
#
# This chapter measures all of them per layer on the default model, with bootstrap confidence
# intervals over calibration windows, next to other importance measures (ShortGPT's Block
# Influence, Gromov et al.'s angular distance) and the quantity they all stand in for, the direct
# cost of swapping the layer alone (increase of next-token loss and KL divergence). It asks two
# questions: does one term dominate LIS, and do the measures agree with the direct cost?
#
# Conventions: windows are slices of running text, starting with the tokenizer's own special prefix
# (none for SmolLM2; a BOS token for families such as Gemma); the first position of every window (no
# context, attention sink) is **excluded** from all cosine averages. MDS here is conditioned on the
# empty set (one layer swapped); chapter 2 recomputes it against the swapped set for greedy
# selection. All measurements use the **calibration split only** (State of the Union addresses
# 1790–1999). One 16-bit pass with hooks gives LTS, LRS (each layer re-run on the same input with
# its INT4 twin) and every hidden state for the angular distances; then each layer is swapped alone
# to measure MDS, the loss increase and the KL divergence against the 16-bit model
# (`morphbook.experiments.sensitivity`).

# %% [markdown]
# ## The direct cost of each layer
#
# Swapping one layer to INT4 and nothing else: the increase of next-token loss on calibration
# windows, as a perplexity change, with 95 % bootstrap intervals over windows. This is the quantity
# every importance score is trying to predict.

# %%
L["dppl_lo"] = 100 * np.expm1(L["dnll_lo"])
L["dppl_hi"] = 100 * np.expm1(L["dnll_hi"])
base = alt.Chart(L).encode(x=alt.X("layer:O", title="decoder layer"))
(base.mark_bar(color="#4c78a8").encode(
    y=alt.Y("dppl_pct:Q", title="perplexity change, layer alone in INT4 (%)"),
    tooltip=[alt.Tooltip("layer", title="layer"), alt.Tooltip("dppl_pct:Q", format=".2f", title="perplexity change (%)"),
             alt.Tooltip("kl:Q", format=".4f", title="KL divergence")])
 + base.mark_rule().encode(y="dppl_lo:Q", y2="dppl_hi:Q")).properties(
    title=f"Cost of swapping one layer (dearest: layer {H['dearest_layer']}, cheapest: layer {H['cheapest_layer']})")

# %% [markdown]
# ## MorphServe's three terms, and whether one dominates
#
# Each panel has its own y-scale. Note the ranges: a term that varies 50 times more than another
# across layers decides the ranking of an unnormalised weighted sum, whatever its weight.

# %%
long = pd.concat([pd.DataFrame({"layer": L["layer"], "measure": m.upper(), "value": L[m], "lo": L[f"{m}_lo"],
                                "hi": L[f"{m}_hi"]}) for m in ("lts", "lrs", "mds")])
band = alt.Chart(long).mark_area(opacity=0.25).encode(
    x="layer:Q", y=alt.Y("lo:Q", scale=alt.Scale(zero=False), title="cosine similarity"), y2="hi:Q")
line = alt.Chart(long).mark_line(point=True).encode(
    x=alt.X("layer:Q", title="decoder layer"), y=alt.Y("value:Q", scale=alt.Scale(zero=False), title="cosine similarity"),
    tooltip=["measure", "layer", alt.Tooltip("value:Q", format=".5f")])
alt.layer(band, line).properties(width=520, height=120).facet(
    row=alt.Row("measure:N", title="term")).resolve_scale(y="independent")

# %%
show_table([{"term": k.upper(), "share": v, "range": T["ranges"][k]} for k, v in T["shares"].items()],
           {"term": "term", "share": "share of LIS's variance across layers", "range": "range across layers (cosine)"},
           "How much each term moves LIS from layer to layer", "tbl-ch1-terms",
           formats={"share": lambda v: fmt.frac_pct(v, 2), "range": fmt.auto})

# %% [markdown]
# ## Do the measures agree?
#
# Spearman rank correlation across layers, every measure oriented so that *higher = safer to swap*
# (costs are negated). The bottom rows are the direct costs: an importance score is useful to the
# extent that it ranks layers the way they do. With 30 layers a correlation is uncertain: the
# 95 % interval of ρ = {glue:text}`ch1-cost_rho` (LIS against the loss cost) runs from
# {glue:text}`ch1-cost_interval`.

# %%
names = {"LIS": "LIS", "LIS (normalised)": "LIS, normalised", "LTS": "LTS", "LRS": "LRS", "MDS": "MDS",
         "-BI": "Block Influence", "-angular d(l,l+1)": "angular distance", "-KL": "cost: KL divergence",
         "-dNLL": "cost: loss increase"}
order = [names[n] for n in names if n in S] + [n for n in S if n not in names]  # the direct costs last
corr = pd.DataFrame([{"a": names.get(a, a), "b": names.get(b, b), "rho": S[a][b]} for a in S for b in S])
heatmap(corr, "a", "b", "rho", order, "Spearman ρ", x_title="measure", y_title="measure",
        title="Rank agreement between importance measures")

# %% [markdown]
# ## Gromov et al.: angular distance between layer ℓ and ℓ+n
#
# $d(\ell, \ell+n) = \arccos(\cos(h_\ell, h_{\ell+n}))/\pi$, averaged over tokens: small values mark
# blocks of n layers that barely change the representation, Gromov et al.'s candidates for pruning
# and chapter 2's "Gromov block" strategy.

# %%
alt.Chart(G).mark_rect().encode(
    x=alt.X("start:O", title="block start ℓ"), y=alt.Y("n:O", sort="descending", title="block length n"),
    color=alt.Color("d:Q", scale=alt.Scale(scheme="viridis"), title="angular distance"),
    tooltip=["start", "n", alt.Tooltip("d:Q", format=".3f")]).properties(width=520, height=360)

# %% [markdown]
# ## A second model family: Gemma-3 270M
#
# The same experiment on Gemma-3 270M (18 layers, local and global attention, built in as
# `gemma3-270m`: its 16-bit weights are dequantized Q4_K/Q5_0/Q6_K/Q8_0 GGUF tensors, so INT4 costs
# little; Google's Gemma terms apply to these weights), on the small CPU profile.

# %% tags=["remove-input"]
fam = show_saved("sensitivity", "results/families/gemma3-270m", "Gemma-3 270M, CPU profile")
if fam is None:
    glue("g1-summary", "No saved results for this family.", markdown=True)
else:
    F = reading.texts(fam.headline, fam.json("spearman.json"), len(fam.json("layers.json")))
    glue("g1-summary", f"{F['dominant']} {F['bi']} Against the direct cost, LIS shows {F['cost']}. {F['dearest']}",
         markdown=True)

# %% [markdown]
# {glue:md}`g1-summary`
