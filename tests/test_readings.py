"""The chapters' readings: each sentence says what its condition says, on both sides of the condition."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from morphbook.publish.readings import burst, overlap, sensitivity, strategies, transfer, vllm
from morphlib.errors import MorphError

RESULTS = Path(__file__).resolve().parents[1] / "results"


def sp(text):
    """Sentences use no-break spaces before units; compare with plain spaces."""
    if isinstance(text, dict):
        return {k: sp(v) for k, v in text.items()}
    if isinstance(text, tuple):
        return tuple(sp(v) for v in text)
    return text.replace("\u00a0", " ")


def said(f, *args, **kwargs):
    """What a reading function says, with non-breaking spaces as plain ones."""
    return sp(f(*args, **kwargs))


def committed(chapter: str, name: str):
    return json.loads((RESULTS / chapter / name).read_text())


# --------------------------------------------------------------------------- chapter 1
def test_spearman_interval_is_fisher_z_with_bonett_wright_variance():
    lo, hi = sensitivity.spearman_interval(0.31, 30)
    assert lo < 0 < 0.31 < hi < 0.7  # 30 layers cannot tell rho = 0.31 from zero
    assert sensitivity.spearman_interval(1.0, 30) == (1.0, 1.0)
    narrow = sensitivity.spearman_interval(0.31, 300)
    assert narrow[0] > lo and narrow[1] < hi and narrow[0] > 0  # more layers, a narrower interval
    with pytest.raises(MorphError, match="at least 4"):
        sensitivity.spearman_interval(0.5, 3)
    with pytest.raises(MorphError, match="lies in"):
        sensitivity.spearman_interval(1.5, 30)


def test_agreement_words_follow_the_interval():
    assert sensitivity.agreement(0.31, -0.07, 0.61) == "an agreement that cannot be told from none"
    assert sensitivity.agreement(0.44, 0.07, 0.70) == "a weak agreement"
    assert sensitivity.agreement(0.8, 0.72, 0.9) == "a strong agreement"
    assert sensitivity.agreement(-0.6, -0.8, -0.3) == "an ordering opposite to the cost's"
    assert sensitivity.likeness(1.0) == "exactly as" and sensitivity.likeness(0.97) == "almost exactly as"
    assert sensitivity.likeness(0.5) == "differently from how"


def _sens():
    head = {"lis_dominant_term": "LTS", "lis_variance_share_lts": 0.997, "lis_variance_share_lrs": 0.002,
            "lis_variance_share_mds": 0.001, "range_lts": 0.97, "range_lrs": 0.0019, "range_mds": 0.0013,
            "dearest_layer": 29, "cheapest_layer": 6, "dearest_layer_dppl_pct": 2.07, "spearman_kl_vs_dnll": 0.42}
    rho = {"LIS": {"-BI": 1.0, "-dNLL": 0.31}, "LIS (normalised)": {"-dNLL": 0.44}, "LTS": {"-BI": 1.0}}
    return head, rho


def test_sensitivity_sentences_change_with_the_numbers():
    head, rho = _sens()
    t = said(sensitivity.texts, head, rho, 30)
    assert "99.7 %" in t["dominant"] and "whatever the weights say" in t["dominant"]
    assert "exactly as ShortGPT's Block Influence" in t["bi"] and "another name" in t["bi"]
    assert "cannot be told from none" in t["cost"] and t["cost_rho"] == "0.31"
    assert "layer 29 (the last) costs most" in t["dearest"]
    head2 = {**head, "lis_variance_share_lts": 0.6}
    rho2 = copy.deepcopy(rho)
    rho2["LIS"]["-BI"] = 0.5
    rho2["LIS"]["-dNLL"] = 0.9
    t2 = said(sensitivity.texts, head2, rho2, 30)
    assert t2["dominant"].startswith("No term dominates LIS")
    assert "differently from how" in t2["bi"] and "another name" not in t2["bi"]
    assert "strong agreement" in t2["cost"] and "(the last)" in t2["dearest"]
    assert "(the last)" not in said(sensitivity.texts, {**head, "dearest_layer": 12}, rho, 30)["dearest"]


# --------------------------------------------------------------------------- chapter 2
def _row(k, versus, lo, hi, p=0.01, effect=None):
    return {"k": k, "versus": versus, "effect_ci95": [lo, hi], "sign_test_p": p,
            "effect_ppl_pct": (lo + hi) / 2 if effect is None else effect}


def test_two_sided_names_wins_and_losses():
    rows = [_row(2, "greedy LIS", -0.5, -0.1, 0.008), _row(4, "greedy LIS", -0.7, -0.1, 0.033),
            _row(8, "greedy LIS", -0.5, 0.4), _row(12, "greedy LIS", 0.2, 0.8, 0.0016)]
    text = said(strategies.two_sided, rows, "greedy LIS")
    assert "better at k = 2 (−0.30 %, p = 0.008) and k = 4" in text
    assert "worse at k = 12" in text and "the other 1 swap count" in text
    assert strategies.where_short(rows, "greedy LIS") == "better at k = 2 and 4, worse at k = 12"
    same = [_row(2, "greedy LIS", -0.1, 0.1)]
    assert said(strategies.two_sided, same, "greedy LIS").startswith("At no swap count")
    assert strategies.where_short(same, "greedy LIS") == "at no swap count significantly different"
    with pytest.raises(MorphError, match="no paired comparisons"):
        said(strategies.two_sided, rows, "best scattered")


def test_pooled_direction_comes_from_the_interval():
    assert "about as often as not" in said(strategies.pooled_sentence, 0.5, [0.44, 0.57], 0.9, "greedy LIS")
    assert "less often than not" in said(strategies.pooled_sentence, 0.37, [0.32, 0.42], 0.0006, "x")
    assert "more often than not" in said(strategies.pooled_sentence, 0.7, [0.6, 0.8], 0.001, "x")


def _records(ppl: dict[str, list[float]]):
    return [{"strategy": s, "k": k, "heldout_ppl": v, "seed": None} for s, vals in ppl.items()
            for k, v in zip((2, 4), vals)] + [{"strategy": "random", "k": 2, "heldout_ppl": 99.0, "seed": 0}]


def test_spread_names_the_strategy_that_stands_apart_only_when_it_does():
    apart = _records({"block": [10.0, 10.1], "greedy_lis": [10.05, 10.0], "back_to_front": [10.4, 10.5]})
    text = said(strategies.spread_sentence, apart)
    assert text.startswith("Every strategy but *last layers* lies within 1.0 %") and "4.0–5.0 % worse" in text
    assert strategies.stakes(apart) == "The stakes are small"
    mixed = _records({"block": [10.0, 10.5], "greedy_lis": [10.4, 10.0]})  # no strategy worse at every k
    assert strategies.clean_split(strategies.gaps(mixed))[1] == []
    assert "no strategy standing apart" in said(strategies.spread_sentence, mixed)
    wide = _records({"block": [10.0, 10.0], "greedy_lis": [11.0, 10.0], "back_to_front": [20.0, 20.0]})
    assert strategies.stakes(wide) == "The choice matters"


def test_greedy_and_static_lis_sentence():
    sets = {"greedy_lis": {"2": [1, 2], "4": [1, 2, 3, 4]}, "static_lis": {"2": [2, 1], "4": [1, 2, 3, 5]}}
    assert strategies.lis_sentence(sets, [2, 4]) == ("Greedy LIS and static LIS pick identical sets at k = 2 and "
                                                     "different ones at k = 4.")
    sets["static_lis"]["4"] = [4, 3, 2, 1]
    assert "identical sets at every swap count" in strategies.lis_sentence(sets, [2, 4])


def test_middle_sentence_says_where_the_block_sits():
    mid = {"best_block_centre": {"2": 0.2, "24": 0.53, "6": 0.13}, "middle_wins_at_k": [2]}
    text = said(strategies.middle_sentence, mid, [2, 6, 24])
    assert "0.13–0.53" in text and "0.13 at k = 6, 0.53 at k = 24" in text and "between the front and the middle" in text
    assert "1 of 3 swap counts (k = 2)" in text
    front = said(strategies.middle_sentence, {"best_block_centre": {"2": 0.1, "4": 0.3}, "middle_wins_at_k": []}, [2, 4])
    assert "never the middle" in front and front.endswith("of 2 swap counts.")
    assert "in the middle" in said(strategies.middle_sentence, {"best_block_centre": {"2": 0.45, "4": 0.55},
                                                          "middle_wins_at_k": [2, 4]}, [2, 4])


def test_thesis_outcome_follows_the_verdict_labels():
    head = committed("strategies", "summary.json")["headline"]
    paired, records = committed("strategies", "paired.json"), committed("strategies", "records.json")
    both = {**head, "verdict_contiguous_vs_lis": "supported: x", "verdict_contiguous_vs_best_scattered":
            "'matches' supported, 'beats' not: y"}
    assert said(strategies.thesis_sentence, both, paired, records)[0] == "holds"
    one = {**both, "verdict_contiguous_vs_best_scattered": "not supported: z"}
    assert said(strategies.thesis_sentence, one, paired, records)[0] == "does not hold as stated"
    part = {**both, "verdict_contiguous_vs_lis": "partly supported: w"}
    assert said(strategies.thesis_sentence, part, paired, records)[0] == "holds in part"
    with pytest.raises(MorphError, match="starts with its outcome"):
        strategies.verdict_label(": nothing")


def test_strategy_texts_on_the_committed_results():
    s = committed("strategies", "summary.json")
    t = strategies.texts(s["headline"], committed("strategies", "paired.json"), committed("strategies", "records.json"),
                         committed("strategies", "sets.json"), committed("strategies", "middle.json"),
                         s["provenance"]["params"]["ks"])
    assert set(t) >= {"thesis", "lis_label", "lis_by_k", "scattered_by_k", "middle", "spread", "lis_same", "seed"}
    assert all(isinstance(v, str) and v and "_" not in v.replace("Block_", "") for v in t.values())
    assert strategies.strategy_name("greedy_dppl") == "greedy ΔPPL" and strategies.strategy_name("my_rule") == "my rule"
    assert strategies.strategy_order(["random", "back_to_front", "block", "mine"]) == [
        "calibrated block", "last layers", "random sets", "mine"]
    assert strategies.domain_name("moby-dick") == "Moby-Dick" and strategies.domain_name("poetry") == "poetry"


# --------------------------------------------------------------------------- chapter 3
def _fig(value, met=None, **extra):
    return {"value": value, "unit": "", "label": "x", "target": "<= 1", "met": met, **extra}


def _transfer_headline(chosen=True, met=True, valid=True, graphs=True):
    at = {"chunk_bytes": 16 << 20, "pace": "0.8"}
    return {"shape": "llama-2-7b", "valid": valid, "invalid_because": [] if valid else ["lazy CUDA-graph capture at step 3"],
            "cuda_graphs": graphs, "copies_bitwise_exact": True, "chosen_copy_setting": at if chosen else None,
            "copy_setting_read": {**at, "chosen": chosen},
            "copy_bw_under_decode_vs_isolated": {**_fig(0.95, met), "target": ">= 0.9"},
            "decode_slowdown_during_copy": {**_fig(0.021, met), "target": "<= 0.03"},
            "swap_to_use_ms": _fig(9.8), "int4_layer_copy_ms": _fig(2.07, n=200, p99_ms=2.2),
            "fp16_layer_copy_ms": _fig(7.36, n=200, p99_ms=7.5), "pinned_ceiling_gbps": _fig(55.3),
            "pinned_layer_gbps": _fig(55.0), "pageable_layer_gbps": _fig(13.75),
            **{f"verdict_{k}_{p}": f"no practical difference: {k} {p}" for k in ("packed_faster", "less_jitter",
                                                                                "packed_faster_than_chunks")
               for p in ("int4", "fp16")}}


def test_transfer_sentences_follow_the_setting_rule_and_the_verdicts():
    rows = [{"pace": "unpaced", "chunk_bytes": 16 << 20, "slowdown": 0.4}, {"pace": "unpaced", "chunk_bytes": 4 << 20,
                                                                          "slowdown": 0.9}]
    t = sp(transfer.texts(_transfer_headline(), rows))
    assert "the contention vanishes at 16 MiB chunks, pace 0.8" in t["contention"]
    assert "(target >= 0.9: met)" in t["contention"] and "Unpaced, the overlapped steps slow down by up to 40.0 %" in t["contention"]
    assert "4.00× slower" in t["alone"] and "2.07 ms" in t["alone"] and "*it jitters less* — no practical" in t["claims"]
    assert t["checks"].startswith("Every decode run was valid") and "equal to its host copy" in t["checks"]
    worse = sp(transfer.texts(_transfer_headline(chosen=False, met=False), rows))["contention"]
    assert "no chunk size and pacing kept the copies within both targets" in worse and "**missed**" in worse
    cpu = sp(transfer.texts(_transfer_headline(met=None, graphs=False), []))
    assert "not judged" in cpu["contention"] and "eagerly" in cpu["contention"] and "Unpaced" not in cpu["contention"]
    assert "graph-share rule does not apply" in cpu["checks"]
    bad = sp(transfer.texts(_transfer_headline(valid=False), rows))["checks"]
    assert bad.startswith("**Some decode runs are invalid** (lazy CUDA-graph capture at step 3)")


# --------------------------------------------------------------------------- chapter 4
def _overlap_headline(met=True, sync_ratio=1.02, factor=0.94):
    models = [{"model": "shape:llama-2-7b", "batches": {"8": {
        "precision_factors": {"0": 1.0, "16": factor}, "int4_step_ms": {"16": 5.6 * factor}, "fp16_step_ms": 5.6,
        "tpot_ratio_side_precision_only": {"mean": 0.97}, "tpot_ratio_side_overlap_only": {"mean": 1.01}, "events": {}}}}]
    h = {"model": "shape:llama-2-7b", "valid": True, "invalid_because": [], "cuda_graphs": True,
         "tpot_ratio_async_swap": _fig(1.012, batch=8, rounds=5), "tpot_ratio_async_swap_ci95": [1.004, 1.020],
         "tpot_ratio_async_swap_ci95_high": {**_fig(1.020, met), "target": "<= 1.03"},
         "p99_itl_ratio_async_swap": {**_fig(1.05, met, batch=32), "target": "<= 1.1"},
         "boundary_stall_ms": {**_fig(0.08, met, batch=1), "target": "<= 0.2"},
         "sync_stall_vs_copy_ratio": _fig(sync_ratio, batch=8, event="swap 16", sync_stall_ms=33.9, side_stall_ms=0.4,
                                          copy_ms=33.2),
         "sync_stall_vs_copy_ratio_low": _fig(sync_ratio, met and sync_ratio >= 0.9),
         "sync_stall_vs_copy_ratio_high": _fig(sync_ratio, met and sync_ratio <= 1.1),
         "tokens_match": _fig(1.0, met), "swap_latency_ms": _fig(40.1, batch=8, copy_plus_two_steps_ms=44.4),
         "swap_latency_vs_copy_plus_two_steps": _fig(0.9, met)}
    return h, models


def test_overlap_sentences_compare_the_control_with_the_side_stream():
    h, models = _overlap_headline()
    t = sp(overlap.texts(h, models, 16))
    assert t["answer"].startswith("Synchronously, a 16-layer swap at batch 8 stalls decode for 33.9 ms, 1.02×")
    assert "target 0.9–1.1×: met" in t["answer"] and "+0.080 ms" in t["answer"]
    assert "takes 33.5 ms of stall out of decode" in t["answer"]
    assert "1.012× that without (95 % CI 1.004–1.020; target: upper end <= 1.03: met)" in t["tpot"]
    assert "INT4 is faster here" in t["precision"] and "accounts for 0.970×" in t["precision"]
    assert "100.0 % of positions" in t["checks"] and "Every decode run was valid" in t["checks"]
    h2, models2 = _overlap_headline(met=False, sync_ratio=1.4, factor=1.05)
    t2 = sp(overlap.texts(h2, models2, 16))
    assert "**missed**" in t2["answer"] and "INT4 is slower here" in t2["precision"] and "**missed**" in t2["tpot"]
    assert "No quiet step ran with 8 INT4 layers" in sp(overlap.precision_sentence(h, models, 8))
    with pytest.raises(MorphError, match="no shape:llama-2-7b at batch 1"):
        overlap.precision_sentence({**h, "tpot_ratio_async_swap": _fig(1.0, batch=1)}, models, 16)


# --------------------------------------------------------------------------- chapter 5
def _overload(mean, caps=(13440, 22144), hours=(65.9, 16.5)):
    return [{"trace": "azure-conv", "card": "L4", "swapped_layers": k, "capacity_tokens": c,
             "mean_demand_tokens": mean, "overload_pct_hour": h} for k, c, h in zip((0, 16), caps, hours)]


def test_capacity_sentence_tells_an_undersized_card_from_bursts():
    under = said(burst.capacity_sentence, _overload(16230.0), "azure-conv", "L4")
    assert "undersized for this trace on average" in under and "above the mean" in under
    assert "does not show bursts being absorbed" in under
    still = said(burst.capacity_sentence, _overload(30000.0), "azure-conv", "L4")
    assert "still below the mean" in still
    bursty = said(burst.capacity_sentence, _overload(2600.0, hours=(6.6, 2.4)), "azure-conv", "L4")
    assert "comes from bursts" in bursty and "absorbs part of them" in bursty
    flat = said(burst.capacity_sentence, _overload(2600.0, hours=(6.6, 6.6)), "azure-conv", "L4")
    assert "does not reduce it" in flat
    with pytest.raises(MorphError, match="two swap counts"):
        said(burst.capacity_sentence, _overload(1.0)[:1], "azure-conv", "L4")


def test_burstiness_against_poisson():
    rows = [{"trace": "azure-code", "bin_s": 1, "peak_to_mean_rps": 26.1, "poisson_peak_to_mean_rps": 3.9},
            {"trace": "azure-conv", "bin_s": 1, "peak_to_mean_rps": 2.9, "poisson_peak_to_mean_rps": 2.9}]
    assert "6.7 times what random arrivals" in said(burst.burstiness_sentence, rows, "azure-code", 1)
    assert "no burstier than random arrivals" in said(burst.burstiness_sentence, rows, "azure-conv", 1)
    with pytest.raises(MorphError, match="no 10-s bins"):
        said(burst.burstiness_sentence, rows, "azure-code", 10)


def test_gain_sentence_on_the_committed_capacity():
    cap = committed("burst", "capacity.json")
    text = said(burst.gain_sentence, cap, "llama-2-7b", 512.0)
    assert text.startswith("For the llama-2-7b shape (512 KiB") and "but only" in text
    bigger_gain = [dict(r, gain_pct=99.0) if "H100" in r["card"] else r for r in cap]
    assert "but only" not in said(burst.gain_sentence, bigger_gain, "m", 1.0)
    cards = committed("burst", "summary.json")["provenance"]["params"]["cards"]
    assert said(burst.assumptions_sentence, cards).startswith("NVIDIA L4 24 GB: 4,000 prompt tokens/s")


# --------------------------------------------------------------------------- chapter 6
def test_controls_sentence_and_negative_control():
    head = {k: 1.0 for k, _ in vllm.CONTROLS} | {vllm.NEGATIVE: 0.59}
    assert vllm.controls_pass(head, {"other_method_match": 1.0}) == (5, 5, True)
    assert "fails as it must" in said(vllm.controls_sentence, head)
    assert "does **not** fail" in said(vllm.controls_sentence, {**head, vllm.NEGATIVE: 1.0})
    failing = said(vllm.controls_sentence, {**head, "restore_match": 0.9})
    assert failing.startswith("3 of 4 controls read 100 %; failing: a restore")


def test_reconciliation_against_chapter_2s_windows():
    params = committed("vllm", "summary.json")["provenance"]["params"]
    head = committed("vllm", "summary.json")["headline"]
    cond, windows = committed("vllm", "conditions.json"), committed("vllm", "windows.json")
    ch2 = committed("strategies", "window_nll.json")
    rows = vllm.reconcile(cond, windows, ch2)
    assert rows and all(r["range_lo"] <= r["range_hi"] for r in rows)
    assert vllm.reconcile(cond, windows, ch2) == rows  # a fixed seed: the same ranges every build
    t = said(vllm.texts, head, committed("vllm", "controls.json"), cond, windows, params, ch2, 37.54)
    assert "not comparable" in t["reconcile"] and f"{len(rows)} such effects" in t["reconcile"]
    assert "the block at k = " in t["reconcile"]
    # identical per-window losses in both chapters: every effect lies inside chapter 2's range
    same = [dict(w) for w in windows]
    by = {c["layers"]: f"{c.get('ch2_strategy') or c['strategy']}/{c['k']}" for c in cond}
    fake = {key: [w["vllm_nll"] for w in sorted(same, key=lambda w: w["window"]) if w["layers"] == lay] * 8
            for lay, key in by.items()}
    fake.update({f"block/{c['k']}": fake[by[c["layers"]]] for c in cond if c["strategy"] == "block"})
    assert all(r["inside"] for r in vllm.reconcile(cond, same, fake))
    missing = said(vllm.texts, head, {}, cond, windows, params, None, None)
    assert "not available" in missing["reconcile"]
    with pytest.raises(MorphError, match="nothing to reconcile"):
        vllm.reconcile_sentence([], 8, 64, 256, 512, 41.8, 37.5)


def test_tpot_sentence_condition():
    head = {"tpot_ratio_swapped_vs_fp16": 1.028, "tpot_reps": 5, "tpot_ms_16bit": 36.3, "tpot_ms_swapped": 37.3,
            "tpot_ratio_median": 1.011}
    assert "equal within 5 %" in said(vllm.tpot_sentence, head)
    assert "**not** within 5 %" in said(vllm.tpot_sentence, {**head, "tpot_ratio_swapped_vs_fp16": 1.2})


def test_domain_verdicts_prose_names_every_domain_its_genre_and_outcome():
    from morphbook.publish.readings import strategies as reading

    verdicts = {"contiguous_vs_lis": {"spdx-licences": "not supported: greedy LIS beats the contiguous block (win rate 0.36, p=0.0021)",
                                      "email-2002": "not supported: no overall difference (win rate 0.49, p=0.86)"},
                "contiguous_vs_best_scattered": {"moby-dick": "holds: the block wins (win rate 0.70, p=0.001)"}}
    text = reading.domain_verdicts_prose(verdicts, {"spdx-licences": "licence texts", "moby-dick": "narrative fiction"})
    assert text.startswith("Against greedy LIS, held-out domain by domain: spdx-licences (licence texts), not supported — "
                           "greedy LIS beats the contiguous block (win rate 0.36, p=0.0021); email 2002, not supported")
    assert "Against the best scattered set, held-out domain by domain: Moby-Dick (narrative fiction), holds — the block wins" in text
    assert reading.domain_verdicts_prose({}) == "*These results hold no per-domain verdicts.*"
