"""Chapter 2: which k layers to swap — every strategy chooses on calibration data, all are scored held out.

The primary protocol (the chapter's headline): sets chosen on State of the Union addresses 1790–1999,
scored on *Moby-Dick* and addresses 2001–2021 with paired bootstrap statistics, plus the seed project's
protocol reproduced. Whether the verdicts travel to other domains is ``morphbook.experiments.domains``
(it reads this experiment's sets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from morphbook.experiments.base import ProfileConfig, Result, Stopwatch, as_params, int_tuple
from morphbook.experiments.verdicts import (paired_by_k, pooled, pooled_effect, pooled_versus, verdict_contiguous,
                                             verdict_middle)
from morphlib.errors import MorphError
from morphlib.eval.corpus import make_windows, resolve_texts
from morphlib.eval.metrics import Reference, greedy_tokens
from morphlib.eval.stats import bootstrap_ci, paired_comparison
from morphlib.models import load_model
from morphlib.morph import QuantConfig, prepare_morphing
from morphlib.runtime import make_deterministic
from morphlib.select.sensitivity import layer_passes, mds_given
from morphlib.select.strategies import HeldoutScorer, Selector, evaluate_sets, seed_protocol
from morphlib.structure import num_layers

DEFAULTS = {
    "gpu": dict(ks=(2, 4, 6, 8, 10, 12, 16, 20, 24), seed_protocol_ks=(2, 4, 8, 11), n_random=20, calib_windows=16,
                heldout_windows=64, window_len=512, prompts=16, prompt_len=32, new_tokens=32, awq_tokens=4096,
                awq_grid=20),
    "cpu": dict(ks=(2, 4), seed_protocol_ks=(2,), n_random=3, calib_windows=3, heldout_windows=4, window_len=64,
                prompts=2, prompt_len=16, new_tokens=8, awq_tokens=512, awq_grid=10),
}


@dataclass(frozen=True)
class Config(ProfileConfig, defaults=DEFAULTS):
    model: str = "smollm2-135m"
    texts: str = "default"  # "default", a .txt file/folder, or "hf:<dataset>"; the domain checks need "default"
    calibration_texts: str | None = None  # your own calibration texts (a .txt file or folder), with heldout_texts
    heldout_texts: str | None = None  # your own held-out texts (a .txt file or folder; its name is the domain)
    group_size: int = 64
    quant_method: str = "awq"
    ks: tuple[int, ...] = DEFAULTS["gpu"]["ks"]  # swap counts
    seed_protocol_ks: tuple[int, ...] = DEFAULTS["gpu"]["seed_protocol_ks"]
    n_random: int = 20  # random sets per k
    calib_windows: int = 16
    heldout_windows: int = 64
    window_len: int = 512
    # windows per forward pass. 32 since 2026-11-30 (was 8): 2-3x fewer passes of a Python-bound HF forward;
    # per-window NLL then moves by <= 4.8e-7 (cuBLAS picks its bf16 GEMM kernel by shape; measured on an H200)
    batch_size: int = 32
    n_boot: int = 2000
    seed: int = 0
    prompts: int = 16  # greedy token-match prompts (first tokens of held-out windows)
    prompt_len: int = 32
    new_tokens: int = 32
    awq_tokens: int = 4096
    awq_grid: int = 20
    skip_first_token: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ks", int_tuple("ks", self.ks))
        object.__setattr__(self, "seed_protocol_ks", int_tuple("seed_protocol_ks", self.seed_protocol_ks))
        self.check_counts("n_random", "calib_windows", "heldout_windows", "window_len", "batch_size", "n_boot", "prompts",
                          "prompt_len", "new_tokens", "awq_tokens", "awq_grid")
        if self.prompt_len >= self.window_len:
            raise MorphError(f"prompt_len ({self.prompt_len}) must be shorter than window_len ({self.window_len})")
        QuantConfig(group_size=self.group_size, method=self.quant_method)
        resolve_texts(self.texts, self.calibration_texts, self.heldout_texts)  # both explicit texts or neither


def run(cfg: Config) -> Result:
    if torch.cuda.is_available():
        make_deterministic()  # before any CUDA work: two identical bf16 runs must give identical tokens and bits
    with Stopwatch() as sw:
        torch.manual_seed(cfg.seed)
        lm, tok = load_model(cfg.model)
        n_layers = num_layers(lm)
        dropped = sorted({k for k in cfg.ks + cfg.seed_protocol_ks if k >= n_layers})
        ks = [k for k in cfg.ks if k < n_layers]  # e.g. TinyLlama has 22 layers: k >= 22 is dropped, and said so
        seed_ks = [k for k in cfg.seed_protocol_ks if k < n_layers]
        if not ks or not seed_ks:
            raise MorphError(f"swap counts must lie in 1..{n_layers - 1}; got ks={list(cfg.ks)}, "
                             f"seed_protocol_ks={list(cfg.seed_protocol_ks)}")
        texts = resolve_texts(cfg.texts, cfg.calibration_texts, cfg.heldout_texts)
        calib = make_windows(tok, "calibration", cfg.calib_windows, cfg.window_len, seed=cfg.seed, texts=texts)
        held = make_windows(tok, "heldout", cfg.heldout_windows, cfg.window_len, seed=cfg.seed, texts=texts)
        quant = QuantConfig(group_size=cfg.group_size, method=cfg.quant_method, awq_tokens=cfg.awq_tokens,
                            awq_grid=cfg.awq_grid)
        morpher = prepare_morphing(lm, quant, calibration=calib.ids)
        calib_ref = Reference.compute(lm, calib.ids, cfg.batch_size)
        held_ref = Reference.compute(lm, held.ids, cfg.batch_size)
        prompts = held.ids[:: max(1, len(held) // cfg.prompts)][: cfg.prompts, : cfg.prompt_len]
        scorer = HeldoutScorer(lm, morpher, held_ref, prompts, greedy_tokens(lm, prompts, cfg.new_tokens), cfg.batch_size)
        sw.lap("setup")

        # ---- selection, on calibration data only
        passes = layer_passes(lm, morpher, calib.ids, cfg.batch_size, cfg.skip_first_token)
        mds0 = mds_given(lm, morpher, calib.ids, [], range(n_layers), cfg.batch_size, cfg.skip_first_token)
        selector = Selector(lm, morpher, calib_ref, passes["lts"].mean(0), passes["lrs"].mean(0),
                            passes["angular"].mean(0), mds0, cfg.batch_size)
        sets = selector.select_all(sorted(set(ks + seed_ks)), cfg.n_random, cfg.seed)
        best_scattered = {k: selector.best_scattered(sets, k) for k in ks}
        sw.lap("selection")

        # ---- scoring, on held-out windows
        eval_sets = {name: {k: by_k[k] for k in ks} for name, by_k in sets.items()}
        records, nll = evaluate_sets(eval_sets, scorer, selector)
        rows = paired_by_k(nll, ks, best_scattered, cfg.n_boot, cfg.seed)
        pool_lis = pooled(nll, ks, "greedy_lis", cfg.n_boot, cfg.seed)
        pool_scat = pooled(nll, ks, best_scattered, cfg.n_boot, cfg.seed)
        middle_third = pooled_versus(nll, ks, "block", cfg.n_boot, cfg.seed, first="middle_third_block")
        sw.lap("heldout_scoring")
        seedp = seed_protocol(scorer, {k: sets["greedy_lis"][k] for k in seed_ks}, seed_ks)
        sw.lap("seed_protocol")
        middle = verdict_middle(records, ks, n_layers, sets["block"])

    verdicts = {"contiguous_vs_lis": verdict_contiguous(pool_lis, rows, "greedy LIS"),
                "contiguous_vs_best_scattered": verdict_contiguous(pool_scat, rows, "best scattered"),
                "middle_layers_safest": middle["verdict"]}
    ppl = {(r["strategy"], r["k"]): r["heldout_ppl"] for r in records if r["seed"] is None}
    ppl_ci = lambda key: [float(np.exp(b)) for b in bootstrap_ci(nll[key], cfg.n_boot, cfg.seed)]  # noqa: E731
    effect_ci = lambda k, role: next(r["effect_ci95"] for r in rows if r["k"] == k and r["versus"] == role)  # noqa: E731
    per_k = {str(k): {"block": ppl[("block", k)], "greedy_lis": ppl[("greedy_lis", k)],
                      "best_scattered": ppl[(best_scattered[k], k)], "best_scattered_strategy": best_scattered[k],
                      "block_ci95": ppl_ci(f"block/{k}"), "greedy_lis_ci95": ppl_ci(f"greedy_lis/{k}"),
                      "best_scattered_ci95": ppl_ci(f"{best_scattered[k]}/{k}"),
                      "block_vs_lis_effect_pct_ci95": effect_ci(k, "greedy LIS"),
                      "block_vs_best_scattered_effect_pct_ci95": effect_ci(k, "best scattered"),
                      "middle_third_block": ppl[("middle_third_block", k)],
                      "middle_third_block_ci95": ppl_ci(f"middle_third_block/{k}"),
                      "middle_third_vs_block_effect_pct_ci95": paired_comparison(
                          nll[f"middle_third_block/{k}"], nll[f"block/{k}"], cfg.n_boot, cfg.seed)["effect_ci95"]}
             for k in ks}
    headline = {
        "heldout_ppl_16bit": held_ref.ppl,
        "heldout_win_rate_block_vs_greedy_lis": pool_lis["win_rate"], "ci95": pool_lis["ci95"],
        "sign_test_p": pool_lis["sign_test_p"],
        "heldout_win_rate_block_vs_best_scattered": pool_scat["win_rate"], "ci95_vs_best_scattered": pool_scat["ci95"],
        "sign_test_p_vs_best_scattered": pool_scat["sign_test_p"],
        # held-out perplexity of the block relative to the other, pooled over k (%, negative: block better)
        "heldout_ppl_effect_block_vs_greedy_lis": pooled_effect(nll, ks, "greedy_lis", cfg.n_boot, cfg.seed),
        "heldout_ppl_effect_block_vs_best_scattered": pooled_effect(nll, ks, best_scattered, cfg.n_boot, cfg.seed),
        # the block chosen inside the middle third vs the calibrated block: pooled win rate and perplexity effect
        "middle_third_vs_block": middle_third,
        "seed_protocol_wins": seedp["wins"], "seed_protocol_trials": seedp["trials"],
        "seed_protocol_selection_expected": seedp["selection_expected"],
        "verdict_contiguous_vs_lis": verdicts["contiguous_vs_lis"],
        "verdict_contiguous_vs_best_scattered": verdicts["contiguous_vs_best_scattered"],
        "verdict_middle_layers_safest": verdicts["middle_layers_safest"],
        "per_k": per_k,
        "heldout_ppl_16bit_by_domain": {dom: float(np.exp(held_ref.nll[np.asarray(held.domain) == dom].mean()))
                                        for dom in dict.fromkeys(held.domain)},
        "phase_seconds": sw.phases,
    }
    files = {"sets.json": {name: {str(k): v for k, v in by_k.items()} for name, by_k in sets.items()},
             "records.json": records, "paired.json": rows,
             "pooled.json": {"greedy_lis": pool_lis, "best_scattered": pool_scat},
             "seed_protocol.json": seedp, "window_nll.json": {k: v.tolist() for k, v in nll.items()},
             "selection_log.json": selector.log, "middle.json": middle,
             "windows.json": {"doc": held.doc, "domain": held.domain}}
    params = as_params(cfg, ks=ks, seed_protocol_ks=seed_ks, dropped_ks=dropped,
                       device=str(next(lm.parameters()).device))
    return Result(params, headline, files, sw.seconds)
