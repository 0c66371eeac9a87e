"""The introduction's first screen: "Results at a glance" (what holds, what does not, what is not yet
tested, each placed by a comparison made on the results) and the findings table (about a dozen rows
with readers' labels, units and intervals; the source column from each result's own device record).

Both read the results the pages show: the committed ones where they exist, else the fresh run's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from morphbook.chapters import ALL, chapter
from morphbook.experiments.transfer import setting_text
from morphbook.publish import fmt
from morphbook.publish.page import Shown, same_dir, short_commit, used_device
from morphbook.publish.readings import sensitivity as read_sens
from morphbook.publish.readings import strategies as read_strat
from morphbook.publish.readings import vllm as read_vllm
from morphbook.publish.stale import status
from morphbook.publish.store import load_summary

BENCHMARKS_DOC = "/book/benchmarks"


def load(name: str, fresh_root, committed_root) -> Shown | None:
    """A result as the pages show it: committed where present (unless the fresh run wrote there), else fresh."""
    for root, committed in ((committed_root, True), (fresh_root, False)):
        if committed and same_dir(fresh_root, committed_root):
            continue
        summary = load_summary(name, root)
        if summary is not None:
            return Shown(name, summary, Path(root), committed, status(name, summary, root))
    return None


def source(shown: Shown) -> str:
    prov = shown.summary.get("provenance") or {}
    short, _ = used_device(prov, shown.chapter)
    state = "" if shown.status.state == "ok" else f" **{shown.status.state}**"
    return f"{short}, {(prov.get('date') or '?')[:10]}, {short_commit(prov)}{state}"


def link(name: str, present: set[str] | None) -> str:
    ch = chapter(name)
    if ch.number is None:
        return f"{{doc}}`Benchmarks <{BENCHMARKS_DOC}>`"
    if present is not None and name not in present:
        return f"{ch.number}. {ch.title}"
    return f"{ch.number}. {{doc}}`{ch.title} </{ch.docname}>`"


# --------------------------------------------------------------------------- rows, one function per result
def _sensitivity(s: Shown) -> list[tuple[str, str]]:
    h, sp = s.headline, s.json("spearman.json")
    n = len(s.json("layers.json"))
    term = h["lis_dominant_term"]
    lo, hi = read_sens.spearman_interval(sp[read_sens.LIS][read_sens.COST], n)
    return [("Term that drives LIS (its share of LIS's variance across layers)",
             f"{term}, {fmt.frac_pct(h[f'lis_variance_share_{term.lower()}'])}"),
            ("Rank agreement of LIS with Block Influence (Spearman ρ)", fmt.num(sp[read_sens.LIS][read_sens.BI])),
            (f"Rank agreement of LIS with each layer's direct INT4 cost (Spearman ρ, 95 % interval over {n} layers)",
             f"{fmt.num(sp[read_sens.LIS][read_sens.COST])} ({fmt.interval(lo, hi)})")]


def _win(rate, ci, p) -> str:
    return f"{fmt.num(rate)} (95 % CI {fmt.interval(*ci)}; {fmt.pval(p)})"


def _strategies(s: Shown) -> list[tuple[str, str]]:
    h = s.headline
    which = read_strat.best_scattered_names(h["per_k"])
    return [("Calibrated block vs greedy LIS: held-out win rate over window pairs, all swap counts",
             f"{_win(h['heldout_win_rate_block_vs_greedy_lis'], h['ci95'], h['sign_test_p'])}: "
             f"{read_strat.verdict_label(h['verdict_contiguous_vs_lis'])}"),
            (f"Calibrated block vs the best scattered set ({which}): held-out win rate",
             _win(h["heldout_win_rate_block_vs_best_scattered"], h["ci95_vs_best_scattered"],
                  h["sign_test_p_vs_best_scattered"]) + ": "
             f"{read_strat.verdict_label(h['verdict_contiguous_vs_best_scattered'])}"),
            ("Seed project's protocol: oracle-block wins of trials (selection alone predicts)",
             f"{h['seed_protocol_wins']:,} of {h['seed_protocol_trials']:,} "
             f"({fmt.num(h['seed_protocol_selection_expected'], 1)})")]


def _transfer(s: Shown) -> list[tuple[str, str]]:
    h = s.summary["headline"]
    if "engine" not in h:  # made before chapter 3 ran on the engine: nothing here reads that format
        return []
    bw, slow = h["copy_bw_under_decode_vs_isolated"], h["decode_slowdown_during_copy"]
    at = h["copy_setting_read"]
    return [(f"Copy of one {h['shape']}-shape layer on the idle engine, median: INT4 head vs 16-bit region",
             f"{fmt.ms(h['int4_layer_copy_ms']['value'])} vs {fmt.ms(h['fp16_layer_copy_ms']['value'])} "
             f"(pinned ceiling {fmt.num(h['pinned_ceiling_gbps']['value'], 1)} GB/s)"),
            (f"Copies while the engine decodes ({setting_text(at['chunk_bytes'], at['pace'])}, worst batch): "
             "bandwidth / idle, slowdown of the overlapped steps", f"{fmt.num(bw['value'], 3)}, {fmt.frac_pct(slow['value'])}")]


def _overlap(s: Shown) -> list[tuple[str, str]]:
    h = s.summary["headline"]
    if "engine" not in h:  # made before chapter 4 ran on the engine
        return []
    t, sync = h["tpot_ratio_async_swap"], h["sync_stall_vs_copy_ratio"]
    lo, hi = h["tpot_ratio_async_swap_ci95"] or (None, None)
    return [(f"TPOT with side-stream swaps / without ({h['model']}, batch {t['batch']}, 95 % CI)",
             f"{fmt.times(t['value'], 3)} ({fmt.interval(lo, hi, 3)})"),
            ("Decode stall of a swap, synchronous control vs side stream (the same event)",
             f"{fmt.ms(sync.get('sync_stall_ms'))} vs {fmt.ms(sync.get('side_stall_ms'))}")]


def _burst(s: Shown) -> list[tuple[str, str]]:
    h, p = s.headline, s.params
    k = max(p["swap_counts"])
    rows = [(f"KV-cache capacity gained by {k} INT4 layers ({p['model']} shape): 24 GB L4 vs 80 GB card",
             f"{fmt.pct(h[f'l4_kv_gain_pct_{k}_layers'], signed=True)} vs {fmt.pct(h[f'h100_kv_gain_pct_{k}_layers'], signed=True)}")]
    bursts = {(r["trace"], r["bin_s"]): r for r in s.json("burstiness.json")}
    pairs = [(t, bursts[(t, 1)]) for t in ("azure-code", "azure-conv") if (t, 1) in bursts]
    if pairs:
        rows.append(("Burstiness: busiest 1-s bin over the mean request count (Poisson arrivals at the same rate)",
                     "; ".join(f"{'code' if t.endswith('code') else 'conversation'} {fmt.times(r['peak_to_mean_rps'], 1)} "
                               f"({fmt.times(r['poisson_peak_to_mean_rps'], 1)})" for t, r in pairs)))
    return rows


def _vllm(s: Shown) -> list[tuple[str, str]]:
    h = s.headline
    passed, total, _ = read_vllm.controls_pass(h, s.json("controls.json"))
    return [("Swaps inside a running vLLM engine: controls at 100 %; negative control (must fall below)",
             f"{passed} of {total}; {fmt.frac_pct(h.get(read_vllm.NEGATIVE))}"),
            ("Time per output token in vLLM, swapped / unswapped (INT4 values stored at full precision)",
             fmt.times(h["tpot_ratio_swapped_vs_fp16"], 3))]


def targets(headline: dict) -> list[tuple[str, dict]]:
    """The (key, entry) pairs of a benchmark headline that carry a target of their own."""
    return [(k, v) for k, v in headline.items() if isinstance(v, dict) and "target" in v and "met" in v]


def _bench(s: Shown, what: str) -> list[tuple[str, str]]:
    rows = targets(s.summary["headline"])
    if not rows:
        return []
    met = [k for k, v in rows if v["met"]]
    return [(f"{what}: targets met", f"{len(met)} of {len(rows)}")]


ROWS: dict[str, Callable[[Shown], list[tuple[str, str]]]] = {
    "sensitivity": _sensitivity, "strategies": _strategies, "transfer": _transfer, "overlap": _overlap,
    "burst": _burst, "vllm": _vllm,
    "engine": lambda s: _bench(s, "Serving engine benchmark"),
    "kernels": lambda s: _bench(s, "INT4 kernel benchmark (worst INT4 / bf16 time per row band)"),
}


def findings_markdown(fresh_root: str | os.PathLike, committed_root: str | os.PathLike = "results",
                      present: set[str] | None = None) -> str:
    """The findings table (a captioned MyST table), one or more rows per result, in book order."""
    lines = [":::{table} Findings, read from each result's summary (value with 95 % intervals where the result has them)",
             ":name: tbl-findings", "", "| chapter | finding | value | computed on, date, code |",
             "| :--- | :--- | :--- | :--- |"]
    for ch in ALL:
        if ch.name not in ROWS:
            continue
        shown = load(ch.name, fresh_root, committed_root)
        if shown is None:
            if ch.number is not None:
                lines.append(f"| {link(ch.name, present)} | no results yet | | |")
            continue
        for i, (label, value) in enumerate(ROWS[ch.name](shown)):
            first, src = (link(ch.name, present), source(shown)) if i == 0 else ("", "")
            lines.append(f"| {first} | {label} | {value} | {src} |".replace("\n", " "))
    return "\n".join(lines + [":::", ""])


# --------------------------------------------------------------------------- results at a glance
HOLDS, PARTLY, FAILS, UNTESTED = "Holds", "Holds in part", "Does not hold", "Not yet tested"


def verdict_status(label: str) -> str:
    """A verdict rule's outcome (``readings.strategies.verdict_label``) as a glance heading."""
    if label == "supported":
        return HOLDS
    if label == "not supported":
        return FAILS
    return PARTLY  # "partly supported", "'matches' supported, 'beats' not"


def _claims(get: Callable[[str], Shown | None]) -> list[tuple[str, str]]:
    """(heading, one short item) per claim the results decide; the thesis itself leads the box separately."""
    out = []
    if (s := get("strategies")) is not None:
        label = read_strat.verdict_label(s.headline["verdict_contiguous_vs_lis"])
        out.append((verdict_status(label), f"**The block matches or beats greedy LIS** ({label}): "
                    f"{read_strat.where_short(s.json('paired.json'), 'greedy LIS')}."))
        label = read_strat.verdict_label(s.headline["verdict_contiguous_vs_best_scattered"])
        out.append((verdict_status(label), f"**The block matches or beats the best scattered set** ({label}): "
                    f"{read_strat.where_short(s.json('paired.json'), 'best scattered')}."))
        middle = s.json("middle.json")
        centre = middle["best_block_centre"].values()
        label = read_strat.verdict_label(s.headline["verdict_middle_layers_safest"])
        out.append((verdict_status(label), f"**Middle layers are safest** ({label}): the calibrated block's centre "
                    f"sits at {fmt.num(min(centre))}–{fmt.num(max(centre))} of depth; a centred block beats both end "
                    f"blocks at {len(middle['middle_wins_at_k'])} of {len(s.params['ks'])} swap counts."))
    if (s := get("sensitivity")) is not None:
        sp, n = s.json("spearman.json"), len(s.json("layers.json"))
        rho = sp[read_sens.LIS][read_sens.COST]
        lo, hi = read_sens.spearman_interval(rho, n)
        out.append((FAILS if lo <= 0 else PARTLY if lo < 0.7 else HOLDS,
                    f"**LIS predicts which layers INT4 hurts**: ρ = {fmt.num(rho)} with each layer's direct cost "
                    f"(95 % interval {fmt.interval(lo, hi)}), {read_sens.agreement(rho, lo, hi)}; LIS ranks layers "
                    f"{read_sens.likeness(sp[read_sens.LIS][read_sens.BI])} Block Influence does "
                    f"(ρ = {fmt.num(sp[read_sens.LIS][read_sens.BI])})."))
    if (s := get("vllm")) is not None:
        controls = s.json("controls.json")
        passed, total, negative_fails = read_vllm.controls_pass(s.headline, controls)
        out.append((HOLDS if passed == total and negative_fails else FAILS,
                    f"**Swapping layers inside a running vLLM engine is exact**: {passed} of {total} controls at "
                    f"100 %; the negative control {'fails as it must' if negative_fails else 'does not fail'} "
                    f"({fmt.frac_pct(s.headline.get(read_vllm.NEGATIVE))})."))
    for name, what in (("engine", "The serving engine reaches its"), ("kernels", "The INT4 kernels reach their")):
        if (s := get(name)) is not None and (rows := targets(s.summary["headline"])):
            met = sum(1 for _, v in rows if v["met"])
            out.append((HOLDS if met == len(rows) else PARTLY if met else FAILS,
                        f"**{what} performance targets**: {met} of {len(rows)} "
                        f"({{doc}}`benchmarks <{BENCHMARKS_DOC}>`)."))
    if (burst := get("burst")) is not None:
        out.append(_burst_claim(burst.summary["headline"]))
    return out


BURST_STATES = {"holds": HOLDS, "holds in part": PARTLY, "does not hold": FAILS}


def _burst_claim(h: dict) -> tuple[str, str]:
    """Chapter 5's pre-registered verdict (``headline["verdict"]``); results made before it existed are untested."""
    v = h.get("verdict") or {}
    state = v.get("state", "not yet tested")
    claim = "**Swaps cut SLO violations and P95 time to first token under bursty load**"
    if state not in BURST_STATES:
        done, planned = h.get("engine_replays", 0), h.get("engine_replays_registered")
        of = f"{done} of {planned}" if planned else f"{done}"
        return (UNTESTED, f"{claim}: {of} pre-registered engine replays run ({state}); chapter 5 has its trace "
                          "statistics and KV-capacity arithmetic only.")
    return (BURST_STATES[state], f"{claim} ({state}, setting {v.get('setting')}, policy {v.get('policy')}, "
                                 f"{len(v.get('windows', {}))} trace windows; chapter 5's pre-registered rule).")


def _family_claims(roots) -> list[tuple[str, str]]:
    """Another model family whose chapter-2 run is CPU-profile only has its verdicts "not yet tested"."""
    out = []
    for root in roots:
        summary = load_summary("strategies", root)
        if summary is None or summary["provenance"].get("profile") == "gpu":
            continue
        h, p = summary["headline"], summary["provenance"]["params"]
        lo, hi = h["ci95"]
        why = (f"too few to tell the block from greedy LIS (win rate 95 % CI {fmt.interval(lo, hi)})" if lo <= 0.5 <= hi
               else f"win rate against greedy LIS {fmt.num(h['heldout_win_rate_block_vs_greedy_lis'])}")
        out.append((UNTESTED, f"**The verdicts on another model family**: {p['model']} has only a small CPU-profile "
                    f"run ({p.get('heldout_windows', '?')} held-out windows, k = {fmt.listing(p.get('ks', []))}): {why}."))
    return out


def family_roots(committed_root: str | os.PathLike = "results") -> list[Path]:
    """Results of other model families: results/families/<model>/."""
    base = Path(committed_root) / "families"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def glance_markdown(fresh_root: str | os.PathLike, committed_root: str | os.PathLike = "results",
                    families: list | None = None) -> str:
    """The "Results at a glance" box: claims grouped under Holds / Holds in part / Does not hold / Not yet tested.
    ``families``: roots of other model families' results (default: ``family_roots(committed_root)``)."""
    get = lambda name: load(name, fresh_root, committed_root)  # noqa: E731
    claims = _claims(get)
    claims += _family_claims(family_roots(committed_root) if families is None else families)
    parts = ["::::{admonition} Results at a glance", ":class: tip", ""]
    if (s := get("strategies")) is not None:
        parts += [read_strat.thesis_sentence(s.headline, s.json("paired.json"), s.json("records.json"))[1], ""]
    for heading in (HOLDS, PARTLY, FAILS, UNTESTED):
        items = [text for st, text in claims if st == heading]
        if items:
            parts += [f"**{heading}**", ""] + [f"- {t}" for t in items] + [""]
    loaded = [(ch, sh) for ch in ALL if (sh := get(ch.name)) is not None]
    stale = [ch for ch, sh in loaded if sh.status.state != "ok"]
    if stale:
        which = "every result above" if len(stale) == len(loaded) else fmt.listing(
            f"chapter {ch.number}" if ch.number else f"the {ch.name} results" for ch in stale)
        parts += [f"*Made by code that has changed since (**STALE**), awaiting a rerun: {which}.*", ""]
    parts.append("::::")
    return "\n".join(parts) + "\n"

