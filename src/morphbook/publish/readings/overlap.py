"""Chapter 4's readings: what the side stream saves, compared like for like.

A synchronous swap happens *before* its step's forward pass (which then runs the swapped layers in
INT4); a side-stream swap is enqueued *after* it (that forward still runs in FP16). The two carrying
steps therefore differ by the stall the side stream hides *and* by the forward's precision; the
experiment's stalls (``*_stall_ms``: each carrying step against uneventful steps of the same
precision) are the like-for-like comparison, and the precision gap is read from the uneventful steps.
"""

from __future__ import annotations

from statistics import median

from morphbook.publish import fmt
from morphlib.errors import MorphError


def plain_step_ms(steps: list[dict], mode: str, state: str) -> float | None:
    """Median time of a run's uneventful steps (no swap carried, first step excluded) in one precision."""
    ms = [r["ms"] for r in steps if r["mode"] == mode and r["state"] == state and not r["carried"] and r["step"] > 0]
    return median(ms) if ms else None


def checks_sentence(headline: dict) -> str:
    """The side stream's tokens against the synchronous run's, and the memory a swap released (CUDA only)."""
    parts = []
    match = headline.get("async_tokens_match_sync")
    if match is not None:
        parts.append(f"The side-stream run's tokens equal the synchronous run's at {fmt.frac_pct(match)} of positions"
                     + (" (a missing wait would show as a difference)." if match >= 1.0 else
                        ": **they differ**, so a wait is missing or the runs are not deterministic."))
    if headline.get("freed_mib_measured") is not None:
        parts.append(f"A swap released {fmt.num(headline['freed_mib_measured'], 1)} MiB of device memory "
                     f"(the FP16 minus INT4 bytes of its layers: {fmt.num(headline['freed_mib_expected'], 1)} MiB).")
    return " ".join(parts)


def texts(stats: dict, steps: list[dict], headline: dict | None = None) -> dict[str, str]:
    """Sentences for chapter 4 (``stats``: stats.json; ``steps``: steps.json; ``headline``: its values, for the
    token and memory checks). Needs both the synchronous and the side-stream run (a CUDA run); on the CPU
    fallback it says what is missing."""
    checks = checks_sentence(headline or {})
    if stats.get("async_swap_stall_ms") is None:
        return {"overlap": ("This run has no side-stream swap (no CUDA streams on CPU), so it cannot say what a "
                            "side stream hides. " + checks).strip()}
    for key in ("sync_swap_step_ms", "async_swap_step_ms", "sync_swap_stall_ms"):
        if stats.get(key) is None:
            raise MorphError(f"overlap stats.json lacks {key!r}")
    sync_step, async_step = stats["sync_swap_step_ms"], stats["async_swap_step_ms"]
    sync_stall, async_stall = stats["sync_swap_stall_ms"], stats["async_swap_stall_ms"]
    int4, fp16 = plain_step_ms(steps, "sync", "int4"), plain_step_ms(steps, "sync", "fp16")
    saved = sync_stall - async_stall
    if saved > 0:
        hides = f"the side stream hides {fmt.ms(saved)} ({fmt.pct(100 * saved / sync_stall, 0)}) of the stall"
    elif saved < 0:
        hides = f"the side stream adds {fmt.ms(-saved)} to the stall instead of hiding it"
    else:
        hides = "the side stream hides none of it"
    gap = sync_step - async_step
    text = (f"The step carrying a synchronous swap takes {fmt.ms(sync_step)}, the one carrying a side-stream swap "
            f"{fmt.ms(async_step)} ({fmt.ms(gap)} apart). The two steps differ in more than the copy: the synchronous "
            "swap happens before its step's forward pass, which then runs the swapped layers in INT4, while the "
            "side-stream swap is enqueued after the forward, which still runs in FP16.")
    if int4 is not None and fp16 is not None:
        text += (f" On Hugging Face's eager decode an INT4 forward is {'slower' if int4 > fp16 else 'faster'}: "
                 f"uneventful steps take {fmt.ms(int4)} in INT4 against {fmt.ms(fp16)} in FP16")
        share = (int4 - fp16) / gap if gap > 0 else 0.0
        text += (f", so most of the {fmt.ms(gap)} is the forward's precision, not the side stream." if share >= 0.5
                 else ".")
    text += (f" Like for like, each carrying step against uneventful steps of the same precision, the stall is "
             f"{fmt.ms(sync_stall)} synchronous and {fmt.ms(async_stall)} on the side stream: {hides}.")
    return {"overlap": f"{text} {checks}".strip(), "sync_stall": fmt.ms(sync_stall), "async_stall": fmt.ms(async_stall),
            "saved": fmt.ms(saved)}
