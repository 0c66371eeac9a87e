"""Chapter 3's readings: what a swap's copies cost on the engine alone, whether they contend with decode, and
how long until a swapped layer is used.

Every comparison is made here on the chapter's headline and its contention rows: a target is "met" only
when the run judged it (a valid run on a GPU), the setting "at which the contention vanishes" is the
experiment's fixed rule's choice, and the packing claims are the experiment's verdicts (rules fixed
before the data: faster beyond 5 %, less jitter at half the relative P99 spread).
"""

from __future__ import annotations

from morphbook.experiments.transfer import setting_text
from morphbook.publish import fmt


def judged(entry: dict) -> str:
    """'met', 'missed' or 'not judged' (an invalid run, or not on a GPU) for a headline figure with a target."""
    if entry.get("met") is None:
        return "not judged"
    return "met" if entry["met"] else "**missed**"


def alone_sentence(h: dict) -> str:
    swap, rest = h["int4_layer_copy_ms"], h["fp16_layer_copy_ms"]
    text = (f"On the idle engine one {h['shape']}-shape layer's INT4 head crosses in {fmt.ms(swap['value'])} and its "
            f"16-bit region in {fmt.ms(rest['value'])} (median of {swap['n']} and {rest['n']} ops; P99 "
            f"{fmt.ms(swap['p99_ms'])} and {fmt.ms(rest['p99_ms'])}). One contiguous pinned copy reaches at best "
            f"{fmt.num(h['pinned_ceiling_gbps']['value'], 1)} GB/s, one 16-bit layer as one pinned copy "
            f"{fmt.num(h['pinned_layer_gbps']['value'], 1)} GB/s")
    pinned, pageable = h["pinned_layer_gbps"]["value"], h["pageable_layer_gbps"]["value"]
    if pageable:
        text += f" and from pageable host memory {fmt.num(pageable, 1)} GB/s ({fmt.times(pinned / pageable)} slower)"
    return text + "."


def claims_sentence(h: dict) -> str:
    """The original project's claims, each as the experiment's verdict says."""
    parts = []
    for payload, name in (("int4", "INT4 head"), ("fp16", "16-bit region")):
        parts.append(f"For a layer's {name}, *one packed copy is faster than many* — {h[f'verdict_packed_faster_{payload}']}; "
                     f"*it jitters less* — {h[f'verdict_less_jitter_{payload}']}; against the engine's own chunks — "
                     f"{h[f'verdict_packed_faster_than_chunks_{payload}']}.")
    return " ".join(parts)


def contention_sentence(h: dict, rows: list[dict]) -> str:
    """Whether copies and decode contend, at the chosen setting (or the engine's default when none met both
    targets), against the unpaced copies at the same chunk size."""
    bw, slow = h["copy_bw_under_decode_vs_isolated"], h["decode_slowdown_during_copy"]
    chosen, at = h["chosen_copy_setting"], h["copy_setting_read"]
    where = setting_text(at["chunk_bytes"], at["pace"])
    decodes = "with CUDA graphs" if h["cuda_graphs"] else "(eagerly: no CUDA graphs on this engine)"
    if chosen:
        head = (f"While the engine decodes {decodes} the contention vanishes at {where}, the fastest copy setting "
                "within both targets at every batch:")
    else:
        head = (f"While the engine decodes {decodes}, no chunk size and pacing kept the copies within both targets at "
                f"every batch; at the engine's chunk size, {where}:")
    text = (f"{head} the copies' chunks reach {fmt.num(bw['value'], 3)} of their idle bandwidth at the worst batch "
            f"(target {bw['target']}: {judged(bw)}) and the steps they overlap slow down by "
            f"{fmt.frac_pct(slow['value'])} (target {slow['target']}: {judged(slow)}).")
    unpaced = [r["slowdown"] for r in rows if r["pace"] == "unpaced" and r["slowdown"] is not None
               and r["chunk_bytes"] == at["chunk_bytes"]]
    if unpaced and at["pace"] != "unpaced":
        text += (f" Unpaced, the overlapped steps slow down by up to {fmt.frac_pct(max(unpaced))}: a step's own input "
                 "copy can queue behind a whole layer on the copy engine.")
    return text


def use_sentence(h: dict) -> str:
    use, swap = h["swap_to_use_ms"]["value"], h["int4_layer_copy_ms"]["value"]
    if use is None:
        return "No swap's latency was recorded."
    return (f"From a one-layer swap's request to the end of the first decode step that computes with it takes "
            f"{fmt.ms(use)} at the worst batch, against {fmt.ms(swap)} for the copy alone: the rest is waiting for "
            "step boundaries (the copy starts after the next step's launch, the commit waits for the boundary after "
            "it landed) and the step itself.")


def valid_sentence(h: dict) -> str:
    """Whether the decode runs were valid by the chapters' rule (no lazy capture; >= 95 % graph steps)."""
    if not h["valid"]:
        return "**Some decode runs are invalid** (" + "; ".join(h["invalid_because"]) + "), so no target is judged"
    if not h["cuda_graphs"]:
        return "No decode run captured a graph lazily (this engine runs eagerly: the graph-share rule does not apply)"
    return "Every decode run was valid: no lazy CUDA-graph capture, at least 95 % of the timed steps replayed a graph"


def texts(headline: dict, contention: list[dict]) -> dict[str, str]:
    """Sentences for chapter 3 (``headline``: summary.json's as saved, its figures with their targets;
    ``contention``: contention.json)."""
    valid = valid_sentence(headline)
    exact = "equal" if headline["copies_bitwise_exact"] else "**not equal**"
    return {"alone": alone_sentence(headline), "claims": claims_sentence(headline),
            "contention": contention_sentence(headline, contention), "use": use_sentence(headline),
            "checks": f"{valid}; every copied byte was {exact} to its host copy afterwards."}
