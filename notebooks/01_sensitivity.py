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
#
# MorphServe decides *which* decoder layers to swap to INT4 with a **layer importance score**
# (LIS), a weighted sum of three cosine similarities measured offline on calibration text:
#
# | term | definition | reads as |
# | --- | --- | --- |
# | LTS$_\ell$ | $\cos(h_{\ell-1}, h_\ell)$ | how little 16-bit layer $\ell$ transforms its input |
# | LRS$_\ell$ | $\cos(h_\ell, h_\ell^{\mathrm{INT4}})$, same input | how close the layer's own INT4 twin is |
# | MDS$_{\ell\mid Q}$ | $\cos(z_Q, z_{Q\cup\{\ell\}})$, $z$ = final hidden state | how much the model's output moves |
# | LIS$_\ell$ | $0.25\,$LTS + $0.25\,$LRS + $0.5\,$MDS | higher = safer to swap |
#
# This chapter measures all of them per layer on the default model, with bootstrap confidence
# intervals over calibration windows, next to other importance measures — ShortGPT's Block
# Influence, Gromov et al.'s angular distance — and the quantity they all stand in for: **the direct
# cost of swapping the layer alone** (increase of next-token loss and KL divergence). It asks two
# questions: does one term dominate LIS, and do the measures agree with the direct cost?
#
# Conventions: windows are slices of running text, starting with the tokenizer's own special prefix
# (none for SmolLM2; a BOS token for families such as Gemma); the first position of every
# window (no context, attention sink) is **excluded** from all cosine averages. MDS here is
# conditioned on the empty set (one layer swapped); chapter 2 recomputes it against the swapped set
# for greedy selection. All measurements use the **calibration split only** (State of the Union
# addresses 1790–1999).

# %% tags=["parameters"]
profile = "cpu"           # "cpu": small sizes for CI; "gpu": the book's published run
results_root = "results"  # where this run writes (the CPU build writes to a build folder)
model = None              # None: the book's model (SmolLM2-135M-Instruct); or a local HF folder, a .gguf file, a hub id
texts = None              # None: the book's corpus; or a .txt file or folder, or "hf:<dataset>"
calibration_texts = None  # None: as texts; or your own calibration texts (a .txt file or folder), with:
heldout_texts = None      # your own held-out texts (a .txt file or folder; this chapter reads calibration only)

# %% [markdown]
# ## Measure
#
# One 16-bit pass with hooks gives LTS, LRS (each layer re-run on the same input with its INT4 twin)
# and every hidden state for the angular distances; then each layer is swapped alone to measure
# MDS, the loss increase and the KL divergence against the 16-bit model. The experiment is
# `morphbook.experiments.sensitivity`; the banner below says whose numbers the figures show.

# %%
from morphbook.experiments.sensitivity import Config, run
from morphbook.publish.notebook import given, run_chapter, setup

setup()
cfg = Config.for_profile(profile, **given(model=model, texts=texts, calibration_texts=calibration_texts,
                                          heldout_texts=heldout_texts))
shown = run_chapter("sensitivity", run, cfg, results_root)

# %% tags=["hide-input"]
import altair as alt
import numpy as np
import pandas as pd

L, S, G, T, H = (shown.frame("layers.json"), shown.json("spearman.json"), shown.frame("angular.json"),
                 shown.json("lis_terms.json"), shown.headline)

# %% [markdown]
# ## The direct cost of each layer
#
# Swapping one layer to INT4 and nothing else: the increase of next-token loss on calibration
# windows, as a perplexity change, with 95 % bootstrap intervals over windows. This is the quantity
# every importance score is trying to predict.

# %% tags=["hide-input"]
L["dppl_lo"] = 100 * np.expm1(L["dnll_lo"])
L["dppl_hi"] = 100 * np.expm1(L["dnll_hi"])
base = alt.Chart(L).encode(x=alt.X("layer:O", title="decoder layer"))
(base.mark_bar(color="#4c78a8").encode(y=alt.Y("dppl_pct:Q", title="perplexity change when swapped alone (%)"),
                                       tooltip=["layer", alt.Tooltip("dppl_pct:Q", format=".2f"),
                                                alt.Tooltip("kl:Q", format=".4f")])
 + base.mark_rule().encode(y="dppl_lo:Q", y2="dppl_hi:Q")).properties(
    title=f"Cost of swapping one layer (dearest: layer {H['dearest_layer']}, cheapest: layer {H['cheapest_layer']})")

# %% [markdown]
# ## MorphServe's three terms, and whether one dominates
#
# Each panel has its own y-scale. Note the ranges: a term that varies 50× more than another across
# layers decides the ranking of an unnormalised weighted sum, whatever its weight.

# %%
long = pd.concat([pd.DataFrame({"layer": L["layer"], "measure": m.upper(), "value": L[m], "lo": L[f"{m}_lo"],
                                "hi": L[f"{m}_hi"]}) for m in ("lts", "lrs", "mds")])
band = alt.Chart(long).mark_area(opacity=0.25).encode(x="layer:Q", y=alt.Y("lo:Q", scale=alt.Scale(zero=False), title=None), y2="hi:Q")
line = alt.Chart(long).mark_line(point=True).encode(x=alt.X("layer:Q", title="decoder layer"),
                                                    y=alt.Y("value:Q", scale=alt.Scale(zero=False), title=None),
                                                    tooltip=["measure", "layer", alt.Tooltip("value:Q", format=".5f")])
alt.layer(band, line).properties(width=520, height=140).facet(row=alt.Row("measure:N", title=None)).resolve_scale(y="independent")

# %%
terms = pd.DataFrame([{"term": k.upper(), "share of LIS variance across layers": v, "range across layers": T["ranges"][k]}
                      for k, v in T["shares"].items()])
print(terms.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
print(f"\nDominant term: {H['lis_dominant_term']} carries {100 * max(T['shares'].values()):.0f} % of LIS's variance.")

# %% [markdown]
# ## Do the measures agree?
#
# Spearman rank correlation across layers, every measure oriented so that *higher = safer to swap*
# (costs are negated). The bottom rows are the direct costs: an importance score is useful to the
# extent that it ranks layers the way they do.

# %%
names = list(S)
corr = pd.DataFrame([{"a": a, "b": b, "rho": S[a][b]} for a in names for b in names])
heat = alt.Chart(corr).mark_rect().encode(
    x=alt.X("a:N", sort=names, title=None), y=alt.Y("b:N", sort=names, title=None),
    color=alt.Color("rho:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue"), title="Spearman ρ"),
    tooltip=["a", "b", alt.Tooltip("rho:Q", format=".2f")])
(heat + heat.mark_text(fontSize=9).encode(text=alt.Text("rho:Q", format=".2f"), color=alt.value("black"))).properties(
    width=380, height=380, title="Rank agreement between importance measures")

# %% [markdown]
# ## Gromov et al.: angular distance between layer ℓ and ℓ+n
#
# $d(\ell, \ell+n) = \arccos(\cos(h_\ell, h_{\ell+n}))/\pi$, averaged over tokens: small values mark
# blocks of n layers that barely change the representation — Gromov et al.'s candidates for pruning,
# and chapter 2's "Gromov block" strategy.

# %%
alt.Chart(G).mark_rect().encode(
    x=alt.X("start:O", title="block start ℓ"), y=alt.Y("n:O", sort="descending", title="block length n"),
    color=alt.Color("d:Q", scale=alt.Scale(scheme="viridis"), title="angular distance"),
    tooltip=["start", "n", alt.Tooltip("d:Q", format=".3f")]).properties(width=520, height=360)

# %% [markdown]
# ## What this chapter finds
#
# The numbers below are read from the results file, not typed.

# %%
print(f"LIS is dominated by {H['lis_dominant_term']} "
      f"(variance shares LTS {H['lis_variance_share_lts']:.2f}, LRS {H['lis_variance_share_lrs']:.2f}, "
      f"MDS {H['lis_variance_share_mds']:.2f}; ranges LTS {H['range_lts']:.4f}, LRS {H['range_lrs']:.4f}, "
      f"MDS {H['range_mds']:.4f}).")
print(f"Rank agreement with the direct cost (Spearman): LIS {H['spearman_lis_vs_direct_cost']:+.2f}, "
      f"normalised LIS {H['spearman_lis_norm_vs_direct_cost']:+.2f}.")
print(f"Dearest single layer: {H['dearest_layer']} (+{H['dearest_layer_dppl_pct']:.2f} % perplexity); "
      f"cheapest: {H['cheapest_layer']}.")

# %% [markdown]
# ## A second model family: Gemma-3 270M
#
# The same experiment on Gemma-3 270M (18 layers, local and global attention, built in as
# `gemma3-270m`: its "16-bit" weights are dequantized Q4_K/Q5_0/Q6_K/Q8_0 GGUF tensors, so INT4
# costs little; Google's Gemma terms apply to these weights), on the small CPU profile — the banner
# says which code made it.

# %% tags=["hide-input"]
from morphbook.publish.page import show_saved

fam = show_saved("sensitivity", "results/families/gemma3-270m", "Gemma-3 270M, CPU profile")
if fam is not None:
    F = fam.headline
    print(f"LIS is dominated by {F['lis_dominant_term']} (variance share LTS {F['lis_variance_share_lts']:.3f}, "
          f"LRS {F['lis_variance_share_lrs']:.3f}, MDS {F['lis_variance_share_mds']:.3f}); Spearman with the direct "
          f"cost: LIS {F['spearman_lis_vs_direct_cost']:+.2f}, normalised LIS {F['spearman_lis_norm_vs_direct_cost']:+.2f}; "
          f"dearest layer {F['dearest_layer']} (+{F['dearest_layer_dppl_pct']:.2f} %), cheapest {F['cheapest_layer']}.")
