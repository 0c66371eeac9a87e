"""``python -m morphlib bench-engine``: the engine's decode step against the HBM roofline and against HF
``generate``, FP16 vs all-INT4, and a side-stream layer swap during decode, all from one run.

* Ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written / time, a
  1 GiB copy) and pinned host->device bandwidth for one layer's bytes.
* Roofline of a decode step = (weight bytes read + KV bytes read) / copy bandwidth. Weight bytes: every
  layer's 16-bit matrices (or INT4 bytes), the LM head and norms; KV: every context token's K and V.
* Step time = the engine's whole step (schedule, inputs, CUDA-graph replay, sampling, host sync), median
  over decode-only steps of a full batch; ``gpu_ms`` the device time of the same steps (events).
* HF eager: ``generate`` per new token, (T(1 + n) - T(1)) / n, prefill excluded; HF compiled (optional,
  40-70 s of compile): static cache + ``torch.compile(mode="reduce-overhead")``.
* Top-1 agreement with HF (bf16, teacher forcing: HF re-reads the engine's greedy sequence) on two prompt
  sets of 32 prompts x 64 new tokens: English text (starts of the default corpus's held-out windows; the
  headline when the corpus is in the cache) and uniformly random token ids (flat distributions, many
  near-ties); at each disagreement, HF's logit gap between its top-1 and the engine's token. The same
  comparison for HF's own greedy decode (incremental, with its KV cache) vs its teacher forcing says how
  far two bf16 evaluations of one model agree at all: the ceiling an engine can be held to.
* Swap: one layer's INT4 bytes (and its 16-bit bytes for the restore) copied on the engine's copy
  stream while a batch decodes; copy bandwidth from events on the copy stream vs the same copy alone;
  slowdown = total time of the steps that ran while a copy was in flight / the same number of steps at
  the median of the (up to 3) quiet steps just before each operation: same morph state, nearly the same
  context. (The first version divided by the median of 20 steps before the first operation; steps
  later in the run are slower for reasons other than the copy -- longer contexts, layer 15 in INT4 --
  so that ratio is biased up; it is still reported, as ``decode_slowdown_vs_first_baseline``.)
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from morphlib.errors import MorphError

TARGETS = {  # key: (comparison, target)
    "decode_step_vs_roofline_7b_bs1": ("<=", 1.5),
    "int4_vs_fp16_step_speedup_7b_bs1": (">=", 1.6),
    "smollm2_speedup_vs_hf_compiled_bs1": (">=", 2.0),
    "smollm2_speedup_vs_hf_eager_bs1": (">=", 10.0),
    "swap_copy_bw_vs_isolated": (">=", 0.85),
    "decode_slowdown_during_swap": ("<=", 0.05),
    "gpu_top1_agreement_vs_hf": (">=", 0.995),
}
HF_COMPILED_ANCHOR_MS = 2.9  # the issue's H200 measurement (HF static cache + torch.compile, SmolLM2, bs 1)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def copy_bandwidth(dev, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    return 2 * nbytes / (_median(times) * 1e-3) / 1e9


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


def decode_times(llm, batch: int, ctx: int, steps: int, warm: int = 3, seed: int = 0) -> dict:
    """Median wall and device time of decode-only steps of ``batch`` sequences at context ~``ctx``."""
    from morphlib.engine import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    seqs = [llm.add_request(torch.randint(0, llm.spec.vocab, (ctx,), generator=gen).tolist(),
                            SamplingParams(max_tokens=warm + steps + 1, ignore_eos=True)) for _ in range(batch)]
    first = len(llm.steps)
    llm.runner.time_gpu = True
    try:
        while any(s.finished is None for s in seqs):
            llm.step()
    finally:
        llm.runner.time_gpu = False
    recs = [r for r in llm.steps[first:] if r.num_seqs == batch and r.num_tokens == batch]
    recs = recs[warm:]
    if not recs:
        raise MorphError(f"no decode-only steps of batch {batch} were seen")
    return {"step_ms": 1e3 * _median([r.end - r.start for r in recs]),
            "gpu_ms": _median([r.gpu_ms for r in recs if r.gpu_ms is not None]),
            "paths": sorted({r.path for r in recs}), "ctx": ctx + warm + len(recs) // 2}


def hf_eager_ms(model, batch: int, ctx: int, new: int = 16, seed: int = 0) -> float:
    from transformers import GenerationConfig

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(model.device)
    mask = torch.ones_like(ids)

    def run(n):
        gc_ = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    t1 = min(run(1) for _ in range(2))
    tn = min(run(1 + new) for _ in range(2))
    return 1e3 * (tn - t1) / new


def hf_compiled_ms(model, ctx: int, new: int = 32, seed: int = 0) -> float:
    """HF with a static cache, batch 1: ``generate`` then compiles its decode forward itself
    (transformers' automatic compilation, ``CompileConfig(fullgraph=True, mode="reduce-overhead")``:
    CUDA graphs); the first calls compile (40-70 s). Per new token, prefill excluded, as ``hf_eager_ms``."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=gen).to(model.device)

    def run(n):
        gc_ = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                               cache_implementation="static",
                               compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc_)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(1 + new)
    run(1 + new)
    t1 = min(run(1) for _ in range(2))
    tn = min(run(1 + new) for _ in range(3))
    return 1e3 * (tn - t1) / new


def random_prompts(vocab: int, n: int = 32, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 8-199 uniformly random token ids (flat, unnatural next-token distributions)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 200, (n,), generator=gen).tolist()
    return [torch.randint(0, vocab, (m,), generator=gen).tolist() for m in lens]


def text_prompts(tokenizer, n: int = 32, seed: int = 0) -> list[list[int]] | None:
    """``n`` prompts of 8-199 tokens of English text: the starts of the default corpus's held-out windows
    (the same lengths as ``random_prompts``); None when the corpus is not in the morphlib cache."""
    from morphlib.eval.corpus import make_windows

    try:
        wins = make_windows(tokenizer, "heldout", n, 200, seed=seed)
    except Exception:  # noqa: BLE001  (no corpus on this machine: the caller says so)
        return None
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 200, (n,), generator=gen).tolist()
    return [w[:m].tolist() for w, m in zip(wins.ids, lens)]


def engine_greedy(llm, prompts: list[list[int]], new: int = 64) -> list[list[int]]:
    """The engine's greedy continuations (``new`` tokens each, end-of-sequence ignored)."""
    from morphlib.engine import SamplingParams

    return [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=2.0 ** -126))) - 7)


def hf_agreement(hf_model, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """HF's top-1 at each generated position given the same prefix (teacher forcing) vs the tokens
    generated. At each disagreement: HF's logit gap between its own top-1 and the generated token;
    ``agreement_within_bf16_ulp`` also counts positions where that gap is at most one bf16 ulp of
    HF's top logit (a near-tie that rounding decides: HF's logits are bf16 themselves)."""
    agree = total = near = 0
    gaps = []
    with torch.no_grad():
        for p, o in zip(prompts, outputs):
            seq = torch.tensor([p + o], device=hf_model.device)
            logits = hf_model(seq).logits[0, len(p) - 1:-1].float()
            top = logits.argmax(-1)
            got = torch.tensor(o, device=logits.device)
            hit = top == got
            agree += int(hit.sum())
            total += len(o)
            rows = (~hit).nonzero().flatten()
            best = logits[rows, top[rows]]
            gap = best - logits[rows, got[rows]]
            near += int((gap <= _bf16_ulp(best)).sum())
            gaps += gap.tolist()
    gaps.sort()
    return {"agreement": agree / total, "agreement_within_bf16_ulp": (agree + near) / total, "positions": total,
            "disagreements": len(gaps), "disagreement_logit_gap_median": _median(gaps) if gaps else None,
            "disagreement_logit_gap_max": max(gaps, default=None)}


def hf_greedy(model, prompts: list[list[int]], new: int = 64) -> list[list[int]]:
    """HF's own greedy continuations, one prompt at a time (no padding), incremental decode with its KV
    cache, end-of-sequence ignored: what teacher forcing is compared against to see how far HF agrees
    with itself in this dtype."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            outs.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, len(p):].tolist())
    return outs


def top1_agreement(llm, hf_model, prompts: list[list[int]], new: int = 64) -> dict:
    """Engine greedy tokens vs HF top-1 at the same prefix (``engine_greedy`` then ``hf_agreement``)."""
    return hf_agreement(hf_model, prompts, engine_greedy(llm, prompts, new))


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
    while any(s.finished is None for s in seqs):
        llm.step()
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


def smollm2_cached() -> bool:
    """Whether the real SmolLM2 weights are already converted in the cache (no fetch: GPU machines have
    no registry, and pip's retries would only burn device time)."""
    from morphlib.assets import cache_dir

    return (cache_dir() / "smollm2" / "hf" / ".complete").exists()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def run_bench(*, batch_sizes=(1, 2, 4, 8, 16, 32, 64), ctx: int = 128, steps: int = 20, hf: bool = True,
              hf_compiled: bool = False, big: str = "llama-2-7b", big_budget_gib: float = 24.0,
              swap_batch: int = 16, log=print) -> dict:
    """Measure everything in one run on the current CUDA device; returns {"rows", "headline", ...}."""
    from morphlib.engine import LLM, EngineConfig
    from morphlib.models import load_model, synthetic_model

    if not torch.cuda.is_available():
        raise MorphError("bench-engine needs a CUDA GPU")
    dev = torch.device("cuda")
    t_start = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "ctx": ctx, "steps": steps,
           "batch_sizes": list(batch_sizes), "rows": [], "notes": []}
    bw = out["d2d_copy_gb_s"] = copy_bandwidth(dev)
    log(f"device {out['device']}, device-to-device copy {bw:.0f} GB/s (read + write)")
    mb = max(batch_sizes)

    # ---------------------------------------------------------------- SmolLM2-135M
    tok = None
    if smollm2_cached():
        hf_model, tok = load_model("smollm2-135m", dtype=torch.bfloat16, device="cuda")
        out["smollm2_weights"] = "real"
    else:
        hf_model = synthetic_model("smollm2-135m", dtype=torch.bfloat16, device="cuda")
        out["smollm2_weights"] = "random N(0, 0.02) (real weights not in the morphlib cache)"
    t0 = time.perf_counter()
    # HF's forward passes share the process with this engine: its allocator is not capped at the engine's budget
    llm = LLM(hf_model, EngineConfig(memory_budget=4 << 30, max_num_seqs=mb, max_num_batched_tokens=max(2048, mb),
                                     enforce_budget=False))
    out["smollm2_init_s"] = time.perf_counter() - t0
    out["smollm2_memory"] = llm.memory_report()
    log(f"smollm2-135m ({out['smollm2_weights']}): engine ready in {out['smollm2_init_s']:.1f} s")
    texts = text_prompts(tok) if tok is not None else None
    out["top1"] = {"random_tokens": top1_agreement(llm, hf_model, random_prompts(llm.spec.vocab))}
    if texts is not None:
        out["top1"]["text"] = top1_agreement(llm, hf_model, texts)
    else:
        out["notes"].append("top-1 agreement on text prompts not measured: no real weights or no corpus in the cache")
    for kind, prompts in (("random_tokens", random_prompts(llm.spec.vocab)), ("text", texts)):
        if kind in out["top1"]:  # the same comparison for HF's own incremental decode: HF vs itself
            out["top1"][kind]["hf_incremental_vs_teacher_forced"] = hf_agreement(hf_model, prompts,
                                                                              hf_greedy(hf_model, prompts))
    for kind, a in out["top1"].items():
        log(f"  top-1 agreement with HF (bf16), {kind} prompts: {a['agreement']:.4f} over {a['positions']} positions "
            f"({a['disagreements']} disagreements, median HF logit gap {a['disagreement_logit_gap_median'] or 0:.3f}; "
            f"{a['agreement_within_bf16_ulp']:.4f} counting near-ties within one bf16 ulp); HF's own incremental "
            f"decode vs its teacher forcing: {a['hf_incremental_vs_teacher_forced']['agreement']:.4f}")
    agree = out["top1"].get("text", out["top1"]["random_tokens"])
    for state in ("fp16", "int4"):
        if state == "int4":
            t0 = time.perf_counter()
            llm.swap(range(llm.spec.num_layers), wait=True)
            out["smollm2_swap_all_s"] = time.perf_counter() - t0
        for b in batch_sizes:
            d = decode_times(llm, b, ctx, steps)
            row = {"model": "smollm2-135m", "state": state, "batch": b, **d,
                   "roofline_ms": 1e3 * step_bytes(llm, b, d["ctx"]) / (bw * 1e9)}
            out["rows"].append(row)
    out["smollm2_capture_s"] = {f"{len(k[0])}L/b{k[1]}": v for k, v in llm.runner.capture_seconds.items()}
    del llm
    _free()
    if hf:
        for b in batch_sizes:
            ms = hf_eager_ms(hf_model, b, ctx)
            for r in out["rows"]:
                if r["model"] == "smollm2-135m" and r["batch"] == b:
                    r["hf_eager_ms"] = ms
        log("  HF eager generate measured")
    hf_comp = None
    if hf_compiled:
        try:
            hf_comp = hf_compiled_ms(hf_model, ctx)
            out["hf_compiled_ms_bs1"] = hf_comp
        except Exception as exc:  # noqa: BLE001
            out["notes"].append(f"HF compiled failed: {str(exc).splitlines()[0][:120]}")
    del hf_model
    _free()

    # ---------------------------------------------------------------- a 7B shape (random weights)
    swap_layer = 15
    t0 = time.perf_counter()
    llm = LLM(f"shape:{big}", EngineConfig(memory_budget=int(big_budget_gib * 2**30), max_num_seqs=mb,
                                          max_num_batched_tokens=max(2048, mb), restorable=(swap_layer,)))
    out["big"] = big
    out["big_init_s"] = time.perf_counter() - t0
    out["big_memory"] = llm.memory_report()
    log(f"{big} (random weights), budget {big_budget_gib:g} GiB: engine ready in {out['big_init_s']:.1f} s, "
        f"{llm.memory_report()['kv_main_blocks']} KV blocks")
    for b in batch_sizes:
        d = decode_times(llm, b, ctx, steps)
        out["rows"].append({"model": big, "state": "fp16", "batch": b, **d,
                            "roofline_ms": 1e3 * step_bytes(llm, b, d["ctx"]) / (bw * 1e9)})
    sw = out["swap"] = swap_overlap(llm, swap_layer, swap_batch, ctx)
    log(f"  swap of layer {swap_layer} during decode (batch {swap_batch}): copy at "
        f"{sw['swap_copy_bw_vs_isolated']:.2f}x isolated bandwidth, decode slowdown {100 * sw['decode_slowdown_during_swap']:+.1f} %")
    t0 = time.perf_counter()
    llm.swap(range(llm.spec.num_layers), wait=True)
    out["big_swap_all_s"] = time.perf_counter() - t0
    for b in batch_sizes:
        n_caps = len(llm.runner.capture_seconds)
        d = decode_times(llm, b, ctx, steps)
        new = list(llm.runner.capture_seconds.values())[n_caps:]
        out["rows"].append({"model": big, "state": "int4", "batch": b, **d,
                            "roofline_ms": 1e3 * step_bytes(llm, b, d["ctx"]) / (bw * 1e9),
                            "state_change_capture_s": sum(new)})
    out["big_capture_s"] = {f"{len(k[0])}L/b{k[1]}": v for k, v in llm.runner.capture_seconds.items()}
    del llm
    _free()
    if hf:
        hf7 = synthetic_model(big, dtype=torch.bfloat16, device="cuda")
        for b in (1,):
            ms = hf_eager_ms(hf7, b, ctx, new=8)
            for r in out["rows"]:
                if r["model"] == big and r["batch"] == b:
                    r["hf_eager_ms"] = ms
        del hf7
        _free()

    # ---------------------------------------------------------------- headline
    def row(model, state, b):
        return next(r for r in out["rows"] if r["model"] == model and r["state"] == state and r["batch"] == b)

    s1, b1, i1 = row("smollm2-135m", "fp16", 1), row(big, "fp16", 1), row(big, "int4", 1)
    comp_ms = hf_comp if hf_comp is not None else HF_COMPILED_ANCHOR_MS
    values = {
        "decode_step_vs_roofline_7b_bs1": b1["step_ms"] / b1["roofline_ms"],
        "int4_vs_fp16_step_speedup_7b_bs1": b1["step_ms"] / i1["step_ms"],
        "smollm2_speedup_vs_hf_compiled_bs1": comp_ms / s1["step_ms"],
        "smollm2_speedup_vs_hf_eager_bs1": s1.get("hf_eager_ms", float("nan")) / s1["step_ms"],
        "swap_copy_bw_vs_isolated": sw["swap_copy_bw_vs_isolated"],
        "decode_slowdown_during_swap": sw["decode_slowdown_during_swap"],
        "gpu_top1_agreement_vs_hf": agree["agreement"],
    }
    headline = {}
    for k, v in values.items():
        cmp, target = TARGETS[k]
        met = (v <= target) if cmp == "<=" else (v >= target)
        headline[k] = {"value": v, "target": f"{cmp} {target}", "met": bool(met)}
    headline["smollm2_speedup_vs_hf_compiled_bs1"]["reference_ms"] = comp_ms
    headline["smollm2_speedup_vs_hf_compiled_bs1"]["reference"] = (
        "measured in this run" if hf_comp is not None else "the issue's H200 anchor (2.9 ms), not measured here")
    headline["gpu_top1_agreement_vs_hf"]["weights"] = out["smollm2_weights"]
    headline["gpu_top1_agreement_vs_hf"]["prompts"] = "text" if "text" in out["top1"] else "random_tokens"
    headline["gpu_top1_agreement_vs_hf"]["random_token_prompts"] = out["top1"]["random_tokens"]["agreement"]
    headline["gpu_top1_agreement_vs_hf"]["within_bf16_ulp"] = agree["agreement_within_bf16_ulp"]
    headline["gpu_top1_agreement_vs_hf"]["hf_own_incremental_decode"] = agree["hf_incremental_vs_teacher_forced"]["agreement"]
    out["headline"] = headline
    out["seconds"] = time.perf_counter() - t_start
    return out


def format_report(res: dict) -> str:
    lines = [f"{'model':<14} {'state':<5} {'batch':>5} {'step ms':>8} {'gpu ms':>7} {'roofline':>8} "
             f"{'x roof':>6} {'HF eager':>8} {'x HF':>6}"]
    for r in res["rows"]:
        hf = r.get("hf_eager_ms")
        hf_s = f"{hf:8.2f} {hf / r['step_ms']:6.1f}" if hf else f"{'-':>8} {'-':>6}"
        lines.append(f"{r['model']:<14} {r['state']:<5} {r['batch']:>5} {r['step_ms']:>8.3f} {r['gpu_ms']:>7.3f} "
                     f"{r['roofline_ms']:>8.3f} {r['step_ms'] / r['roofline_ms']:>6.2f} {hf_s}")
    lines.append("")
    for k, h in res["headline"].items():
        lines.append(f"{k:<38} {h['value']:>9.4f}  target {h['target']:<8} {'met' if h['met'] else 'MISSED'}")
    return "\n".join(lines)
