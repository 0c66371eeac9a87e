"""Chapter 6's readings: whether the controls pass, and how the engine's losses square with chapter 2's.

The two chapters do not score the same windows (chapter 6: a few short held-out windows, float32 on
CPU, INT4 values calibrated in float32; chapter 2: many longer windows, bfloat16 on a GPU), so their
absolute perplexity changes are not comparable. What can be compared is the *difference* between the
block and each other set on the same windows of each chapter: chapter 6's effect is set against the
range that chapter 2's effect takes when only as many of its windows are drawn as chapter 6 scores
(95 % of 4,000 draws without replacement, seed 0). An effect inside that range is as far from
chapter 2's as window sampling alone makes it; one outside it is not explained by sampling.
"""

from __future__ import annotations

import numpy as np

from morphbook.publish import fmt
from morphbook.publish.readings.strategies import strategy_name
from morphlib.errors import MorphError

DRAWS = 4000

# (headline key, what it checks); each must read 1.0 (100 %)
CONTROLS = (("vllm_vs_hf_fp32_match", "vLLM agrees with transformers token for token in float32"),
            ("fp16_repeat_match", "the unswapped engine repeats itself"),
            ("restore_match", "a restore gives the never-swapped output again"),
            ("baked_checkpoint_match", "a swap in place equals a fresh engine loaded with the same values"))
NEGATIVE = "no_reset_control_match"  # must fall below 1.0


def control_checks(headline: dict, controls: dict | None = None) -> list[tuple[str, str, float | None]]:
    """(key, what it checks, token match) of every control that must read 100 %."""
    checks = [(key, what, headline.get(key)) for key, what in CONTROLS]
    if controls and controls.get("other_method_match") is not None:
        checks.append(("other_method_match", "vLLM's own weight reload gives the same output as the re-pack",
                       controls["other_method_match"]))
    return checks


def controls_pass(headline: dict, controls: dict | None = None) -> tuple[int, int, bool]:
    """(controls at 100 %, controls, whether the negative control fails as it must)."""
    checks = control_checks(headline, controls)
    neg = headline.get(NEGATIVE)
    return sum(1 for c in checks if c[2] is not None and c[2] >= 1.0), len(checks), neg is not None and neg < 1.0


def controls_sentence(headline: dict, controls: dict | None = None) -> str:
    checks = control_checks(headline, controls)
    passed = [c for c in checks if c[2] is not None and c[2] >= 1.0]
    failed = [c for c in checks if c not in passed]
    neg = headline.get(NEGATIVE)
    text = (f"{len(passed)} of {len(checks)} controls read 100 %" + (": " + "; ".join(c[1] for c in passed) if not failed
                                                                       else f"; failing: {'; '.join(c[1] for c in failed)}"))
    if neg is None:
        return text + ". The negative control did not run."
    if neg < 1.0:
        return text + (f". The negative control fails as it must: skipping the prefix-cache reset after a swap leaves "
                       f"only {fmt.frac_pct(neg)} of tokens equal to the correct output.")
    return text + ". The negative control does **not** fail (100 % without the prefix-cache reset): the swap went unseen."


def _by_layers(rows: list[dict], field: str) -> dict[str, np.ndarray]:
    out: dict[str, list[float]] = {}
    for r in sorted(rows, key=lambda r: r["window"]):
        out.setdefault(r["layers"], []).append(r[field])
    return {k: np.asarray(v) for k, v in out.items()}


def effect_pct(a: np.ndarray, b: np.ndarray) -> float:
    """Perplexity of set a relative to set b on the same windows, in percent."""
    return float(100 * np.expm1(np.mean(a - b)))


def sampling_range(diff: np.ndarray, n: int, seed: int = 0) -> tuple[float, float]:
    """95 % range of the effect over draws of ``n`` of the windows whose per-window NLL differences are ``diff``."""
    if n >= len(diff):
        value = float(100 * np.expm1(diff.mean()))
        return value, value
    rng = np.random.default_rng(seed)
    draws = [100 * np.expm1(rng.choice(diff, n, replace=False).mean()) for _ in range(DRAWS)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def reconcile(conditions: list[dict], windows: list[dict], ch2_window_nll: dict) -> list[dict]:
    """Per k and non-block strategy: block-vs-other effect here, in chapter 2, and chapter 2's sampling range."""
    nll = _by_layers(windows, "vllm_nll")
    block = {c["k"]: c for c in conditions if c["strategy"] == "block"}
    rows = []
    for c in conditions:
        if c["strategy"] == "block" or c["k"] not in block or c["layers"] == block[c["k"]]["layers"]:
            continue
        k, other = c["k"], c.get("ch2_strategy") or c["strategy"]
        a, b = f"block/{k}", f"{other}/{k}"
        if a not in ch2_window_nll or b not in ch2_window_nll:
            continue
        here = effect_pct(nll[block[k]["layers"]], nll[c["layers"]])
        diff = np.asarray(ch2_window_nll[a]) - np.asarray(ch2_window_nll[b])
        lo, hi = sampling_range(diff, len(nll[c["layers"]]))
        rows.append({"k": k, "versus": strategy_name(other), "here_pct": here, "ch2_pct": float(100 * np.expm1(diff.mean())),
                     "range_lo": lo, "range_hi": hi, "inside": lo <= here <= hi})
    return rows


def reconcile_sentence(rows: list[dict], n_here: int, n_ch2: int, len_here: int, len_ch2: int,
                       ppl_here: float, ppl_ch2: float, conditions: list[dict] | None = None) -> str:
    if not rows:
        raise MorphError("nothing to reconcile: no block-versus-other comparison is in both chapters' files")
    blocks = [c for c in conditions or [] if c["strategy"] == "block" and c.get("ch2_dppl_pct") is not None]
    example = ""
    if blocks:
        c = max(blocks, key=lambda c: abs(c["vllm_dppl_pct"] - c["ch2_dppl_pct"]))
        example = (f" (the block at k = {c['k']}: {fmt.pct(c['vllm_dppl_pct'], 2, signed=True)} here, "
                   f"{fmt.pct(c['ch2_dppl_pct'], 2, signed=True)} in chapter 2)")
    inside = [r for r in rows if r["inside"]]
    outside = [r for r in rows if not r["inside"]]
    text = (f"The two chapters score different windows ({n_here} of {len_here} tokens here, {n_ch2} of {len_ch2} in "
            f"chapter 2; 16-bit perplexity {fmt.num(ppl_here)} against {fmt.num(ppl_ch2)}), in different precision, "
            "with INT4 values calibrated in that precision, so their absolute perplexity changes are not comparable"
            f"{example}. "
            f"Compared instead is how much worse or better the block is than each other set on each chapter's own "
            f"windows: {len(inside)} of {len(rows)} such effects lie inside the range that {n_here} of chapter 2's "
            "windows give by chance")
    if not outside:
        return text + ", so the engine's numbers differ from chapter 2's no more than window sampling explains."
    listed = fmt.listing(f"{r['versus']} at k = {r['k']} ({fmt.pct(r['here_pct'], 2, signed=True)} here, "
                         f"{fmt.pct(r['ch2_pct'], 2, signed=True)} in chapter 2)" for r in outside)
    return (text + f"; {len(outside)} do not: block against {listed}. Window sampling alone does not explain those; "
            "the different INT4 values or window lengths may, and these files cannot tell which.")


def tpot_sentence(headline: dict, tolerance: float = 0.05) -> str:
    """Time per output token swapped against unswapped: equal within ``tolerance``, as it must be when the
    INT4 values are stored at full precision (the same dense GEMMs run), or flagged as noise."""
    ratio = headline["tpot_ratio_swapped_vs_fp16"]
    text = (f"Time per output token (best of {headline['tpot_reps']} interleaved runs each): "
            f"{fmt.ms(headline['tpot_ms_16bit'])} unswapped, {fmt.ms(headline['tpot_ms_swapped'])} swapped, a ratio of "
            f"{fmt.num(ratio, 3)} (of the medians: {fmt.num(headline['tpot_ratio_median'], 3)}); ")
    if abs(ratio - 1) <= tolerance:
        return text + (f"equal within {fmt.pct(100 * tolerance, 0)}, as it must be with the values stored at full "
                       "precision.")
    return text + (f"**not** within {fmt.pct(100 * tolerance, 0)}: the swapped model runs the same dense GEMMs, so this "
                   "is timing noise (other work on the machine) or a measurement problem, not a property of the swap.")


def swap_sentence(headline: dict) -> str:
    text = (f"A swap inside the engine takes {fmt.ms(headline['swap_ms'])} per set in the median "
            f"({fmt.ms(headline['swap_ms_per_layer'])} per layer) and a restore {fmt.ms(headline['restore_ms'])} "
            f"(method: {headline['swap_method']})")
    reload = {k.split("_largest_block_")[0].replace("_ms", ""): v for k, v in headline.items() if "_largest_block_" in k}
    if reload:
        text += (f"; with vLLM's own `reload_weights`, the largest block takes "
                 + fmt.listing(f"{fmt.ms(v)} to {op}" for op, v in reload.items()))
    return text + "."


def texts(headline: dict, controls: dict, conditions: list[dict], windows: list[dict], params: dict,
          ch2_window_nll: dict | None, ch2_ppl16: float | None) -> dict[str, str]:
    out = {"controls": controls_sentence(headline, controls),
           "engine_vs_hf": (f"Inside the engine, every set's perplexity change equals transformers' on the same "
                            f"windows to within {fmt.pct(100 * headline['dppl_vllm_vs_hf_max_rel_diff'], 3)} of the "
                            "change (same weights, same windows)."),
           "swap": swap_sentence(headline), "tpot": tpot_sentence(headline)}
    ch2 = params.get("chapter2_params") or {}
    if ch2_window_nll is None or not ch2 or ch2_ppl16 is None:
        out["reconcile"] = ("Chapter 2's per-window losses are not available to this run, so its numbers cannot be "
                            "set beside the engine's window by window.")
    else:
        rows = reconcile(conditions, windows, ch2_window_nll)
        out["reconcile"] = reconcile_sentence(rows, params["heldout_windows"], ch2["heldout_windows"],
                                              params["heldout_len"], ch2["window_len"],
                                              headline["heldout_ppl_16bit_vllm"], ch2_ppl16, conditions)
    return out
