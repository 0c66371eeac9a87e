"""Chapter 1's readings: which term drives LIS, how LIS ranks layers against Block Influence and
against each layer's direct INT4 cost (with the uncertainty of a rank correlation over few layers)."""

from __future__ import annotations

import math
from statistics import NormalDist

from morphbook.publish import fmt
from morphlib.errors import MorphError

# spearman.json names: every measure oriented so that higher = safer to swap
LIS, LIS_NORM, BI, COST, LTS = "LIS", "LIS (normalised)", "-BI", "-dNLL", "LTS"
DOMINANT_SHARE = 0.9  # a term "dominates" LIS when it carries this share of LIS's variance across layers


def spearman_interval(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a Spearman correlation over ``n`` items: Fisher's z with Bonett and
    Wright's variance (1 + rho^2 / 2) / (n - 3)."""
    if n < 4:
        raise MorphError(f"a rank-correlation interval needs at least 4 items, got {n}")
    if not -1 <= rho <= 1:
        raise MorphError(f"a correlation lies in [-1, 1], got {rho}")
    if abs(rho) == 1:
        return rho, rho
    z, half = math.atanh(rho), NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def likeness(rho: float) -> str:
    """How alike two rankings are, in words (the thresholds are the sentence's condition)."""
    if rho >= 0.995:
        return "exactly as"
    if rho >= 0.95:
        return "almost exactly as"
    if rho >= 0.7:
        return "much as"
    return "differently from how"


def agreement(rho: float, lo: float, hi: float) -> str:
    """What an interval says about a rank correlation: none, weak, moderate or strong agreement."""
    if lo <= 0 <= hi:
        return "an agreement that cannot be told from none"
    if hi < 0:
        return "an ordering opposite to the cost's"
    return "a strong agreement" if lo >= 0.7 else "a moderate agreement" if lo >= 0.4 else "a weak agreement"


def texts(headline: dict, spearman: dict, n_layers: int) -> dict[str, str]:
    """Sentences for chapter 1. ``spearman``: spearman.json; ``n_layers``: the layers ranked."""
    term = headline["lis_dominant_term"]
    share = headline[f"lis_variance_share_{term.lower()}"]
    others = [t for t in ("LTS", "LRS", "MDS") if t != term]
    ranges = fmt.listing(f"{fmt.auto(headline[f'range_{t.lower()}'])} ({t})" for t in others)
    if share >= DOMINANT_SHARE:
        dominant = (f"**{term}** carries {fmt.frac_pct(share)} of LIS's variance across layers: it spans "
                    f"{fmt.auto(headline[f'range_{term.lower()}'])} across layers, the other terms "
                    f"{ranges}, so LIS ranks layers by {term} whatever the weights say.")
    else:
        dominant = (f"No term dominates LIS: the largest, **{term}**, carries {fmt.frac_pct(share)} of its "
                    f"variance across layers (ranges of the others: {ranges}).")
    rho_bi = spearman[LIS][BI]
    bi = (f"LIS ranks the layers {likeness(rho_bi)} ShortGPT's Block Influence does "
          f"(Spearman ρ = {fmt.num(rho_bi)} over {n_layers} layers)")
    if spearman[LTS][BI] >= 0.995 and share >= DOMINANT_SHARE and term == "LTS":
        bi += (": Block Influence is one minus LTS (the cosine between a layer's input and its output; "
               f"ρ = {fmt.num(spearman[LTS][BI])} between them), so a LIS carried by LTS is, on this model, "
               "Block Influence under another name.")
    else:
        bi += "."
    out = {"dominant": dominant, "bi": bi}
    for key, name in (("cost", LIS), ("cost_norm", LIS_NORM)):
        rho = spearman[name][COST]
        lo, hi = spearman_interval(rho, n_layers)
        out[key] = (f"ρ = {fmt.num(rho)} (95 % interval {fmt.interval(lo, hi)} over {n_layers} layers): "
                    f"{agreement(rho, lo, hi)}")
        out[f"{key}_rho"] = fmt.num(rho)
        out[f"{key}_interval"] = fmt.interval(lo, hi)
    out["rho_bi"] = fmt.num(rho_bi)
    dearest, cheapest = headline["dearest_layer"], headline["cheapest_layer"]
    where = " (the last)" if dearest == n_layers - 1 else " (the first)" if dearest == 0 else ""
    out["dearest"] = (f"Swapped alone, layer {dearest}{where} costs most, "
                      f"{fmt.pct(headline['dearest_layer_dppl_pct'], 2, signed=True)} perplexity on calibration "
                      f"text; layer {cheapest} costs least.")
    out["kl_vs_dnll"] = fmt.num(headline["spearman_kl_vs_dnll"])
    return out
