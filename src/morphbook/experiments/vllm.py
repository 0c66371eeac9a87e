"""Chapter 6: layers swapped to INT4 values inside a running vLLM engine (CPU build), with controls.

    result = run(Config.for_profile("cpu"), inputs)   # or "gpu": the published sizes (this chapter runs on CPU);
                                                      # inputs: {"strategies": chapter 2's results} (morphbook.publish.inputs)

What it measures, for chapter 2's calibrated layer sets (``block``, ``greedy_lis``, the best
scattered strategy of each k, plus ``front_to_back``) at several swap counts k:

* INT4 values: morphlib's quantizer with chapter 2's settings (AWQ-style scales, group 64,
  asymmetric, calibrated on the same calibration windows), built on the Hugging Face model in
  float32; each linear's replacement is ``Int4Linear.dequantize()`` (the AWQ input scale folded back
  in). The engine then runs ordinary dense float32 GEMMs on those values: **no memory is freed and no
  INT4 kernel runs here**; the chapter measures swap mechanics and quality inside a real engine.
* Quality inside vLLM: greedy tokens vs the unswapped engine (position-wise match and longest
  common prefix) and teacher-forced loss from ``prompt_logprobs`` on held-out windows; the same
  loss from Hugging Face transformers with the same weights on the same windows; chapter 2's numbers
  beside them.
* Timing: swap and restore wall time inside the engine, time per output token with and without the
  swapped layers.
* Controls: vLLM vs HF greedy (float32), a repeat of the unswapped run, the run after restoring,
  a fresh engine loaded from a checkpoint with the same values baked in, and a negative control
  that skips the prefix-cache reset and shows the stale output it causes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from morphbook.experiments.base import ProfileConfig, Result, as_params, int_tuple
from morphlib.eval.corpus import make_windows
from morphlib.errors import MorphError
from morphlib.quant.int4 import GROUP_SIZES
from morphlib.eval.metrics import greedy_tokens, token_match, window_nll as hf_window_nll
from morphlib.models import _export_smollm2, load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.structure import decoder_layers, layer_linears
from morphlib import vllm_morph as vm_lib

STRATEGIES = ("block", "greedy_lis", "best_scattered", "front_to_back")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NOTE = ("The INT4 values are dequantized and stored at full precision (float32) in the engine's ordinary "
        "linear weights: no memory is freed and no INT4 kernel runs in this chapter; it measures the swap "
        "mechanics and the quality of INT4 values inside a real vLLM engine. vLLM runs on CPU on both profiles.")

DEFAULTS = {
    # published sizes: chapter 2's calibration (16 x 512, AWQ 4096 tokens, grid 20)
    "gpu": dict(ks=(2, 4, 8, 12), calib_windows=16, calib_len=512, awq_tokens=4096, awq_grid=20,
                heldout_windows=8, heldout_len=256, prompts=32, prompt_len=64, new_tokens=64,
                control_prompts=8, control_new_tokens=32, timing_prompts=8, timing_new_tokens=48,
                timing_reps=5, swap_reps=5),
    # CI: small everything; swap counts that chapter 2's CPU profile has sets for
    "cpu": dict(ks=(2, 4), calib_windows=4, calib_len=128, awq_tokens=512, awq_grid=10,
                heldout_windows=4, heldout_len=128, prompts=8, prompt_len=32, new_tokens=16,
                control_prompts=4, control_new_tokens=16, timing_prompts=4, timing_new_tokens=16,
                timing_reps=4, swap_reps=2),
}
SIZES = tuple(name for name in DEFAULTS["gpu"] if name != "ks")


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    """The profile's sizes (``cpu``: CI, under 3 minutes; ``gpu``: the published run, also on CPU: vLLM
    cannot be installed on the GPU machines), any field overridden by name."""

    model: str = "smollm2-135m"
    ks: tuple = DEFAULTS["gpu"]["ks"]  # swap counts
    strategies: tuple = STRATEGIES
    group_size: int = 64
    quant_method: str = "awq"
    calib_windows: int = 16
    calib_len: int = 512
    awq_tokens: int = 4096
    awq_grid: int = 20
    heldout_windows: int = 8
    heldout_len: int = 256
    prompts: int = 32
    prompt_len: int = 64
    new_tokens: int = 64
    control_prompts: int = 8
    control_new_tokens: int = 32
    timing_prompts: int = 8
    timing_new_tokens: int = 48
    timing_reps: int = 5
    swap_reps: int = 5
    dtype: str = "float32"
    swap_method: str = "repack"
    kv_cache_gib: float = 1.0
    threads: int = 2
    seed: int = 0
    texts: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "ks", int_tuple("ks", self.ks))
        self.check_counts(*SIZES, "threads")
        self.check_counts("seed", lo=0)
        strategies = (self.strategies,) if isinstance(self.strategies, str) else tuple(self.strategies)
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad or not strategies:
            raise MorphError(f"unknown strategies {bad}: choose from {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategies", strategies)
        if self.group_size not in GROUP_SIZES:
            raise MorphError(f"group size {self.group_size} is not supported: choose one of {GROUP_SIZES}")
        if self.quant_method not in ("awq", "rtn"):
            raise MorphError(f"unknown quantization method {self.quant_method!r}: use 'awq' or 'rtn'")
        if self.dtype not in DTYPES:
            raise MorphError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.swap_method not in vm_lib.METHODS:
            raise MorphError(f"unknown swap method {self.swap_method!r}: use one of {', '.join(vm_lib.METHODS)}")
        if not (isinstance(self.kv_cache_gib, (int, float)) and 0.05 <= self.kv_cache_gib <= 16):
            raise MorphError(f"kv_cache_gib must be a number in 0.05..16, got {self.kv_cache_gib!r}")
        if self.calib_len < 2 or self.heldout_len < 2:
            raise MorphError("calibration and held-out windows need at least 2 tokens")
        if self.timing_new_tokens < 2:
            raise MorphError("timing_new_tokens must be at least 2 (time per output token needs two steps)")


# ----------------------------------------------------------------------------- chapter 2's sets


def chapter2_sets(ch2) -> tuple[dict, dict]:
    """(sets, reference) from chapter 2's results (``ch2``: its :class:`morphbook.publish.inputs.Input`).

    sets: {strategy: {k: [layers]}} for block, greedy_lis, best_scattered (the strategy chapter 2
    found best among the scattered ones at that k) and front_to_back. reference: chapter 2's held-out
    perplexities per (strategy, k), its 16-bit perplexity, which scattered strategy was best, and the
    run's device and sizes.
    """
    raw = ch2.json("sets.json")
    best = {int(k): v["best_scattered_strategy"] for k, v in ch2.headline["per_k"].items()}
    sets = {"block": {}, "greedy_lis": {}, "best_scattered": {}, "front_to_back": {}}
    for name in ("block", "greedy_lis", "front_to_back"):
        sets[name] = {int(k): list(v) for k, v in raw.get(name, {}).items()}
    for k, name in best.items():
        if str(k) in raw.get(name, {}):
            sets["best_scattered"][k] = list(raw[name][str(k)])
    ppl = {}
    for r in ch2.json("records.json") if ch2.has("records.json") else []:
        if r.get("seed") is None:
            ppl[(r["strategy"], int(r["k"]))] = r["heldout_ppl"]
    for k, name in best.items():
        if (name, k) in ppl:
            ppl[("best_scattered", k)] = ppl[(name, k)]
    reference = {"ppl_16bit": ch2.headline.get("heldout_ppl_16bit"), "ppl": ppl, "best_scattered_strategy": best,
                 "device": ch2.provenance.get("device"), "params": ch2.params}
    return sets, reference


def _check_sets(sets: dict, strategies, ks, num_layers: int) -> dict[str, dict[int, list[int]]]:
    out = {}
    for s in strategies:
        if s not in sets:
            raise MorphError(f"no layer sets for strategy {s!r} (have: {', '.join(sets) or 'none'})")
        by_k = {int(k): [int(x) for x in v] for k, v in sets[s].items()}
        out[s] = {}
        for k in ks:
            if k not in by_k:
                raise MorphError(f"strategy {s!r} has no layer set for k={k} (chapter 2 has k in {sorted(by_k)})")
            layers = by_k[k]
            if len(layers) != k or len(set(layers)) != k or not all(0 <= x < num_layers for x in layers):
                raise MorphError(f"strategy {s!r}, k={k}: {layers} is not {k} distinct layers in 0..{num_layers - 1}")
            out[s][k] = sorted(layers)
    return out


# ----------------------------------------------------------------------------- HF side


class HFWeights:
    """Put dense replacement weights into an HF model's linears and back (exact: the original tensors
    are kept and re-attached)."""

    def __init__(self, model):
        self.layers = decoder_layers(model)
        self.lins = [{name.rsplit(".", 1)[-1]: m for name, m in layer_linears(layer).items()} for layer in self.layers]
        self.original = [{n: m.weight.data for n, m in lins.items()} for lins in self.lins]

    def set(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        self.restore()
        for li, per in weights.items():
            for name, w in per.items():
                self.lins[li][name].weight.data = w

    def restore(self) -> None:
        for lins, orig in zip(self.lins, self.original):
            for n, m in lins.items():
                m.weight.data = orig[n]


def int4_values(model, calib_ids: torch.Tensor, cfg: Config) -> list[dict[str, torch.Tensor]]:
    """Per layer {linear: dequantized INT4 weight (float32)}: morphlib's quantizer with chapter 2's settings."""
    qc = QuantConfig(group_size=cfg.group_size, method=cfg.quant_method, awq_tokens=cfg.awq_tokens,
                     awq_grid=cfg.awq_grid)
    morpher = prepare_morphing(model, qc, calibration=calib_ids)
    morpher.swap(range(morpher.num_layers))
    values = []
    for layer in decoder_layers(model):
        values.append({name.rsplit(".", 1)[-1]: twin.dequantize(torch.float32).contiguous()
                       for name, twin in layer_linears(layer).items()})
    morpher.restore()
    return values


def _match(ref: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    return token_match(torch.from_numpy(ref), torch.from_numpy(other))


def _dppl_pct(dnll: float) -> float:
    return 100.0 * math.expm1(dnll)


# ----------------------------------------------------------------------------- the experiment, in stages


@contextlib.contextmanager
def _stage(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = round(time.perf_counter() - t0, 2)


@dataclass
class _Setup:
    """What every stage reads: the HF model, the windows, the layer sets and their INT4 values."""

    cfg: Config
    model_dir: Path
    hf: Any
    tok: Any
    ks: list[int]
    chosen: dict[str, dict[int, list[int]]]  # strategy -> k -> layers
    calib: Any
    held: Any
    prompts: torch.Tensor
    values: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)

    @property
    def conditions(self) -> list[tuple[str, int, list[int]]]:
        return [(s, k, self.chosen[s][k]) for k in self.ks for s in self.cfg.strategies]

    @property
    def unique(self) -> list[tuple[int, ...]]:  # conditions deduplicated by layer set
        return list(dict.fromkeys(tuple(c[2]) for c in self.conditions))

    def weights_for(self, layers) -> dict[int, dict[str, torch.Tensor]]:
        return {li: self.values[li] for li in layers}


@dataclass
class _Engine:
    """The running engine and its morpher: dropped together (vLLM's process-wide state)."""

    llm: Any
    morpher: Any
    cache: dict


def _model_dir(cfg: Config) -> Path:
    if cfg.model in ("smollm2-135m", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return _export_smollm2()
    if (Path(cfg.model) / "config.json").exists():
        return Path(cfg.model)
    raise MorphError(f"chapter 6 needs a local Hugging Face folder for vLLM; {cfg.model!r} is not one")


def _load_hf_and_data(cfg: Config, sets: dict) -> _Setup:
    model_dir = _model_dir(cfg)
    hf, tok = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device="cpu")
    n_layers = len(decoder_layers(hf))
    ks = [k for k in cfg.ks if k < n_layers]
    if not ks:
        raise MorphError(f"swap counts {list(cfg.ks)} leave nothing below the model's {n_layers} layers")
    chosen = _check_sets(sets, cfg.strategies, ks, n_layers)
    calib = make_windows(tok, "calibration", cfg.calib_windows, cfg.calib_len, seed=cfg.seed, texts=cfg.texts)
    held = make_windows(tok, "heldout", cfg.heldout_windows, cfg.heldout_len, seed=cfg.seed, texts=cfg.texts)
    prompt_w = make_windows(tok, "heldout", cfg.prompts, cfg.prompt_len, seed=cfg.seed + 1, texts=cfg.texts)
    return _Setup(cfg, model_dir, hf, tok, ks, chosen, calib, held, prompt_w.ids)


def _hf_reference(s: _Setup) -> dict:
    """HF greedy tokens and per-set HF loss (before vLLM starts: no two thread pools at once)."""
    hfw = HFWeights(s.hf)
    out = {"tokens": greedy_tokens(s.hf, s.prompts, s.cfg.new_tokens, batch_size=16).numpy(),  # no EOS handling, as vLLM's ignore_eos
           "nll0": hf_window_nll(s.hf, s.held.ids, batch_size=8), "nll": {}}
    for layers in tqdm(s.unique, desc="HF loss per layer set", leave=False):
        hfw.set(s.weights_for(layers))
        out["nll"][layers] = hf_window_nll(s.hf, s.held.ids, batch_size=8)
    hfw.restore()
    return out


def _start_engine(s: _Setup) -> _Engine:
    cfg = s.cfg
    llm = vm_lib.make_llm(s.model_dir, dtype=cfg.dtype, max_model_len=max(cfg.heldout_len, cfg.prompt_len + cfg.new_tokens,
                                                                           1024), kv_cache_gib=cfg.kv_cache_gib,
                          seed=cfg.seed, threads=cfg.threads)
    return _Engine(llm, None, {})


def _vllm_reference(s: _Setup, eng: _Engine) -> dict:
    """Unswapped tokens (twice: the repeat control), loss and a probe of the kernels' weights."""
    llm = eng.llm
    out = {"tokens": vm_lib.greedy(llm, s.prompts, s.cfg.new_tokens)}
    llm.reset_prefix_cache()
    out["repeat_tokens"] = vm_lib.greedy(llm, s.prompts, s.cfg.new_tokens)
    out["nll0"] = vm_lib.window_nll(llm, s.held.ids)
    out["probe"] = eng.morpher.probe()
    return out


def _swap_conditions(s: _Setup, eng: _Engine) -> tuple[dict, list[dict]]:
    """Every layer set: swap, greedy tokens, teacher-forced loss, restore."""
    per_set, swap_rows = {}, []
    for layers in tqdm(s.unique, desc="vLLM: swap, generate, score", leave=False):
        sw = eng.morpher.swap(s.weights_for(layers))
        tg0 = time.perf_counter()
        tokens = vm_lib.greedy(eng.llm, s.prompts, s.cfg.new_tokens)
        gen_s = time.perf_counter() - tg0
        nll = vm_lib.window_nll(eng.llm, s.held.ids)
        rs = eng.morpher.restore()
        per_set[layers] = {"tokens": tokens, "nll": nll, "gen_s": gen_s}
        swap_rows.append({"layers": " ".join(map(str, layers)), "k": len(layers), "method": s.cfg.swap_method,
                          "swap_ms": sw.ms, "restore_ms": rs.ms})
    return per_set, swap_rows


def _swap_timing(s: _Setup, eng: _Engine, timing_layers, swap_rows: list[dict]) -> tuple[str, np.ndarray]:
    """Swap/restore timing of both methods on the largest block (rows appended to ``swap_rows``);
    returns the other method and its swapped tokens."""
    cfg, timing_w = s.cfg, s.weights_for(timing_layers)
    for rep in range(cfg.swap_reps):
        sw, rs = eng.morpher.swap(timing_w), eng.morpher.restore()
        swap_rows.append({"layers": " ".join(map(str, timing_layers)), "k": len(timing_layers),
                          "method": cfg.swap_method, "swap_ms": sw.ms, "restore_ms": rs.ms, "rep": rep})
    other_method = "reload" if cfg.swap_method == "repack" else "repack"
    other = vm_lib.VllmMorpher(eng.llm, method=other_method, checkpoint=s.model_dir)
    for rep in range(cfg.swap_reps):
        sw, rs = other.swap(timing_w), other.restore()
        swap_rows.append({"layers": " ".join(map(str, timing_layers)), "k": len(timing_layers),
                          "method": other_method, "swap_ms": sw.ms, "restore_ms": rs.ms, "rep": rep})
    other.swap(timing_w)
    other_tokens = vm_lib.greedy(eng.llm, s.prompts, cfg.new_tokens)
    other.restore()
    return other_method, other_tokens


def _tpot(s: _Setup, eng: _Engine, timing_w) -> list[dict]:
    """Time per output token, unswapped vs swapped, interleaved."""
    cfg, llm = s.cfg, eng.llm
    tprompts = s.prompts[:cfg.timing_prompts]
    rows = []
    for rep in tqdm(range(cfg.timing_reps), desc="time per output token", leave=False):
        for cond in (("16-bit", "swapped") if rep % 2 == 0 else ("swapped", "16-bit")):
            if cond == "swapped":
                eng.morpher.swap(timing_w)
            else:
                llm.reset_prefix_cache()
            _, t_one = vm_lib.timed_greedy(llm, tprompts, 1)
            llm.reset_prefix_cache()
            _, t_full = vm_lib.timed_greedy(llm, tprompts, cfg.timing_new_tokens)
            if cond == "swapped":
                eng.morpher.restore()
            rows.append({"condition": cond, "rep": rep, "prefill_s": t_one, "total_s": t_full,
                         "tpot_ms": (t_full - t_one) / (cfg.timing_new_tokens - 1) * 1e3})
    return rows


def _no_reset_control(s: _Setup, eng: _Engine, timing_w) -> dict:
    """Negative control: swap without resetting the prefix cache, and the stale output it causes."""
    cfg, llm = s.cfg, eng.llm
    ctrl_len = 2 * eng.cache["block_size"] + 32  # two full KV blocks of each prompt can be served from the cache
    ctrl = make_windows(s.tok, "heldout", cfg.control_prompts, ctrl_len, seed=cfg.seed + 2, texts=cfg.texts).ids
    llm.reset_prefix_cache()
    out = {"len": ctrl_len, "ref": vm_lib.greedy(llm, ctrl, cfg.control_new_tokens)}  # fills the prefix cache (16-bit KV)
    eng.morpher.swap(timing_w, reset_cache=False)
    out["stale"] = vm_lib.greedy(llm, ctrl, cfg.control_new_tokens)
    llm.reset_prefix_cache()
    out["fresh"] = vm_lib.greedy(llm, ctrl, cfg.control_new_tokens)
    eng.morpher.restore()
    return out


def _baked_checkpoint(s: _Setup, eng: _Engine, baked_layers) -> dict:
    """A fresh engine on a folder with the same values written in; then both engines are dropped."""
    from morphlib.assets import cache_dir

    cfg = s.cfg
    tmp_root = cache_dir() / "vllm" / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root, prefix="baked-") as tmp:
        vm_lib.write_baked_checkpoint(s.hf, s.tok, s.weights_for(baked_layers), tmp)
        baked = vm_lib.make_llm(tmp, dtype=cfg.dtype, max_model_len=eng.llm.llm_engine.model_config.max_model_len,
                                kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed, threads=cfg.threads)
        out = {"tokens": vm_lib.greedy(baked, s.prompts, cfg.new_tokens), "nll": vm_lib.window_nll(baked, s.held.ids)}
        # engines share vLLM's process-wide state: drop both together, never one while using the other
        eng.morpher = eng.llm = None
        del baked
        gc.collect()
    return out


def run(cfg: Config, inputs: dict) -> Result:
    """Run chapter 6 (see the module docstring). ``inputs["strategies"]``: chapter 2's results, whose
    calibrated layer sets are swapped."""
    t_start = time.perf_counter()
    version = vm_lib.vllm_version()
    vm_lib.require_vllm()  # one line, before any slow work, when vLLM is missing
    vm_lib.engine_env(cfg.threads)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    sets, ch2 = chapter2_sets(inputs["strategies"])
    stages: dict[str, float] = {}
    with _stage(stages, "load_hf_and_data_s"):
        s = _load_hf_and_data(cfg, sets)
    with _stage(stages, "quantize_s"):
        s.values = int4_values(s.hf, s.calib.ids, cfg)
    with _stage(stages, "hf_reference_s"):
        hf_ref = _hf_reference(s)
    with _stage(stages, "vllm_load_s"):
        eng = _start_engine(s)
    eng.cache = vm_lib.prefix_cache_info(eng.llm)
    eng.morpher = vm_lib.VllmMorpher(eng.llm, method=cfg.swap_method, checkpoint=s.model_dir)
    vm_lib.greedy(eng.llm, s.prompts[:2], 2)  # warm-up: first-call kernel setup must not enter the timings
    with _stage(stages, "vllm_reference_s"):
        v_ref = _vllm_reference(s, eng)
    with _stage(stages, "conditions_s"):
        per_set, swap_rows = _swap_conditions(s, eng)
    # restore control: bitwise kernels and tokens
    restore_tokens = vm_lib.greedy(eng.llm, s.prompts, cfg.new_tokens)
    probe1 = eng.morpher.probe()
    restore_bitwise = all(torch.equal(v_ref["probe"][key], probe1[key]) for key in v_ref["probe"])
    timing_layers = s.chosen["block"][max(s.ks)] if "block" in s.chosen else list(s.unique[-1])
    timing_w = s.weights_for(timing_layers)
    with _stage(stages, "swap_timing_s"):
        other_method, other_tokens = _swap_timing(s, eng, timing_layers, swap_rows)
    with _stage(stages, "tpot_s"):
        timing_rows = _tpot(s, eng, timing_w)
    with _stage(stages, "no_reset_control_s"):
        ctrl = _no_reset_control(s, eng, timing_w)
    baked_layers = tuple(s.chosen["greedy_lis"][max(s.ks)] if "greedy_lis" in s.chosen else s.unique[-1])
    cache = eng.cache
    with _stage(stages, "baked_checkpoint_s"):
        baked = _baked_checkpoint(s, eng, baked_layers)
    del eng

    timing_df, swaps_df = pd.DataFrame(timing_rows), pd.DataFrame(swap_rows)
    cond_rows, prompt_rows = _condition_rows(s, per_set, hf_ref, v_ref, swaps_df, ch2)
    cond_df = pd.DataFrame(cond_rows)
    main_sw = swaps_df[swaps_df["method"] == cfg.swap_method]
    controls = {
        "vllm_vs_hf_fp32_match": float(_match(hf_ref["tokens"], v_ref["tokens"])["match"].mean()),
        "fp16_repeat_match": float(_match(v_ref["tokens"], v_ref["repeat_tokens"])["match"].mean()),
        "restore_match": float(_match(v_ref["tokens"], restore_tokens)["match"].mean()),
        "restore_bitwise_kernels": bool(restore_bitwise),
        "baked_checkpoint_match": float(_match(per_set[baked_layers]["tokens"], baked["tokens"])["match"].mean()),
        "baked_checkpoint_layers": list(baked_layers),
        "baked_checkpoint_nll_max_abs_diff": float(np.abs(per_set[baked_layers]["nll"] - baked["nll"]).max()),
        "other_method": other_method,
        "other_method_match": float(_match(per_set[tuple(timing_layers)]["tokens"], other_tokens)["match"].mean())
        if tuple(timing_layers) in per_set else None,
        "no_reset_control_match": float(_match(ctrl["fresh"], ctrl["stale"])["match"].mean()),
        "no_reset_control_stale_vs_16bit_match": float(_match(ctrl["ref"], ctrl["stale"])["match"].mean()),
        "no_reset_control_fresh_vs_16bit_match": float(_match(ctrl["ref"], ctrl["fresh"])["match"].mean()),
        "no_reset_control_layers": list(timing_layers),
        "no_reset_control_prompt_len": ctrl["len"],
        "prefix_cache": cache,
        "vllm_vs_hf_16bit_nll_max_abs_diff": float(np.abs(v_ref["nll0"] - hf_ref["nll0"]).max()),
    }
    headline = _headline(cfg, version, controls, cond_rows, cond_df, timing_df, main_sw,
                         swaps_df[swaps_df["method"] == other_method], timing_layers, v_ref, hf_ref)
    headline.update(wall_s=round(time.perf_counter() - t_start, 1), note=NOTE)
    params = as_params(cfg)
    params.update(ks=s.ks, vllm_version=version, model_dir_name=Path(s.model_dir).name, stages_s=stages,
                  chapter2_device=ch2["device"],
                  chapter2_params={k: ch2["params"].get(k) for k in ("heldout_windows", "window_len", "calib_windows",
                                                                     "awq_tokens", "awq_grid", "group_size",
                                                                     "quant_method")})
    files = {"conditions.json": cond_df, "per_prompt.json": pd.DataFrame(prompt_rows),
             "windows.json": pd.DataFrame(_window_rows(s, per_set, hf_ref, v_ref)), "timing.json": timing_df,
             "swaps.json": swaps_df, "controls.json": controls}
    return Result(params=params, headline=headline, files=files, wall_s=headline["wall_s"])


# ----------------------------------------------------------------------------- tables and headline


def _window_rows(s: _Setup, per_set: dict, hf_ref: dict, v_ref: dict) -> list[dict]:
    rows = []
    for layers in s.unique:
        for w, (a, b) in enumerate(zip(per_set[layers]["nll"], hf_ref["nll"][layers])):
            rows.append({"layers": " ".join(map(str, layers)), "window": w, "vllm_nll": a, "hf_nll": b})
    for w, (a, b) in enumerate(zip(v_ref["nll0"], hf_ref["nll0"])):
        rows.append({"layers": "", "window": w, "vllm_nll": a, "hf_nll": b})
    return rows


def _condition_rows(s: _Setup, per_set: dict, hf_ref: dict, v_ref: dict, swaps_df, ch2: dict) -> tuple[list, list]:
    """One row per (strategy, k): token match, loss in vLLM and HF, chapter 2's; and one per prompt."""
    cond_rows, prompt_rows = [], []
    v_nll0, hf_nll0 = v_ref["nll0"], hf_ref["nll0"]
    for strategy, k, layers in s.conditions:
        key = tuple(layers)
        res = per_set[key]
        m = _match(v_ref["tokens"], res["tokens"])
        v_d = float(res["nll"].mean() - v_nll0.mean())
        h_d = float(hf_ref["nll"][key].mean() - hf_nll0.mean())
        row = {"strategy": strategy, "k": k, "layers": " ".join(map(str, layers)),
               "token_match": float(m["match"].mean()), "token_match_min": float(m["match"].min()),
               "prefix_mean": float(m["prefix"].mean()), "prefix_median": float(np.median(m["prefix"])),
               "vllm_dnll": v_d, "hf_dnll": h_d, "vllm_dppl_pct": _dppl_pct(v_d), "hf_dppl_pct": _dppl_pct(h_d),
               "dppl_rel_diff": abs(v_d - h_d) / abs(h_d) if h_d != 0 else (0.0 if v_d == 0 else math.inf),
               "vllm_ppl": float(math.exp(res["nll"].mean())), "hf_ppl": float(math.exp(hf_ref["nll"][key].mean())),
               "generate_s": res["gen_s"]}
        sw = swaps_df[(swaps_df["layers"] == row["layers"]) & (swaps_df["method"] == s.cfg.swap_method)]
        row["swap_ms"], row["restore_ms"] = float(sw["swap_ms"].iloc[0]), float(sw["restore_ms"].iloc[0])
        p = ch2["ppl"].get((strategy, k))
        p16 = ch2["ppl_16bit"]
        row["ch2_ppl"] = p
        row["ch2_dppl_pct"] = None if p is None or not p16 else 100.0 * (p / p16 - 1.0)
        row["ch2_strategy"] = ch2["best_scattered_strategy"].get(k) if strategy == "best_scattered" else strategy
        cond_rows.append(row)
        prompt_rows += [{"strategy": strategy, "k": k, "prompt": i, "match": float(a), "prefix": float(b)}
                        for i, (a, b) in enumerate(zip(m["match"], m["prefix"]))]
    return cond_rows, prompt_rows


def _headline(cfg: Config, version, controls: dict, cond_rows: list, cond_df, timing_df, main_sw, other_sw,
              timing_layers, v_ref: dict, hf_ref: dict) -> dict:
    med = lambda df, col: float(df[col].median())  # noqa: E731
    # Interleaved runs; other work on the machine only ever slows a run down, so the best run of each
    # condition is the robust estimate (the medians are reported too).
    tp = timing_df.groupby("condition")["tpot_ms"].min()
    tp_med = timing_df.groupby("condition")["tpot_ms"].median()
    timing_sw = main_sw[main_sw["layers"] == " ".join(map(str, timing_layers))]
    other_method = controls["other_method"]
    per_k = {}
    for r in cond_rows:
        per_k.setdefault(str(r["k"]), {})[r["strategy"]] = {
            "layers": r["layers"], "token_match": r["token_match"], "prefix_mean": r["prefix_mean"],
            "vllm_dppl_pct": r["vllm_dppl_pct"], "hf_dppl_pct": r["hf_dppl_pct"], "ch2_dppl_pct": r.get("ch2_dppl_pct")}
    return {
        "vllm_version": version,
        "engine": f"vLLM {version} V1 engine, CPU build, in-process, eager, {cfg.dtype}",
        **{key: controls[key] for key in ("vllm_vs_hf_fp32_match", "fp16_repeat_match", "restore_match",
                                          "restore_bitwise_kernels", "baked_checkpoint_match", "no_reset_control_match")},
        "swap_ms": med(main_sw, "swap_ms"),
        "restore_ms": med(main_sw, "restore_ms"),
        "swap_ms_per_layer": float((main_sw["swap_ms"] / main_sw["k"]).median()),
        "swap_ms_largest_block": med(timing_sw, "swap_ms"),
        "swap_method": cfg.swap_method,
        f"swap_ms_largest_block_{other_method}": med(other_sw, "swap_ms"),
        f"restore_ms_largest_block_{other_method}": med(other_sw, "restore_ms"),
        "tpot_ms_16bit": float(tp.get("16-bit", float("nan"))),
        "tpot_ms_swapped": float(tp.get("swapped", float("nan"))),
        "tpot_ratio_swapped_vs_fp16": float(tp.get("swapped", float("nan")) / tp.get("16-bit", float("nan"))),
        "tpot_ratio_median": float(tp_med.get("swapped", float("nan")) / tp_med.get("16-bit", float("nan"))),
        "tpot_reps": cfg.timing_reps,
        "tpot_layers": list(timing_layers),
        "dppl_vllm_vs_hf_max_rel_diff": float(cond_df["dppl_rel_diff"].max()),
        "heldout_ppl_16bit_vllm": float(math.exp(v_ref["nll0"].mean())),
        "heldout_ppl_16bit_hf": float(math.exp(hf_ref["nll0"].mean())),
        "per_k": per_k,
    }
