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
# # Swapping inside vLLM
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/morphbook/morphbook/blob/main/notebooks/06_vllm.ipynb)
#
# The seed project's vLLM demo reported that a contiguous block of INT4 layers keeps far more of
# the 16-bit model's greedy output than scattered layers (20.5 % against 3.0 % of tokens for two
# layers). But its "INT4" was a whole-tensor symmetric fake quantization that also hit the norms,
# and both variants were badly broken. This chapter asks the same question with **real g64 INT4
# swaps** of the default model: after swapping *k* layers, how many greedy tokens still match the
# 16-bit model's, for a contiguous block against *k* scattered layers?
#
# ```{important}
# **The numbers on this page come from Hugging Face transformers, not from vLLM.** Running the
# swaps inside a live vLLM engine is a later issue (vLLM is not installed in the book's
# environment); this first experiment is its labelled fallback, with the same model and the same
# INT4 layers.
# ```

# %% tags=["parameters"]
profile = "cpu"  # "cpu": small, for CI; "gpu": the published numbers
model = "smollm2-135m"
seed = 0
results_root = "results"
device = "auto"  # "auto": CUDA when available, else CPU
group_size = 64  # INT4 group size (round-to-nearest, asymmetric)

# %%
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab: install the book's library (elsewhere: pip install -r requirements.txt)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/morphbook/morphbook"],
                   check=True)

# %%
import json

import altair as alt
import pandas as pd
import torch
from IPython.display import Markdown, display

from morphlib.book import provenance_banner, shown_results
from morphlib.corpus import make_windows
from morphlib.errors import MorphError, install_notebook_handler
from morphlib.models import load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.plotting import setup_altair
from morphlib.results import save_summary
from morphlib.stale import is_stale
from morphlib.transfer import resolve_device
from morphlib.runtime import make_deterministic
from morphlib.vllm_demo import MatchConfig, headline, token_match_experiment, vllm_status

make_deterministic()  # before any CUDA work: identical runs must give identical tokens
install_notebook_handler()
setup_altair()
torch.manual_seed(seed)
dev = resolve_device(device)
if dev.type == "cpu":  # one thread: OpenMP spin-waits collapse on a busy 2-core machine (10-30x slower steps)
    torch.set_num_threads(1)
if profile == "gpu":
    n_prompts, prompt_len, new_tokens, counts = 16, 128, 64, [2, 4, 8, 16]
elif profile == "cpu":
    n_prompts, prompt_len, new_tokens, counts = 4, 32, 24, [2, 6]
else:
    raise MorphError(f"unknown profile {profile!r}: use 'cpu' or 'gpu'")

# %% [markdown]
# ## Is vLLM here?

# %%
status = vllm_status()
if status["importable"]:
    display(Markdown(f"vLLM {status['version']} imports here, but the engine path is not implemented yet "
                     "(`morphlib.vllm_demo.run_vllm_engine` raises): the numbers below still come from transformers."))
else:
    display(Markdown("vLLM is not available here (" + (status["error"] or "not installed")
                     + "): running the Hugging Face transformers fallback."))

# %% [markdown]
# ## The experiment
#
# Prompts are held-out text windows (Moby-Dick and 2001-2021 State of the Union addresses). For
# each swap count *k*: the **block** is the *k* middle layers, **scattered** is *k* layers spread
# evenly over the depth (never adjacent), and **all** swaps every layer. Each condition generates
# greedily from the same prompts; we report the fraction of positions whose token equals the
# 16-bit model's, and the common-prefix length (generation diverges for good after the first
# difference, so the prefix is the stricter measure). A second 16-bit run is the control: it must
# match exactly. On a GPU that needs PyTorch's strict deterministic mode, which the setup cell turns
# on: without it, two identical bf16 greedy runs of the same model on an H100 differed on a few
# percent of the tokens, which would put a noise floor under every comparison below.

# %%
lm, tok = load_model(model, device=dev)
morpher = prepare_morphing(lm, QuantConfig(group_size=group_size), progress=False)
prompts = make_windows(tok, "heldout", n_prompts, prompt_len, seed=seed).ids
rows, per_prompt = token_match_experiment(lm, morpher, prompts, MatchConfig(counts=tuple(counts),
                                                                              new_tokens=new_tokens))
pd.DataFrame(rows)[["condition", "k", "match", "prefix", "ms_per_token"]].round(3)

# %%
params = {"profile": profile, "model": model, "seed": seed, "threads": torch.get_num_threads(), "device": str(dev), "group_size": group_size,
          "quant": QuantConfig(group_size=group_size).label, "prompts": n_prompts, "prompt_len": prompt_len,
          "new_tokens": new_tokens, "counts": counts, "engine": "transformers", "vllm": status,
          "deterministic": torch.are_deterministic_algorithms_enabled()}
saved = save_summary("vllm", params, headline(rows, counts, status), results_root,
                     extra_files={"conditions.json": rows, "per_prompt.json": per_prompt})
print(f"saved {saved}")

# %% [markdown]
# ## Results
#
# Drawn from the saved results files (the committed GPU results when they exist).

# %%
summary, root, label = shown_results("vllm", results_root)
display(Markdown(provenance_banner(summary, is_stale("vllm", summary))))
display(Markdown("```{note}\nEngine: **Hugging Face transformers** `generate` (greedy), not vLLM.\n```\n"))
cond = pd.DataFrame(json.loads((root / "vllm" / "conditions.json").read_text()))
prompt_df = pd.DataFrame(json.loads((root / "vllm" / "per_prompt.json").read_text()))

# %%
swapped = prompt_df[prompt_df.condition.isin(["block", "scattered"])]
means = cond[cond.condition.isin(["block", "scattered"])]
everything = cond[cond.condition == "all"]
base = alt.Chart(swapped).encode(x=alt.X("k:O", title="layers swapped to INT4"),
                                 color=alt.Color("condition:N", sort=["block", "scattered"]),
                                 xOffset=alt.XOffset("condition:N", sort=["block", "scattered"]))
dots = base.mark_circle(size=35, opacity=0.45).encode(
    y=alt.Y("match:Q", title="fraction of tokens equal to 16-bit", scale=alt.Scale(domain=[0, 1])),
    tooltip=["condition", "k", "prompt", "match", "prefix"])
bars = alt.Chart(means).mark_tick(thickness=3, size=22).encode(
    x="k:O", y="match:Q", color=alt.Color("condition:N", sort=["block", "scattered"]),
    xOffset=alt.XOffset("condition:N", sort=["block", "scattered"]), tooltip=["condition", "k", "match", "prefix"])
rule = alt.Chart(everything).mark_rule(strokeDash=[4, 4], color="gray").encode(y="match:Q", tooltip=["match"])
(dots + bars + rule).properties(width=420, height=240,
                                title="Greedy token match: block vs scattered (dots: prompts; ticks: mean; dashed: all layers)")

# %%
alt.Chart(cond).mark_bar().encode(
    x=alt.X("condition:N", sort=["fp16", "fp16 repeat", "block", "scattered", "all"], title=None),
    y=alt.Y("ms_per_token:Q", title="generate time per new token (ms)"), xOffset="k:O", color="k:O",
    tooltip=["condition", "k", "ms_per_token", "layers"],
).properties(width=420, height=180, title="Decode speed in the same run (includes prefill)")

# %%
h = {k: (x["value"] if isinstance(x, dict) else x) for k, x in summary["headline"].items()}
p = summary["provenance"]["params"]
parts = [f"* Control: the 16-bit model matches itself on **{h['fp16_repeat_match']:.0%}** of tokens."]
for k in p["counts"]:
    bk, sk = h.get(f"block_match_{k}"), h.get(f"scattered_match_{k}")
    if sk is not None:
        by = prompt_df[prompt_df.k == k].pivot_table(index="prompt", columns="condition", values="match")
        d = by["block"] - by["scattered"]
        se = d.std(ddof=1) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        parts.append(f"* {k} layers INT4: block keeps **{bk:.0%}** of the tokens, scattered **{sk:.0%}**; paired "
                     f"difference over prompts {d.mean():+.2f} +/- {2 * se:.2f} (2 standard errors).")
if "all_layers_match" in h:
    parts.append(f"* Every layer INT4: {h['all_layers_match']:.0%}; generate takes {h['ms_per_token_all_int4']:.1f} ms "
                 f"per new token against {h['ms_per_token_fp16']:.1f} ms in 16-bit.")
parts.append(f"* {p['prompts']} prompts of {p['prompt_len']} tokens, {p['new_tokens']} new tokens each; the quantization is "
             f"{p['quant']}.")
display(Markdown("\n".join(parts)))

# %% [markdown]
# Reading guide. Greedy token match is a harsh metric: one different token early on changes all
# that follows, so the match fraction mostly tracks *when* the first difference happens. It says
# whether a swap changes the output, not how much worse the output is (chapter 1 and 2 measure
# perplexity and KL divergence on many more tokens). Which layers are swapped matters more here
# than contiguity as such: a block in the middle and layers spread over the depth differ in *which*
# layers they touch, which chapter 2 separates properly with calibration and held-out data.
