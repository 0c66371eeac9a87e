"""``python -m morphlib bench-engine``: the serving engine as a measuring instrument, all from one run --
its decode step against the HBM roofline and against Hugging Face, INT4 against FP16 at every batch size,
a side-stream layer swap during decode, its memory budget, and its correctness against fp32.

* Ceiling measured in the same run: device-to-device copy bandwidth (``bench.timing.copy_bandwidth_gbps``,
  bytes read + written), and pinned host->device bandwidth for one layer's bytes.
* Roofline of a decode step = (weight bytes read + KV bytes read) / copy bandwidth. Weight bytes: every
  layer's 16-bit matrices (or INT4 bytes), the LM head and norms; KV: every context token's K and V.
* Step time = the engine's whole step (schedule, inputs, CUDA-graph replay, sampling, host sync), median
  over decode-only steps of a full batch; ``gpu_ms`` the device time of the same steps (events). Both
  models (SmolLM2-135M, real weights when in the cache; a Llama-2-7B shape, random weights) in FP16 and
  all-INT4 at every batch size: ``int4_vs_fp16_*`` = FP16 step / INT4 step.
* HF (``bench.hf``): eager ``generate`` per new token; static cache + ``torch.compile``.
* Swap: one layer's INT4 bytes (and its 16-bit bytes for the restore) copied on the engine's copy
  stream while a batch decodes; copy bandwidth from events on the copy stream vs the same copy alone;
  slowdown = total time of the steps that ran while a copy was in flight / the same number of steps at
  the median of the (up to 3) quiet steps just before each operation (same morph state, nearly the same
  context); ``decode_slowdown_vs_first_baseline`` divides by the 20 steps before the first operation.
* Budget: the 7B engine runs inside ``EngineConfig(card=big_card)`` (an L4: the budget chapter 5's
  capacity arithmetic uses); its main KV pool against ``workloads.kvcache.kv_capacity`` for the same card,
  and its allocated / reserved peak over the budget (construction and serving).
* Correctness (``bench.agreement``): ``prompts`` held-out text prompts of ``prompt_len`` tokens, each with
  a forced continuation of ``new_tokens`` (fp32 HF's own greedy tokens, fixed once); reference = fp32 HF
  teacher forcing. The engine (its dtype, paged KV, CUDA graphs, fed the forced tokens one step at a time
  through ``Runner.on_logits``) and HF's incremental decode in the same dtype each give logits at every
  position: top-1 agreement on decisive positions (reference top-2 gap above 4 bf16 ulps of its top logit)
  and on all, KL(fp32 || each). On CPU only this part runs, small, fp32 against fp32.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from collections import Counter

import torch

from morphlib.bench import hf as hfb
from morphlib.bench.agreement import Scores, compare
from morphlib.bench.timing import copy_bandwidth_gbps
from morphlib.device import resolve_device
from morphlib.errors import MorphError, check_int

# key: (comparison, target); "in": an interval. The step: against the roofline and INT4 against FP16 (issue #19)
STEP_TARGETS = {"decode_step_vs_roofline_7b_bs1": ("<=", 1.5), "int4_vs_fp16_step_speedup_7b_bs1": (">=", 1.8),
                "int4_vs_fp16_step_speedup_7b_bs8": (">=", 1.3), "int4_vs_fp16_worst_step_speedup": (">=", 1.0)}
BASELINE_TARGETS = {"smollm2_speedup_vs_hf_compiled_bs1": (">=", 2.0), "smollm2_speedup_vs_hf_eager_bs1": (">=", 10.0),
                    "swap_copy_bw_vs_isolated": (">=", 0.85), "decode_slowdown_during_swap": ("<=", 0.05)}
CORRECTNESS_TARGETS = {"top1_decisive_agreement": (">=", 1.0), "top1_gap_vs_hf_incremental_pts": ("<=", 0.3),
                       "kl_ratio_vs_hf_bf16": ("<=", 1.25), "positions": (">=", 16384),
                       "decisive_excluded_share": ("<=", 0.05)}
# The budget: never over it, not much under it (an engine that reserves too much gives KV blocks away), and
# the same number of KV blocks as chapter 5's capacity arithmetic (issue 17). The 2026-12-03 H200 run read
# 1.04 on the last: the arithmetic *assumes* a 1 GiB reserve (``workloads.kvcache.Card.reserve_bytes``)
# where the engine reserves its *measured* workspace (585 MiB x 1.1); the mend belongs in the arithmetic.
BUDGET_TARGETS = {"kv_blocks_l4_vs_arithmetic": ("in", (0.98, 1.02)), "peak_over_budget_bytes": ("<=", 0),
                  "budget_used_at_peak": ("in", (0.95, 1.0))}
TARGETS = {**STEP_TARGETS, **BASELINE_TARGETS, **CORRECTNESS_TARGETS, **BUDGET_TARGETS}
HF_COMPILED_ANCHOR_MS = 2.9  # the issue's H200 measurement (HF static cache + torch.compile, SmolLM2, bs 1)
SWAP_LAYER = 15
# Seconds per part on an H200 (the 2026-11-30 runs: 89-180 s in all, of which the old top-1 check's 64
# HF generate calls per prompt set were ~45 s a set): the plan's estimate, printed before anything runs.
PLAN_S = {"setup": 8.0, "smollm2_engine": 3.0, "per_decode_row": 0.5, "hf_eager_per_batch": 1.5,
          "hf_compiled": 60.0, "big_engine": 6.0, "swap": 3.0, "big_hf_eager": 5.0,
          "reference_per_token": 0.027, "hf_incremental_per_token": 0.025, "engine_forced_per_token": 0.004,
          "correctness_fixed": 4.0}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def plan_seconds(*, batch_sizes, hf: bool, hf_compiled: bool, prompts: int, new_tokens: int,
                 device_type: str = "cuda") -> dict:
    """The run's parts and their estimated seconds on an H200 (``PLAN_S``); {"total": ...} included."""
    p = PLAN_S
    waves = math.ceil(prompts / 64)
    parts = {"correctness": p["correctness_fixed"] + new_tokens * waves * (
        p["reference_per_token"] + p["hf_incremental_per_token"] + p["engine_forced_per_token"])}
    if device_type == "cuda":
        rows = 2 * len(batch_sizes)
        parts.update(setup=p["setup"], smollm2_engine=p["smollm2_engine"], smollm2_decode=rows * p["per_decode_row"],
                     big_engine=p["big_engine"], big_decode=rows * p["per_decode_row"], swap=p["swap"])
        if hf:
            parts.update(hf_eager=len(batch_sizes) * p["hf_eager_per_batch"], big_hf_eager=p["big_hf_eager"])
        if hf_compiled:
            parts["hf_compiled"] = p["hf_compiled"]
    parts["total"] = sum(parts.values())
    return {k: round(v, 1) for k, v in parts.items()}


# ----------------------------------------------------------------------------- ceilings and decode timing
def h2d_bandwidth(host: torch.Tensor, dst: torch.Tensor, reps: int = 7) -> float:
    """Pinned host -> device copy of ``host`` into ``dst`` (same bytes), alone on a side stream, GB/s."""
    stream = torch.cuda.Stream()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            s.record()
            dst.copy_(host, non_blocking=True)
            e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return host.numel() * host.element_size() / (_median(times) * 1e-3) / 1e9


def step_bytes(llm, batch: int, ctx: int) -> int:
    """Bytes a decode step must read: weights (per the current morph state) + the batch's KV."""
    lay, spec = llm.layout, llm.spec
    w = spec.vocab * spec.hidden * lay.elem + (2 * spec.num_layers + 1) * spec.hidden * lay.elem
    for li in range(spec.num_layers):
        if li in llm.model.int4_layers:
            w += sum(p.nbytes for pieces in lay.int4.values() for p in pieces.values())
        else:
            w += sum(p.nbytes for p in lay.fp16.values())
    kv = batch * ctx * spec.num_layers * 2 * spec.kv_dim * lay.elem
    return w + kv


def run_until_done(llm, seqs, **runner) -> list:
    """Step ``llm`` until every one of ``seqs`` has finished, the runner's attributes ``runner`` set meanwhile
    (``time_gpu=True``, ``on_logits=fn``) and put back after; returns the records of those steps."""
    saved = {name: getattr(llm.runner, name) for name in runner}
    first = len(llm.steps)
    for name, value in runner.items():
        setattr(llm.runner, name, value)
    try:
        while any(s.finished is None for s in seqs):
            llm.step()
    finally:
        for name, value in saved.items():
            setattr(llm.runner, name, value)
    return llm.steps[first:]


def decode_times(llm, batch: int, ctx: int, steps: int, warm: int = 3, seed: int = 0) -> dict:
    """Median wall and device time of decode-only steps of ``batch`` sequences at context ~``ctx``."""
    from morphlib.engine import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    seqs = [llm.add_request(torch.randint(0, llm.spec.vocab, (ctx,), generator=gen).tolist(),
                            SamplingParams(max_tokens=warm + steps + 1, ignore_eos=True)) for _ in range(batch)]
    recs = [r for r in run_until_done(llm, seqs, time_gpu=True) if r.num_seqs == batch and r.num_tokens == batch]
    recs = recs[warm:]
    if not recs:
        raise MorphError(f"no decode-only steps of batch {batch} were seen")
    return {"step_ms": 1e3 * _median([r.end - r.start for r in recs]),
            "gpu_ms": _median([r.gpu_ms for r in recs if r.gpu_ms is not None]),
            "paths": sorted({r.path for r in recs}), "ctx": ctx + warm + len(recs) // 2}


def decode_rows(llm, model: str, state: str, batch_sizes, ctx: int, steps: int, bw_gbps: float) -> list[dict]:
    """One row per batch size: ``decode_times`` beside the step's roofline (and any graph captured for it)."""
    rows = []
    for b in batch_sizes:
        n_caps = len(llm.runner.capture_seconds)
        d = decode_times(llm, b, ctx, steps)
        rows.append({"model": model, "state": state, "batch": b, **d,
                     "roofline_ms": 1e3 * step_bytes(llm, b, d["ctx"]) / (bw_gbps * 1e9),
                     "state_change_capture_s": sum(list(llm.runner.capture_seconds.values())[n_caps:])})
    return rows


# ----------------------------------------------------------------------------- a swap during decode
def swap_overlap(llm, layer: int, batch: int, ctx: int, reps: int = 3, base_steps: int = 20) -> dict:
    """Swap ``layer`` to INT4 and back ``reps`` times while ``batch`` sequences decode."""
    from morphlib.engine import SamplingParams

    lay, morph = llm.layout, llm.copies
    stage = llm.arena.bytes(lay.slot(0), lay.head_bytes)
    bw_int4 = h2d_bandwidth(morph.int4_host[layer][:lay.head_bytes], stage)
    tail = lay.region_bytes - lay.head_bytes
    if lay.main_blocks * lay.block_bytes < lay.region_bytes or llm.bm.num_used:
        raise MorphError("the swap measurement needs an idle engine whose KV pool can hold one layer's bytes")
    scratch = llm.arena.bytes(lay.pool0, lay.region_bytes)  # free KV blocks: no memory outside the budget
    bw_fp16 = h2d_bandwidth(morph.fp16_host[layer], scratch)
    cap_s = llm.precapture([layer])
    gen = torch.Generator().manual_seed(1)
    seqs = [llm.add_request(torch.randint(0, llm.spec.vocab, (ctx,), generator=gen).tolist(),
                            SamplingParams(max_tokens=2000, ignore_eos=True)) for _ in range(batch)]
    while any(not s.output for s in seqs):
        llm.step()
    for _ in range(5):
        llm.step()
    base = [llm.step() for _ in range(base_steps)]
    base_ms = 1e3 * _median([r.end - r.start for r in base])
    ops, recs = [], []
    for _ in range(reps):
        for fn in (llm.swap, llm.restore):
            op = fn([layer])[0]
            while op.phase != "done":
                recs.append(llm.step())
            ops.append(op)
            for _ in range(3):
                recs.append(llm.step())
    for s in seqs:  # end the requests
        s.params.max_tokens = len(s.output) + 1
    run_until_done(llm, seqs)
    spans = []
    for op in ops:
        issue = next(r for r in recs if r.start == op.issued)
        commit = next(r for r in recs if any(o is op for o in r.committed))
        spans.append((issue, commit, [r for r in recs if issue.index <= r.index < commit.index]))
    busy = {r.index for _, commit, over in spans for r in over + [commit]}
    quiet = [r for r in base + recs if r.index not in busy]  # no copy in flight, no commit
    rows, overlapped, adjacent, commits = [], [], [], []
    for op, (issue, commit, over) in zip(ops, spans):
        # the baseline of an op's overlapped steps: the last quiet steps before it, in the same morph state
        # and at nearly the same context (decode slows as contexts grow and as the state changes)
        before = [r for r in quiet if r.index < issue.index and r.state == issue.state][-3:]
        overlapped += [r.end - r.start for r in over]
        adjacent += [_median([r.end - r.start for r in before])] * len(over)
        commits.append(commit.end - commit.start)
        ms = op.copy_ms()
        bw = op.copy_bytes / (ms * 1e-3) / 1e9
        iso = bw_int4 if op.to == "int4" else (lay.head_bytes * bw_int4 + tail * bw_fp16) / lay.region_bytes
        rows.append({"to": op.to, "bytes": op.copy_bytes, "copy_ms": ms, "span_ms": op.span_ms(),
                     "chunks": len(op.events), "copy_gb_s": bw, "isolated_gb_s": iso,
                     "bw_ratio": bw / iso, "steps_overlapped": len(over),
                     "overlapped_step_ms": [1e3 * (r.end - r.start) for r in over],
                     "adjacent_quiet_step_ms": [1e3 * (r.end - r.start) for r in before],
                     "commit_step_ms": 1e3 * (commit.end - commit.start),
                     "requested_to_committed_ms": 1e3 * (op.committed - op.requested)})
    swap_rows = [r for r in rows if r["to"] == "int4"]
    return {"layer": layer, "batch": batch, "baseline_step_ms": base_ms, "precapture_s": cap_s,
            "isolated_h2d_gb_s_int4": bw_int4, "isolated_h2d_gb_s_fp16": bw_fp16, "ops": rows,
            "swap_copy_bw_vs_isolated": _median([r["bw_ratio"] for r in swap_rows]),
            "all_copy_bw_vs_isolated": _median([r["bw_ratio"] for r in rows]),
            "decode_slowdown_during_swap": sum(overlapped) / sum(adjacent) - 1 if overlapped else float("nan"),
            "decode_slowdown_vs_first_baseline": (1e3 * sum(overlapped) / len(overlapped)) / base_ms - 1
            if overlapped else float("nan"),
            "overlapped_steps": len(overlapped),
            "commit_step_slowdown": (1e3 * _median(commits)) / base_ms - 1}


# ----------------------------------------------------------------------------- correctness
def text_prompts(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor | None:
    """``n`` prompts of ``length`` tokens of held-out English text (the default corpus's windows, with the
    tokenizer's special prefix if it has one), [n, length]; None when the corpus is not in the morphlib cache."""
    from morphlib.eval.corpus import make_windows

    try:
        return make_windows(tokenizer, "heldout", n, length, seed=seed).ids
    except Exception:  # noqa: BLE001  (no corpus on this machine: the caller says so)
        return None


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``n`` prompts of ``length`` uniformly random token ids (flat, unnatural next-token distributions)."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def engine_scores(llm, ref, prompts: torch.Tensor) -> tuple[Scores, dict]:
    """The engine fed ``ref``'s continuation one token a step (``Runner.on_logits``), every position's
    logits scored against ``ref``; returns the scores and the steps' paths ({"graph": n, "eager": m})."""
    from morphlib.engine import SamplingParams

    scores = Scores(ref, f"engine ({llm.dtype})")
    cont = ref.continuation.tolist()
    t = len(cont[0])
    seqs = [llm.add_request(p, SamplingParams(max_tokens=t, ignore_eos=True)) for p in prompts.tolist()]
    index = {s.id: i for i, s in enumerate(seqs)}

    def forced(batch, logits, tokens):
        rows = [index[s.id] for s in batch]
        cols = [len(s.output) for s in batch]
        scores.add(rows, cols, logits)
        return [cont[r][c] for r, c in zip(rows, cols)]

    recs = run_until_done(llm, seqs, on_logits=forced)
    if [s.output for s in seqs] != cont:
        raise MorphError("the engine did not take the forced continuation")
    return scores, dict(Counter(r.path for r in recs))


def correctness(llm, hf_model, model32, prompts: torch.Tensor, new_tokens: int, log=print) -> dict:
    """The correctness measure (module doc): the fp32 reference from ``model32``, HF's incremental decode of
    ``hf_model`` and the engine ``llm`` (both in the engine's dtype) scored against it."""
    t0 = time.perf_counter()
    ref = hfb.reference(model32, prompts, new_tokens)
    t_ref = time.perf_counter() - t0
    hf_scores = hfb.incremental_scores(hf_model, ref, prompts)
    t_hf = time.perf_counter() - t0 - t_ref
    eng, paths = engine_scores(llm, ref, prompts)
    out = compare(eng, hf_scores)
    out.update(dtype=str(llm.dtype).removeprefix("torch."), prompts=len(prompts), prompt_len=prompts.shape[1],
               new_tokens=new_tokens, engine_paths=paths,
               seconds={"reference": t_ref, "hf_incremental": t_hf, "engine": time.perf_counter() - t0 - t_ref - t_hf})
    log(f"correctness ({out['positions']} positions, {out['dtype']} vs fp32): engine top-1 "
        f"{out['top1_decisive_agreement']:.4f} on decisive positions ({100 * out['decisive_excluded_share']:.1f} % "
        f"left out), {out['top1_agreement_engine']:.4f} on all (HF incremental {out['top1_agreement_hf_incremental']:.4f}); "
        f"KL engine {out['kl_engine']:.3g}, HF {out['kl_hf_incremental']:.3g}")
    return out


# ----------------------------------------------------------------------------- the run
def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def smollm2_cached() -> bool:
    """Whether the real SmolLM2 weights are already converted in the cache (no fetch: GPU machines have
    no registry, and pip's retries would only burn device time)."""
    from morphlib.assets import cache_dir

    return (cache_dir() / "smollm2" / "hf" / ".complete").exists()


def smollm2_models(device, real: bool):
    """(fp32 model, model in the engine's dtype, tokenizer or None) on ``device``."""
    from morphlib.models import load_model, synthetic_model

    if real:
        model32, tok = load_model("smollm2-135m", dtype=torch.float32, device=device)
    else:
        model32, tok = synthetic_model("smollm2-135m", dtype=torch.float32, device=device), None
    if device.type == "cpu":
        return model32, model32, tok
    return model32, copy.deepcopy(model32).to(torch.bfloat16), tok


def arithmetic_blocks(shape: str, card_key: str) -> int:
    """KV blocks of chapter 5's capacity arithmetic (``workloads.kvcache``) for ``shape`` on a card."""
    from morphlib.cards import get_card
    from morphlib.workloads import kvcache

    name = get_card(card_key).name
    card = next((c for c in kvcache.CARDS.values() if c.name == name), None)
    if card is None:
        raise MorphError(f"chapter 5's capacity arithmetic has no card {card_key!r} ({', '.join(kvcache.CARDS)})")
    return kvcache.kv_capacity(shape, card, 0)["blocks"]


def run_bench(*, batch_sizes=(1, 2, 4, 8, 16, 32, 64), ctx: int = 128, steps: int = 20, hf: bool = True,
              hf_compiled: bool = False, big: str = "llama-2-7b", big_card: str = "L4", swap_batch: int = 16,
              prompts: int = 64, prompt_len: int = 128, new_tokens: int = 256, device=None, log=print) -> dict:
    """Measure everything in one run (module doc); returns {"rows", "headline", ...}. On CPU only the
    correctness measure runs (fp32 engine against fp32 HF)."""
    from morphlib.engine import LLM, EngineConfig

    for name, v in (("ctx", ctx), ("steps", steps), ("swap_batch", swap_batch), ("prompts", prompts),
                    ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        check_int(name, v)
    batch_sizes = tuple(check_int("batch size", b) for b in batch_sizes)
    if 1 not in batch_sizes:
        raise MorphError(f"batch sizes must include 1 (the headline's batch-1 ratios), got {list(batch_sizes)}")
    arithmetic = arithmetic_blocks(big, big_card)  # an unknown shape or card fails here, before any work
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    t_start = time.perf_counter()
    plan = plan_seconds(batch_sizes=batch_sizes, hf=hf, hf_compiled=hf_compiled, prompts=prompts,
                        new_tokens=new_tokens, device_type=dev.type)
    log(f"plan: {', '.join(f'{k} {v:g} s' for k, v in plan.items() if k != 'total')}; estimated {plan['total']:g} s"
        + (" on an H200" if cuda else ""))
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "CPU", "torch": torch.__version__, "ctx": ctx,
           "steps": steps, "batch_sizes": list(batch_sizes), "rows": [], "notes": [], "plan_s": plan, "phase_s": {}}
    phase = _Phases(out["phase_s"])
    mb = max(batch_sizes + (prompts,)) if cuda else prompts
    if cuda:
        bw = out["d2d_copy_gb_s"] = copy_bandwidth_gbps(dev)
        log(f"device {out['device']}, device-to-device copy {bw:.0f} GB/s (read + write)")
        phase("setup")

    # ---------------------------------------------------------------- SmolLM2-135M: correctness, decode
    real = smollm2_cached() or not cuda
    model32, hf_model, tok = smollm2_models(dev, real)
    out["smollm2_weights"] = "real" if real else "random N(0, 0.02) (real weights not in the morphlib cache)"
    t0 = time.perf_counter()
    # HF's forward passes share the process with this engine: its allocator is not capped at the engine's budget
    llm = LLM(hf_model, EngineConfig(memory_budget=4 << 30 if cuda else None, max_num_seqs=mb,
                                     max_num_batched_tokens=max(2048, mb), enforce_budget=False, device=str(dev)))
    out["smollm2_init_s"] = time.perf_counter() - t0
    log(f"smollm2-135m ({out['smollm2_weights']}): engine ready in {out['smollm2_init_s']:.1f} s")
    phase("smollm2_engine")
    texts = text_prompts(tok, prompts, prompt_len) if tok is not None else None
    if texts is None:
        out["notes"].append("correctness on random-token prompts: no real weights or no corpus in the cache")
    ids = texts if texts is not None else random_prompts(llm.spec.vocab, prompts, prompt_len)
    cor = out["correctness"] = correctness(llm, hf_model, model32, ids, new_tokens, log=log)
    cor["prompt_source"] = "held-out text" if texts is not None else "random tokens"
    del model32
    _free()
    phase("correctness")
    if not cuda:
        del llm, hf_model
        out["notes"].append("CPU: only the correctness measure runs (timing, swaps and budgets need a GPU)")
        return _finish(out, t_start, log)

    out["smollm2_memory"] = llm.memory_report()
    bw = out["d2d_copy_gb_s"]
    out["rows"] += decode_rows(llm, "smollm2-135m", "fp16", batch_sizes, ctx, steps, bw)
    t0 = time.perf_counter()
    llm.swap(range(llm.spec.num_layers), wait=True)
    out["smollm2_swap_all_s"] = time.perf_counter() - t0
    out["rows"] += decode_rows(llm, "smollm2-135m", "int4", batch_sizes, ctx, steps, bw)
    out["smollm2_capture_s"] = {f"{len(k[0])}L/b{k[1]}": v for k, v in llm.runner.capture_seconds.items()}
    del llm
    _free()
    phase("smollm2_decode")
    if hf:
        for b in batch_sizes:
            _set_rows(out["rows"], "smollm2-135m", b, hf_eager_ms=hfb.eager_ms(hf_model, b, ctx))
        log("  HF eager generate measured")
        phase("hf_eager")
    if hf_compiled:
        try:
            out["hf_compiled_ms_bs1"] = hfb.compiled_ms(hf_model, ctx)
        except Exception as exc:  # noqa: BLE001  (a reference column: the anchor stands in, said so)
            out["notes"].append(f"HF compiled failed: {str(exc).splitlines()[0][:120]}")
        phase("hf_compiled")
    del hf_model
    _free()

    # ---------------------------------------------------------------- a 7B shape (random weights) in a card's budget
    t0 = time.perf_counter()
    llm = LLM(f"shape:{big}", EngineConfig(card=big_card, max_num_seqs=max(batch_sizes),
                                          max_num_batched_tokens=max(2048, max(batch_sizes)), restorable=(SWAP_LAYER,)))
    out.update(big=big, big_card=big_card, big_init_s=time.perf_counter() - t0)
    built = llm.memory_report()
    out["big_arithmetic_blocks"] = arithmetic
    log(f"{big} (random weights), card {big_card} (budget {built['budget'] / 2**30:.2f} GiB): engine ready in "
        f"{out['big_init_s']:.1f} s, {built['kv_main_blocks']} KV blocks (capacity arithmetic: {out['big_arithmetic_blocks']})")
    phase("big_engine")
    out["rows"] += decode_rows(llm, big, "fp16", batch_sizes, ctx, steps, bw)
    sw = out["swap"] = swap_overlap(llm, SWAP_LAYER, swap_batch, ctx)
    log(f"  swap of layer {SWAP_LAYER} during decode (batch {swap_batch}): copy at "
        f"{sw['swap_copy_bw_vs_isolated']:.2f}x isolated bandwidth, decode slowdown {100 * sw['decode_slowdown_during_swap']:+.1f} %")
    t0 = time.perf_counter()
    llm.swap(range(llm.spec.num_layers), wait=True)
    out["big_swap_all_s"] = time.perf_counter() - t0
    out["rows"] += decode_rows(llm, big, "int4", batch_sizes, ctx, steps, bw)
    out["big_capture_s"] = {f"{len(k[0])}L/b{k[1]}": v for k, v in llm.runner.capture_seconds.items()}
    served = llm.memory_report()
    out["big_memory"] = {"after_construction": built, "after_serving": served}
    llm.close()
    del llm
    _free()
    phase("big_decode_and_swap")
    if hf:
        from morphlib.models import synthetic_model

        hf7 = synthetic_model(big, dtype=torch.bfloat16, device="cuda")
        _set_rows(out["rows"], big, 1, hf_eager_ms=hfb.eager_ms(hf7, 1, ctx, new=8))
        del hf7
        _free()
        phase("big_hf_eager")
    return _finish(out, t_start, log)


class _Phases:
    """``phase(name)``: the seconds since the previous call, recorded under ``name``."""

    def __init__(self, into: dict):
        self.into, self.last = into, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(now - self.last, 2)
        self.last = now


def _set_rows(rows: list[dict], model: str, batch: int, **values) -> None:
    for r in rows:
        if r["model"] == model and r["batch"] == batch:
            r.update(values)


def _finish(out: dict, t_start: float, log) -> dict:
    out["headline"] = headline(out)
    out["seconds"] = time.perf_counter() - t_start
    log(f"done in {out['seconds']:.0f} s (plan: {out['plan_s']['total']:g} s)")
    return out


# ----------------------------------------------------------------------------- headline
def _entry(key: str, value, **extra) -> dict:
    cmp, target = TARGETS[key]
    if cmp == "in":
        met, text = target[0] <= value <= target[1], f"in [{target[0]:g}, {target[1]:g}]"
    else:
        met, text = (value <= target) if cmp == "<=" else (value >= target), f"{cmp} {target:g}"
    return {"value": value, "target": text, "met": bool(met), **extra}


def speedups(rows: list[dict]) -> dict[str, dict[int, float]]:
    """FP16 step / INT4 step per model and batch size (where both were measured)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["state"] == "fp16":
            int4 = next((q for q in rows if q["model"] == r["model"] and q["state"] == "int4"
                         and q["batch"] == r["batch"]), None)
            if int4 is not None:
                out.setdefault(r["model"], {})[r["batch"]] = r["step_ms"] / int4["step_ms"]
    return out


def headline(out: dict) -> dict:
    """Every measured key with its target and whether it was met (``TARGETS``)."""
    h = {}
    cor = out.get("correctness")
    if cor is not None:
        dtype = {"dtype": cor["dtype"], "prompts": cor["prompt_source"], "weights": out.get("smollm2_weights")}
        h["top1_decisive_agreement"] = _entry(
            "top1_decisive_agreement", cor["top1_decisive_agreement"], decisive_positions=cor["engine"]["decisive_positions"],
            tolerance=f"fp32 top-2 gap > {cor['decisive_tolerance_bf16_ulps']} bf16 ulps of the top logit",
            hf_incremental=cor["hf_incremental"]["decisive_agreement"], **dtype)
        h["top1_gap_vs_hf_incremental_pts"] = _entry(
            "top1_gap_vs_hf_incremental_pts", cor["top1_gap_vs_hf_incremental_pts"],
            definition="100 x (HF incremental's top-1 agreement with fp32 - the engine's), all positions",
            engine=cor["top1_agreement_engine"], hf_incremental=cor["top1_agreement_hf_incremental"])
        h["kl_ratio_vs_hf_bf16"] = _entry("kl_ratio_vs_hf_bf16", cor["kl_ratio_vs_hf"], kl_engine=cor["kl_engine"],
                                          kl_hf_incremental=cor["kl_hf_incremental"], dtype=cor["dtype"])
        h["positions"] = _entry("positions", cor["positions"], prompts=cor["prompts"], new_tokens=cor["new_tokens"])
        h["decisive_excluded_share"] = _entry("decisive_excluded_share", cor["decisive_excluded_share"])
    rows = out["rows"]
    if not rows:
        return h
    big = out["big"]

    def row(model, state, b):
        return next(r for r in rows if r["model"] == model and r["state"] == state and r["batch"] == b)

    sp = speedups(rows)
    s1, b1 = row("smollm2-135m", "fp16", 1), row(big, "fp16", 1)
    h["decode_step_vs_roofline_7b_bs1"] = _entry("decode_step_vs_roofline_7b_bs1", b1["step_ms"] / b1["roofline_ms"])
    h["int4_vs_fp16_step_speedup_7b_bs1"] = _entry("int4_vs_fp16_step_speedup_7b_bs1", sp[big][1])
    if 8 in sp[big]:
        h["int4_vs_fp16_step_speedup_7b_bs8"] = _entry("int4_vs_fp16_step_speedup_7b_bs8", sp[big][8])
    (model, b), worst = min((((m, b), v) for m, by in sp.items() for b, v in by.items() if b <= 64), key=lambda t: t[1])
    h["int4_vs_fp16_worst_step_speedup"] = _entry(
        "int4_vs_fp16_worst_step_speedup", worst, at=f"{model} batch {b}",
        per_batch={m: {str(k): round(v, 3) for k, v in by.items()} for m, by in sp.items()})
    comp = out.get("hf_compiled_ms_bs1")
    comp_ms = comp if comp is not None else HF_COMPILED_ANCHOR_MS
    h["smollm2_speedup_vs_hf_compiled_bs1"] = _entry(
        "smollm2_speedup_vs_hf_compiled_bs1", comp_ms / s1["step_ms"], reference_ms=comp_ms,
        reference="measured in this run" if comp is not None else "the issue's H200 anchor (2.9 ms), not measured here")
    if s1.get("hf_eager_ms") is not None:
        h["smollm2_speedup_vs_hf_eager_bs1"] = _entry("smollm2_speedup_vs_hf_eager_bs1", s1["hf_eager_ms"] / s1["step_ms"])
    sw = out["swap"]
    h["swap_copy_bw_vs_isolated"] = _entry("swap_copy_bw_vs_isolated", sw["swap_copy_bw_vs_isolated"])
    h["decode_slowdown_during_swap"] = _entry("decode_slowdown_during_swap", sw["decode_slowdown_during_swap"])
    mem = out["big_memory"]
    blocks = mem["after_construction"]["kv_main_blocks"]
    h["kv_blocks_l4_vs_arithmetic"] = _entry("kv_blocks_l4_vs_arithmetic", blocks / out["big_arithmetic_blocks"],
                                             engine_blocks=blocks, arithmetic_blocks=out["big_arithmetic_blocks"],
                                             card=out["big_card"])
    over = max(m["peak_over_budget_bytes"] for m in mem.values())
    budget = mem["after_serving"]["budget"]
    h["peak_over_budget_bytes"] = _entry("peak_over_budget_bytes", over, budget=budget,
                                         card=out["big_card"], allocated_peak=mem["after_serving"]["allocated_peak"],
                                         reserved_peak=mem["after_serving"]["reserved_peak"])
    h["budget_used_at_peak"] = _entry("budget_used_at_peak", (budget + over) / budget, card=out["big_card"])
    return h


def format_report(res: dict) -> str:
    lines = []
    if res["rows"]:
        lines.append(f"{'model':<14} {'state':<5} {'batch':>5} {'step ms':>8} {'gpu ms':>7} {'roofline':>8} "
                     f"{'x roof':>6} {'HF eager':>8} {'x HF':>6}")
        for r in res["rows"]:
            hf_ms = r.get("hf_eager_ms")
            hf_s = f"{hf_ms:8.2f} {hf_ms / r['step_ms']:6.1f}" if hf_ms else f"{'-':>8} {'-':>6}"
            lines.append(f"{r['model']:<14} {r['state']:<5} {r['batch']:>5} {r['step_ms']:>8.3f} {r['gpu_ms']:>7.3f} "
                         f"{r['roofline_ms']:>8.3f} {r['step_ms'] / r['roofline_ms']:>6.2f} {hf_s}")
        lines.append("")
    for k, h in res["headline"].items():
        lines.append(f"{k:<38} {h['value']:>12.4f}  target {h['target']:<14} {'met' if h['met'] else 'MISSED'}"
                     + (f"  (at {h['at']})" if "at" in h else ""))
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)
