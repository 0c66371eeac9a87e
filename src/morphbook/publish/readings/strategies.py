"""Chapter 2's readings, two-sided: where the calibrated block wins and where it loses, how far apart
the strategies lie, whether greedy and static LIS pick the same layers, where the "middle" block sits.

Significance is the verdict rules' own criterion (``morphbook.experiments.verdicts``): a paired
bootstrap interval of the perplexity effect that excludes zero; the sign test's p is quoted beside it.
"""

from __future__ import annotations

from morphbook.publish import fmt
from morphlib.errors import MorphError

# readers' names, in the order the charts list them
NAMES = {"block": "calibrated block", "greedy_lis": "greedy LIS", "static_lis": "static LIS",
         "static_lis_norm": "static LIS (normalised)", "greedy_dppl": "greedy ΔPPL", "gromov_block": "Gromov block",
         "middle_block": "centred block", "front_to_back": "first layers", "back_to_front": "last layers",
         "random": "random sets", "best_scattered": "best scattered"}


def strategy_order(keys) -> list[str]:
    """Readers' names of ``keys`` in the book's order (unknown strategies last, in their own order)."""
    keys = list(keys)
    return [strategy_name(k) for k in NAMES if k in keys] + [strategy_name(k) for k in keys if k not in NAMES]


DOMAINS = {"moby-dick": "Moby-Dick", "sotu-1790-1999": "State of the Union 1790–1999",
           "sotu-2001-2021": "State of the Union 2001–2021", "email-2002": "email 2002"}


def domain_name(key: str) -> str:
    """A text domain's name for readers; an unknown domain keeps its own name (a genre, a file's stem)."""
    return DOMAINS.get(key, key)


def strategy_name(key: str) -> str:
    """A strategy's name for readers: 'greedy_lis' -> 'greedy LIS'; an unknown key loses its underscores."""
    return NAMES.get(key, key.replace("_", " "))


def domain_verdicts_prose(verdicts: dict[str, dict[str, str]], genres: dict[str, str] | None = None) -> str:
    """The per-domain verdicts in prose: for greedy LIS and for the best scattered set, each held-out domain
    (with its genre) and what the verdict rule found there, from the domains results' verdict strings
    (``{"contiguous_vs_lis": {domain: verdict}, "contiguous_vs_best_scattered": {...}}``)."""
    genres = genres or {}
    parts = []
    for role, versus in (("contiguous_vs_lis", "greedy LIS"), ("contiguous_vs_best_scattered", "the best scattered set")):
        rows = verdicts.get(role) or {}
        if not rows:
            continue
        items = "; ".join(f"{domain_name(d)}" + (f" ({genres[d]})" if d in genres else "")
                          + f", {verdict_label(v)}" + (f" — {v.split(':', 1)[1].strip()}" if ":" in v else "")
                          for d, v in rows.items())
        parts.append(f"Against {versus}, held-out domain by domain: {items}.")
    return " ".join(parts) or "*These results hold no per-domain verdicts.*"


def verdict_label(verdict: str) -> str:
    """The rule's outcome, the part of a verdict string before its colon: 'not supported', 'partly supported'..."""
    head = verdict.split(":", 1)[0].strip()
    if not head:
        raise MorphError(f"a verdict string starts with its outcome, got {verdict!r}")
    return head


def split_by_k(paired: list[dict], versus: str) -> dict[str, list[dict]]:
    """The paired rows against ``versus`` ('greedy LIS' or 'best scattered'), by outcome at each k."""
    rows = sorted((r for r in paired if r["versus"] == versus), key=lambda r: r["k"])
    if not rows:
        raise MorphError(f"no paired comparisons against {versus!r}")
    return {"better": [r for r in rows if r["effect_ci95"][1] < 0],
            "worse": [r for r in rows if r["effect_ci95"][0] > 0],
            "same": [r for r in rows if r["effect_ci95"][0] <= 0 <= r["effect_ci95"][1]], "all": rows}


def _at(rows: list[dict]) -> str:
    return fmt.listing(f"k = {r['k']} ({fmt.pct(r['effect_ppl_pct'], 2, signed=True)}, {fmt.pval(r['sign_test_p'])})"
                       for r in rows)


def two_sided(paired: list[dict], versus: str, name: str | None = None) -> str:
    """'Against greedy LIS the block is significantly better at k = 2 (p = 0.008) and k = 4 (...); significantly
    worse at k = 12 (...); indistinguishable at the other 6 swap counts.'"""
    by = split_by_k(paired, versus)
    name = name or versus
    parts = []
    if by["better"]:
        parts.append(f"significantly better at {_at(by['better'])}")
    if by["worse"]:
        parts.append(f"significantly worse at {_at(by['worse'])}")
    n_same = len(by["same"])
    if n_same == len(by["all"]):
        return f"At no swap count is the block significantly better or worse than {name}."
    if n_same:
        parts.append(f"indistinguishable at the other {fmt.count(n_same, 'swap count')}")
    return f"Against {name} the block is " + "; ".join(parts) + "."


def pooled_sentence(win_rate: float, ci: list[float], p: float, versus: str) -> str:
    """The pooled comparison, with the direction it points (the interval decides it, as in the verdict rules)."""
    lo, hi = ci
    if lo > 0.5:
        lean = "more often than not"
    elif hi < 0.5:
        lean = "less often than not"
    else:
        lean = "about as often as not"
    return (f"Pooled over every swap count, the calibrated block beats {versus} {lean}: on "
            f"{fmt.frac_pct(win_rate, 0)} of window pairs (95 % CI {fmt.frac_interval(lo, hi)}, {fmt.pval(p)}).")


def gaps(records: list[dict]) -> dict[str, dict[int, float]]:
    """Held-out perplexity of each chosen (non-random) set over the best at its k, in percent."""
    det = [r for r in records if r.get("seed") is None]
    if not det:
        raise MorphError("records.json holds no chosen (non-random) sets")
    best = {}
    for r in det:
        best[r["k"]] = min(best.get(r["k"], float("inf")), r["heldout_ppl"])
    out: dict[str, dict[int, float]] = {}
    for r in det:
        out.setdefault(r["strategy"], {})[r["k"]] = 100 * (r["heldout_ppl"] / best[r["k"]] - 1)
    return out


def clean_split(gap: dict[str, dict[int, float]]) -> tuple[list[str], list[str]]:
    """(close, apart): the fewest strategies that are worse at *every* k than every other strategy is at its
    worst k. ``apart`` is empty when no strategy stands apart that cleanly."""
    order = sorted(gap, key=lambda s: max(gap[s].values()))
    for i in range(len(order) - 1, 0, -1):
        close, apart = order[:i], order[i:]
        if min(min(gap[s].values()) for s in apart) > max(max(gap[s].values()) for s in close):
            return close, apart
    return order, []


def spread_sentence(records: list[dict]) -> str:
    gap = gaps(records)
    close, apart = clean_split(gap)
    within = max(max(gap[s].values()) for s in close)
    if not apart:
        return (f"Every strategy lies within {fmt.pct(within)} of the best held-out perplexity at each swap count, "
                "with no strategy standing apart from the others.")
    lo, hi = min(min(gap[s].values()) for s in apart), max(max(gap[s].values()) for s in apart)
    names = fmt.listing(f"*{strategy_name(s)}*" for s in apart)
    return (f"Every strategy but {names} lies within {fmt.pct(within)} of the best held-out perplexity at each "
            f"swap count; {names} {'is' if len(apart) == 1 else 'are'} {fmt.interval(lo, hi, 1)} % worse.")


def same_sets(sets: dict, a: str, b: str, ks: list[int]) -> list[int]:
    """The swap counts at which strategies ``a`` and ``b`` chose the same layers."""
    return [k for k in ks if sorted(sets[a][str(k)]) == sorted(sets[b][str(k)])]


def lis_sentence(sets: dict, ks: list[int]) -> str:
    same = same_sets(sets, "greedy_lis", "static_lis", ks)
    if len(same) == len(ks):
        return ("Greedy LIS (MorphServe's Algorithm 1, MDS recomputed against the layers already swapped) and "
                "static LIS (the top layers of one LIS ranking) pick identical sets at every swap count: "
                "the greedy recomputation changes nothing here.")
    if not same:
        return "Greedy LIS and static LIS pick different sets at every swap count."
    return (f"Greedy LIS and static LIS pick identical sets at k = {fmt.listing(same)} and different ones at "
            f"k = {fmt.listing(k for k in ks if k not in same)}.")


def middle_sentence(middle: dict, ks: list[int]) -> str:
    """Where the calibrated block sits (its centre as a fraction of depth), and how the centred block fares."""
    centre = {int(k): v for k, v in middle["best_block_centre"].items()}
    k_lo, k_hi = min(centre, key=centre.get), max(centre, key=centre.get)
    lo, hi = centre[k_lo], centre[k_hi]
    if hi < 0.4:
        where = "in the front part of the model, never the middle"
    elif lo > 0.6:
        where = "in the back part of the model, never the middle"
    elif lo >= 0.4 and hi <= 0.6:
        where = "in the middle"
    else:
        where = "between the front and the middle" if hi <= 0.6 else "over a wide span of the model"
    wins = [int(k) for k in middle["middle_wins_at_k"]]
    return (f"The calibrated block's centre sits at {fmt.num(lo)}–{fmt.num(hi)} of the model's depth "
            f"({fmt.num(lo)} at k = {k_lo}, {fmt.num(hi)} at k = {k_hi}): {where}. A block centred by "
            f"construction beats both end blocks at {len(wins)} of {fmt.count(len(ks), 'swap count')}"
            + (f" (k = {fmt.listing(wins)})." if wins else "."))


def best_scattered_names(per_k: dict) -> str:
    names = sorted({v["best_scattered_strategy"] for v in per_k.values()})
    if len(names) == 1:
        return f"{strategy_name(names[0])} at every swap count"
    return ", ".join(f"{strategy_name(v['best_scattered_strategy'])} at k = {k}" for k, v in per_k.items())


def texts(headline: dict, paired: list[dict], records: list[dict], sets: dict, middle: dict, ks: list[int]) -> dict[str, str]:
    h = headline
    return {
        "lis_label": verdict_label(h["verdict_contiguous_vs_lis"]),
        "lis_pooled": pooled_sentence(h["heldout_win_rate_block_vs_greedy_lis"], h["ci95"], h["sign_test_p"],
                                      "greedy LIS"),
        "lis_by_k": two_sided(paired, "greedy LIS"),
        "scattered_label": verdict_label(h["verdict_contiguous_vs_best_scattered"]),
        "scattered_pooled": pooled_sentence(h["heldout_win_rate_block_vs_best_scattered"], h["ci95_vs_best_scattered"],
                                            h["sign_test_p_vs_best_scattered"], "the best scattered set"),
        "scattered_by_k": two_sided(paired, "best scattered", "the best scattered set"),
        "scattered_which": best_scattered_names(h["per_k"]),
        "middle_label": verdict_label(h["verdict_middle_layers_safest"]),
        "middle": middle_sentence(middle, ks),
        "spread": spread_sentence(records),
        "lis_same": lis_sentence(sets, ks),
        "seed": (f"The oracle block wins {h['seed_protocol_wins']:,} of {h['seed_protocol_trials']:,} trials; "
                 f"choosing the best of its positions alone predicts {fmt.num(h['seed_protocol_selection_expected'], 1)}."),
        "ppl16": fmt.num(h["heldout_ppl_16bit"]),
        "thesis": thesis_sentence(h, paired, records)[1],
    }


def where_short(paired: list[dict], versus: str) -> str:
    """'better at k = 2 and 4, worse at k = 12' (the significant swap counts only)."""
    by = split_by_k(paired, versus)
    parts = [f"{word} at k = {fmt.listing(r['k'] for r in by[key])}" for key, word in (("better", "better"),
                                                                                      ("worse", "worse")) if by[key]]
    return ", ".join(parts) if parts else "at no swap count significantly different"


def thesis_sentence(headline: dict, paired: list[dict], records: list[dict]) -> tuple[str, str]:
    """(outcome, sentence) of the book's thesis: the block matches or beats both greedy LIS and the best
    scattered set. Outcome: "holds" when both verdicts are "supported" or "'matches' supported", "does not hold
    as stated" when either is "not supported", else "holds in part"."""
    h = headline
    labels = [verdict_label(h["verdict_contiguous_vs_lis"]), verdict_label(h["verdict_contiguous_vs_best_scattered"])]
    if "not supported" in labels:
        outcome = "does not hold as stated"
    elif all(lab == "supported" or lab.startswith("'matches' supported") for lab in labels):
        outcome = "holds"
    else:
        outcome = "holds in part"
    lis, scat = h["ci95"], h["ci95_vs_best_scattered"]
    spread = spread_sentence(records)
    text = (f"The thesis **{outcome}**. Against greedy LIS the calibrated block wins "
            f"{fmt.frac_pct(h['heldout_win_rate_block_vs_greedy_lis'], 0)} of held-out window pairs (95 % CI "
            f"{fmt.frac_interval(*lis)}, {fmt.pval(h['sign_test_p'])}): {where_short(paired, 'greedy LIS')}. Against "
            f"the best scattered set ({best_scattered_names(h['per_k'])}) it wins "
            f"{fmt.frac_pct(h['heldout_win_rate_block_vs_best_scattered'], 0)} (95 % CI {fmt.frac_interval(*scat)}, "
            f"{fmt.pval(h['sign_test_p_vs_best_scattered'])}): {where_short(paired, 'best scattered')}. "
            f"{stakes(records)}: {spread[0].lower()}{spread[1:]}")
    return outcome, text


SMALL_STAKES_PCT = 2.0  # "the stakes are small" when all but the outlying strategies lie this close to the best


def stakes(records: list[dict]) -> str:
    gap = gaps(records)
    close, _ = clean_split(gap)
    within = max(max(gap[s].values()) for s in close)
    return "The stakes are small" if within <= SMALL_STAKES_PCT else "The choice matters"
