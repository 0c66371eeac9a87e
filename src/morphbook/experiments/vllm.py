"""Chapter 6: greedy token match of a morphed model, block vs scattered layers, and the vLLM hook.

The chapter's target is a live vLLM engine whose layers are swapped in place. That engine path is
not implemented yet (:func:`run_vllm_engine` says so); what runs today is the **Hugging Face
transformers fallback**: the same model, real INT4 swaps through a :class:`~morphlib.morph.Morpher`,
greedy ``generate``, and the tokens compared with the 16-bit model's, position by position.

Conditions for each swap count *k*: a contiguous **block** of *k* middle layers, *k* **scattered**
layers spread evenly over the depth, plus **all** layers, and a 16-bit **repeat** as a control (it
must match itself exactly, or the comparison measures noise: see :func:`morphlib.runtime.make_deterministic`). Decode speed is the wall time of
``generate`` per new token (it includes the prompt's prefill), measured in the same run after one
untimed warm-up generation.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from morphlib.errors import MorphError
from morphlib.metrics import greedy_tokens, token_match
from morphlib.runtime import make_deterministic  # noqa: F401  (re-exported for chapter 6)
from morphlib.transfer import block_layers, spread_layers


def vllm_status(try_import: bool = True) -> dict:
    """Whether vLLM is installed and importable here (importing it takes seconds; nothing else runs)."""
    spec = importlib.util.find_spec("vllm")
    status = {"installed": spec is not None, "importable": False, "version": None, "error": None}
    if spec is not None and try_import:
        try:
            mod = importlib.import_module("vllm")
            status.update(importable=True, version=getattr(mod, "__version__", None))
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
            status["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return status


def run_vllm_engine(*args, **kwargs):
    """TODO (later issue): load the model in vLLM, swap layers in place (``reload_weights`` or
    re-packing through ``apply_model``), call ``llm.reset_prefix_cache()`` after every swap, and
    compare greedy tokens with a fresh load of the same weights."""
    raise MorphError("vLLM engine path not implemented yet")


@dataclass(frozen=True)
class MatchConfig:
    counts: tuple[int, ...] = (2, 8)
    include_all: bool = True
    new_tokens: int = 32


def conditions(num_layers: int, counts, include_all: bool = True) -> list[tuple[str, int, list[int]]]:
    """(name, k, layers): block and scattered for every k (k = 1: block only; k = all: "all" only)."""
    out = []
    for k in counts:
        if not 1 <= k < num_layers:
            raise MorphError(f"swap count {k} is out of range: the model has {num_layers} layers (use 1..{num_layers - 1})")
        out.append(("block", k, block_layers(num_layers, k)))
        if k > 1:
            out.append(("scattered", k, spread_layers(num_layers, k)))
    if include_all:
        out.append(("all", num_layers, list(range(num_layers))))
    return out


def timed_greedy(model, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the wall time of ``generate`` (synchronized on CUDA)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    tokens = greedy_tokens(model, prompts, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens, time.perf_counter() - t0


def token_match_experiment(model, morpher, prompts: torch.Tensor, cfg: MatchConfig = MatchConfig()):
    """Rows (one per condition) and per-prompt rows of match fraction and common-prefix length."""
    if morpher.int4_layers():
        raise MorphError(f"the morpher already has INT4 layers {morpher.int4_layers()}: restore() it first")
    if prompts.dim() != 2 or prompts.shape[0] < 1:
        raise MorphError(f"prompts must be token ids [n, length], got shape {tuple(prompts.shape)}")
    timed_greedy(model, prompts, cfg.new_tokens)  # warm-up: first-call kernel selection must not enter the timings
    ref, secs = timed_greedy(model, prompts, cfg.new_tokens)
    runs = [("fp16", 0, [], ref, secs)]
    tokens, secs = timed_greedy(model, prompts, cfg.new_tokens)
    runs.append(("fp16 repeat", 0, [], tokens, secs))
    for name, k, layers in conditions(morpher.num_layers, cfg.counts, cfg.include_all):
        with morpher.morphed(layers):
            tokens, secs = timed_greedy(model, prompts, cfg.new_tokens)
        runs.append((name, k, layers, tokens, secs))
    rows, per_prompt = [], []
    for name, k, layers, tokens, secs in runs:
        m = token_match(ref, tokens)
        rows.append({"condition": name, "k": k, "layers": " ".join(map(str, layers)),
                     "match": float(m["match"].mean()), "match_min": float(m["match"].min()),
                     "prefix": float(m["prefix"].mean()), "prefix_median": float(np.median(m["prefix"])),
                     "ms_per_token": secs / cfg.new_tokens * 1e3, "prompts": int(tokens.shape[0])})
        per_prompt += [{"condition": name, "k": k, "prompt": i, "match": float(a), "prefix": float(b)}
                       for i, (a, b) in enumerate(zip(m["match"], m["prefix"]))]
    return rows, per_prompt


def headline(rows: list[dict], counts, status: dict) -> dict:
    """Key figures: match per condition and k, the 16-bit control, decode speed, vLLM availability."""
    fig = lambda v, unit, label: {"value": v, "unit": unit, "label": label}  # noqa: E731
    get = lambda cond, k=None: next(r for r in rows if r["condition"] == cond and (k is None or r["k"] == k))  # noqa: E731
    out = {"engine": "HF transformers (vLLM fallback)",
           "fp16_repeat_match": fig(get("fp16 repeat")["match"], "", "16-bit run vs itself (control; must be 1)")}
    for k in counts:
        out[f"block_match_{k}"] = fig(get("block", k)["match"], "", f"Token match, block of {k} layers INT4")
        if k > 1:
            out[f"scattered_match_{k}"] = fig(get("scattered", k)["match"], "", f"Token match, {k} scattered layers INT4")
    if any(r["condition"] == "all" for r in rows):
        out["all_layers_match"] = fig(get("all")["match"], "", "Token match, every layer INT4")
        out["ms_per_token_all_int4"] = fig(get("all")["ms_per_token"], " ms", "generate time per new token, all INT4")
    out["ms_per_token_fp16"] = fig(get("fp16")["ms_per_token"], " ms", "generate time per new token, 16-bit")
    out["vllm_importable"] = bool(status.get("importable"))
    return out
