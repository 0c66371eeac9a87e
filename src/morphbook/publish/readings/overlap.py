"""Chapter 4's readings: what a side-stream swap costs decode against the synchronous control, what INT4
itself changes, and whether the runs were valid.

The synchronous control replays the side run's commits at the same step boundaries, so both decode under
one precision schedule: their stalls compare like for like, and the precision split (quiet side-run steps
against the no-swap run's at the same step) separates what INT4 compute changes in TPOT from overlap. A
target reads "met" only when the run judged it (valid, on a GPU).
"""

from __future__ import annotations

from morphbook.experiments.overlap import by_label
from morphbook.publish import fmt
from morphbook.publish.readings.transfer import judged, valid_sentence
from morphlib.errors import MorphError


def _row(models: list[dict], model: str, batch: int) -> dict:
    for m in models:
        if m["model"] == model and str(batch) in m["batches"]:
            return m["batches"][str(batch)]
    raise MorphError(f"models.json has no {model} at batch {batch}")


def answer_sentence(h: dict) -> str:
    """Synchronous against side-stream: the stall each leaves in decode."""
    sync, stall = h["sync_stall_vs_copy_ratio"], h["boundary_stall_ms"]
    low, high = h["sync_stall_vs_copy_ratio_low"], h["sync_stall_vs_copy_ratio_high"]
    if sync.get("event") is None:
        return "No synchronous stall was measured."
    ok = "met" if low.get("met") and high.get("met") else ("not judged" if low.get("met") is None else "**missed**")
    kind, layers = sync["event"].split()
    event = f"{layers}-layer {kind}"
    text = (f"Synchronously, a {event} at batch {sync['batch']} stalls decode for {fmt.ms(sync['sync_stall_ms'])}, "
            f"{fmt.times(sync['value'])} the isolated copy time of its bytes ({fmt.ms(sync['copy_ms'])}; target "
            f"0.9–1.1×: {ok}). On the side stream the same event leaves {fmt.ms(sync['side_stall_ms'])} in its commit "
            f"steps, and a commit step's time minus its same-state baseline is {fmt.num(stall['value'], 3, signed=True)} ms "
            f"(median, batch {stall['batch']}; target {stall['target']} ms: {judged(stall)}).")
    saved = None if sync["sync_stall_ms"] is None or sync["side_stall_ms"] is None else \
        sync["sync_stall_ms"] - sync["side_stall_ms"]
    if saved is not None:
        text += f" The side stream takes {fmt.ms(saved)} of stall out of decode for that event."
    return text


def tpot_sentence(h: dict) -> str:
    t, p99 = h["tpot_ratio_async_swap"], h["p99_itl_ratio_async_swap"]
    lo, hi = h["tpot_ratio_async_swap_ci95"] or (None, None)
    high = h["tpot_ratio_async_swap_ci95_high"]
    return (f"Over {t['rounds']} interleaved rounds at batch {t['batch']} (the worst), TPOT with side-stream swaps is "
            f"{fmt.times(t['value'], 3)} that without (95 % CI {fmt.interval(lo, hi, 3)}; target: upper end "
            f"{high['target']}: {judged(high)}); the P99 inter-token latency is {fmt.times(p99['value'], 3)} at batch "
            f"{p99['batch']} (target {p99['target']}: {judged(p99)}).")


def precision_sentence(h: dict, models: list[dict], block_layers: int) -> str:
    """What INT4 compute changes at the TPOT headline's batch, and how TPOT splits into precision and overlap."""
    batch = h["tpot_ratio_async_swap"]["batch"]
    row = _row(models, h["model"], batch)
    factor = row["precision_factors"].get(str(block_layers))
    if factor is None:
        return f"No quiet step ran with {block_layers} INT4 layers at batch {batch}: the precision split is not measured."
    prec, over = row["tpot_ratio_side_precision_only"]["mean"], row["tpot_ratio_side_overlap_only"]["mean"]
    faster = "faster" if factor < 1 else "slower"
    return (f"At batch {batch} a step with {block_layers} INT4 layers is {fmt.times(factor, 3)} the 16-bit one "
            f"({fmt.ms(row['int4_step_ms'][str(block_layers)])} against {fmt.ms(row['fp16_step_ms'])}: INT4 is {faster} "
            f"here); of the side-stream runs' step time against no swap, the precision schedule alone accounts for "
            f"{fmt.times(prec, 3)} and what remains, the overlap, for {fmt.times(over, 3)}.")


def checks_sentence(h: dict) -> str:
    valid = valid_sentence(h)
    match = h["tokens_match"]
    lat = h["swap_latency_ms"]
    return (f"{valid}. The side-stream runs' greedy tokens equal the synchronous runs' at {fmt.frac_pct(match['value'])} "
            f"of positions in the worst round (target 100 %: {judged(match)}). A swap is in use "
            f"{fmt.ms(lat['value'])} after its request at batch {lat['batch']}, against {fmt.ms(lat['copy_plus_two_steps_ms'])} "
            f"for its isolated copy plus two steps (target: within it: {judged(h['swap_latency_vs_copy_plus_two_steps'])}).")


def texts(headline: dict, models: list[dict], block_layers: int) -> dict[str, str]:
    """Sentences for chapter 4 (``headline``: summary.json's as saved; ``models``: models.json)."""
    return {"answer": answer_sentence(headline), "tpot": tpot_sentence(headline),
            "precision": precision_sentence(headline, models, block_layers), "checks": checks_sentence(headline)}


def event_rows(models: list[dict]) -> list[dict]:
    """Per model, batch and event kind, what the event cost (for the chapter's table)."""
    return [{"model": m["model"], "batch": int(b), "event": label, **e} for m in models
            for b, row in m["batches"].items() for label, e in by_label(row).items()]
