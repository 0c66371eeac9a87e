"""Chapter 5's readings: whether a trace's overload comes from bursts or from a card too small for its
mean demand, and whether its arrivals are burstier than random ones.

The analytic demand model holds each request's whole KV from arrival to completion; "overload" is the
share of the hour in which that demand exceeds the KV capacity. When the *mean* demand already exceeds
the capacity, the card is short of memory most of the time whatever the bursts, and swapped layers
lower the overload by lifting the capacity towards the mean: that is not burst absorption.
"""

from __future__ import annotations

from morphbook.publish import fmt
from morphlib.errors import MorphError

POISSON_LIKE = 1.25  # a peak-to-mean within 25 % of the Poisson one is "what randomness alone gives"
TRACES = {"azure-code": "Azure code", "azure-conv": "Azure conversation", "burstgpt-head": "BurstGPT (first rows)"}


def trace_name(key: str) -> str:
    return TRACES.get(key, key)


def _row(overload: list[dict], trace: str, card: str, layers: int) -> dict:
    for r in overload:
        if r["trace"] == trace and r["card"] == card and r["swapped_layers"] == layers:
            return r
    raise MorphError(f"overload.json has no row for {trace} on {card} with {layers} layers in INT4")


def capacity_sentence(overload: list[dict], trace: str, card: str) -> str:
    """Why the overload of one trace on one card falls as layers are swapped (the module doc's argument)."""
    layers = sorted({r["swapped_layers"] for r in overload if r["trace"] == trace and r["card"] == card})
    if len(layers) < 2:
        raise MorphError(f"overload.json needs at least two swap counts for {trace} on {card}")
    none, most = _row(overload, trace, card, layers[0]), _row(overload, trace, card, layers[-1])
    mean = none["mean_demand_tokens"]
    head = (f"On the {card}, the {trace_name(trace)} trace's demand exceeds the KV capacity "
            f"{fmt.pct(none['overload_pct_hour'])} of the "
            f"hour with {layers[0]} layers in INT4 and {fmt.pct(most['overload_pct_hour'])} with {layers[-1]}.")
    if mean > none["capacity_tokens"]:
        above = "above" if most["capacity_tokens"] > mean else "still below"
        return (head + f" Its mean demand, {fmt.num(mean, 0)} tokens, is larger than the card's capacity of "
                f"{fmt.num(none['capacity_tokens'], 0)} tokens: the card is undersized for this trace on average, "
                f"not only during bursts. {layers[-1]} INT4 layers lift the capacity to "
                f"{fmt.num(most['capacity_tokens'], 0)} tokens, {above} the mean, so the drop says the card catches "
                "up with the average load; it does not show bursts being absorbed.")
    effect = ("the INT4 layers' extra capacity absorbs part of them" if most["overload_pct_hour"] < none["overload_pct_hour"]
              else "the INT4 layers' extra capacity does not reduce it")
    return (head + f" Its mean demand, {fmt.num(mean, 0)} tokens, uses {fmt.pct(100 * mean / none['capacity_tokens'], 0)} "
            f"of the card's {fmt.num(none['capacity_tokens'], 0)} tokens, so the overload comes from bursts above "
            f"that mean, and {effect}.")


def burstiness_sentence(bursts: list[dict], trace: str, bin_s: int) -> str:
    rows = [r for r in bursts if r["trace"] == trace and r["bin_s"] == bin_s]
    if not rows:
        raise MorphError(f"burstiness.json has no {bin_s}-s bins for {trace}")
    r = rows[0]
    ratio, poisson = r["peak_to_mean_rps"], r["poisson_peak_to_mean_rps"]
    verdict = ("no burstier than random arrivals at the same rate" if ratio <= POISSON_LIKE * poisson
               else f"{fmt.num(ratio / poisson, 1)} times what random arrivals at the same rate give")
    return (f"{trace_name(trace)}: the busiest {bin_s}-s bin holds {fmt.times(ratio, 1)} the mean request count "
            f"(Poisson arrivals: {fmt.times(poisson, 1)}), {verdict}.")


def texts(overload: list[dict], bursts: list[dict], card: str) -> dict[str, str]:
    """One capacity sentence and one burstiness sentence (1-s bins) per trace on ``card``."""
    traces = sorted({r["trace"] for r in overload if r["card"] == card})
    if not traces:
        raise MorphError(f"overload.json has no rows for {card!r}")
    out = {}
    for trace in traces:
        out[f"capacity_{trace}"] = capacity_sentence(overload, trace, card)
        out[f"bursts_{trace}"] = burstiness_sentence(bursts, trace, 1)
    return out


def gain_sentence(capacity: list[dict], model: str, kv_kib_per_token: float) -> str:
    """What the most INT4 layers buy on each card, smallest card first."""
    kmax = max(r["swapped_layers"] for r in capacity)
    gains = sorted(((r["card"], r["gain_pct"], r["tokens"]) for r in capacity if r["swapped_layers"] == kmax),
                   key=lambda g: g[2])
    if not gains:
        raise MorphError("capacity.json holds no rows")
    (card0, gain0, _), rest = gains[0], gains[1:]
    text = (f"For the {model} shape ({fmt.num(kv_kib_per_token, 0)} KiB of KV cache per token), {kmax} layers in INT4 "
            f"add {fmt.pct(gain0, signed=True)} of KV capacity on the {card0}")
    if rest:
        smaller = all(g < gain0 for _, g, _ in rest)
        text += ((", but only " if smaller else ", and ")
                 + fmt.listing(f"{fmt.pct(g, signed=True)} on the {c}" for c, g, _ in rest)
                 + (": the same freed bytes are a small part of a larger budget" if smaller else ""))
    return text + "."


def assumptions_sentence(cards: dict) -> str:
    """The per-card service speeds and KV budget the experiment assumed (its ``cards`` parameter)."""
    parts = [f"{c['name']}: {fmt.num(c['prefill_tokens_per_s'], 0)} prompt tokens/s and "
             f"{fmt.ms(1000 * c['tpot_s'])} per output token, a KV budget of {fmt.pct(100 * c['utilization'], 0)} of "
             f"its memory minus the FP16 weights minus {fmt.num(c['reserve_bytes'] / 2**30, 1)} GiB"
             for c in sorted(cards.values(), key=lambda c: c["memory_bytes"])]
    return "; ".join(parts)
