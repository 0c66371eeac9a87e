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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/morphbook/morphbook/blob/main/notebooks/04_overlap.ipynb)
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
profile = "cpu"  # "cpu": small, for CI (CPU fallback: no streams); "gpu": the published numbers (needs CUDA)
model = "smollm2-135m"
seed = 0
results_root = "results"
device = "auto"  # "auto": CUDA when available, else the labelled CPU fallback
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
from morphlib.models import load_model, num_layers
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.overlap import OverlapConfig, event_table, run_overlap, step_table, summarize
from morphlib.plotting import setup_altair
from morphlib.results import save_summary
from morphlib.stale import is_stale
from morphlib.transfer import block_layers, resolve_device

install_notebook_handler()
setup_altair()
torch.manual_seed(seed)
dev = resolve_device(device)
if dev.type == "cpu":  # one thread: OpenMP spin-waits collapse on a busy 2-core machine (10-30x slower steps)
    torch.set_num_threads(1)
if profile == "gpu":
    if dev.type != "cuda":
        raise MorphError("profile 'gpu' measures CUDA streams and needs a CUDA GPU; "
                         "use profile='cpu' for the labelled CPU fallback")
    batch, prompt_len, steps, interval, k, rounds = 8, 128, 64, 8, 16, 3
elif profile == "cpu":
    batch, prompt_len, steps, interval, k, rounds = 2, 16, 16, 4, 4, 1
else:
    raise MorphError(f"unknown profile {profile!r}: use 'cpu' or 'gpu'")

# %% [markdown]
# ## Setup
#
# The model is loaded in bf16 and every decoder layer gets an INT4 twin (g64 round-to-nearest).
# On a GPU both precisions of each layer wait in pinned host memory, and a swap really copies
# bytes into fresh device tensors and frees the FP16 ones. The swapped layers are a block in the
# middle of the model. Prompts are held-out text windows (Moby-Dick and recent State of the Union
# addresses).

# %%
lm, tok = load_model(model, device=dev)
morpher = prepare_morphing(lm, QuantConfig(group_size=group_size), progress=False)
layers = block_layers(num_layers(lm), k)
prompts = make_windows(tok, "heldout", batch, prompt_len, seed=seed).ids
cfg = OverlapConfig(batch=batch, prompt_len=prompt_len, steps=steps, interval=interval, layers=tuple(layers),
                    rounds=rounds)
b = morpher.layer_bytes(layers[0])
print(f"{model} on {dev}: swapping layers {layers[0]}..{layers[-1]}; per layer {b['fp16'] / 2**20:.2f} MiB FP16, "
      f"{b['int4'] / 2**20:.2f} MiB INT4")

# %%
runs = run_overlap(lm, morpher, prompts, cfg, warmup=dev.type == "cuda")  # CPU: no kernel warm-up needed
stats = summarize(runs)
pd.Series(stats).round(3)

# %%
expected_freed = sum(morpher.layer_bytes(i)["fp16"] - morpher.layer_bytes(i)["int4"] for i in layers)
measured = [-e["allocated_delta"] for e in event_table(runs) if e["kind"] == "swap" and e["allocated_delta"] is not None]
fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
cpu_note = " (not measured: no CUDA streams on CPU)" if dev.type != "cuda" else ""
headline = {
    "tpot_ms_no_swap": fig(stats["none_plain_ms"], " ms", "Decode step, no swap (median)"),
    "tpot_ms_sync_swap_step": fig(stats.get("sync_swap_step_ms"), " ms", f"Step with a synchronous {k}-layer swap"),
    "tpot_ms_async_swap_step": fig(stats.get("async_swap_step_ms"), " ms",
                                   f"Step carrying a side-stream {k}-layer swap{cpu_note}"),
    "swap_ms": fig(stats.get("sync_swap_call_ms"), " ms", f"Synchronous swap call, {k} layers to INT4"),
    "restore_ms": fig(stats.get("sync_restore_call_ms"), " ms", f"Synchronous restore call, {k} layers to FP16"),
    "sync_swap_stall_ms": fig(stats.get("sync_swap_stall_ms"), " ms", "Extra time of a synchronous-swap step"),
    "async_swap_stall_ms": fig(stats.get("async_swap_stall_ms"), " ms", f"Extra time of a side-stream-swap step{cpu_note}"),
    "sync_restore_stall_ms": fig(stats.get("sync_restore_stall_ms"), " ms", "Extra time of a synchronous-restore step"),
    "async_restore_stall_ms": fig(stats.get("async_restore_stall_ms"), " ms",
                                  f"Extra time of a side-stream-restore step{cpu_note}"),
    "async_tokens_match_sync": fig(stats.get("async_tokens_match_sync"), "",
                                   f"Side-stream run tokens equal to the synchronous run's (fraction){cpu_note}"),
    "freed_mib_measured": fig(float(pd.Series(measured).median()) / 2**20 if measured else None, " MiB",
                              "Device memory a swap released (torch.cuda.memory_allocated)"),
    "freed_mib_expected": fig(expected_freed / 2**20, " MiB", f"FP16 minus INT4 bytes of the {k} layers"),
    "layers_swapped": k,
}
params = {"profile": profile, "model": model, "seed": seed, "threads": torch.get_num_threads(), "device": str(dev), "group_size": group_size,
          "batch": batch, "prompt_len": prompt_len, "steps": steps, "interval": interval, "layers": layers,
          "rounds": rounds}
saved = save_summary("overlap", params, headline, results_root,
                     extra_files={"steps.json": step_table(runs), "events.json": event_table(runs), "stats.json": stats})
print(f"saved {saved}")

# %% [markdown]
# ## Results
#
# Drawn from the saved results files (the committed GPU results when they exist).

# %%
summary, root, label = shown_results("overlap", results_root)
display(Markdown(provenance_banner(summary, is_stale("overlap", summary))))
if summary["provenance"].get("device") == "cpu":
    display(Markdown("```{warning}\n**CPU fallback: no CUDA streams.** A swap on CPU only re-points modules (host "
                     "memory is the device), so there is no copy to overlap: only the no-swap and synchronous runs "
                     "exist, and their step times are a shared 2-core CPU's.\n```\n"))
steps_df = pd.DataFrame(json.loads((root / "overlap" / "steps.json").read_text()))
events_df = pd.DataFrame(json.loads((root / "overlap" / "events.json").read_text()))

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
h = {k2: (x["value"] if isinstance(x, dict) else x) for k2, x in summary["headline"].items()}
f = lambda x, spec=".2f": "n/a" if x is None else format(x, spec)  # noqa: E731
lines = [f"* No swap: **{f(h['tpot_ms_no_swap'])} ms** per decode step (batch {summary['provenance']['params']['batch']}).",
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
