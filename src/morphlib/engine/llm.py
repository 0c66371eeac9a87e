"""The engine's API: ``LLM(model, EngineConfig(...)).generate(prompts, SamplingParams(...))``, ``replay(trace)``,
``swap`` / ``restore`` / ``morph_state``, a controller callback at step boundaries and per-step records.

    from morphlib.engine import LLM, EngineConfig, SamplingParams
    llm = LLM("smollm2-135m", EngineConfig(memory_budget=2 << 30))
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    llm.swap([10, 11, 12])            # side stream; committed at a later step boundary
    llm.restore()                     # LIFO; waits for (or preempts) live KV blocks in the tails

``model``: a built-in name or HF folder (``morphlib.models.load_model``), an HF ``LlamaForCausalLM``
instance, or ``"shape:<name>"`` (``morphlib.shapes.SHAPES``) for random weights made in the arena.
``int4``: a ``morphlib.morph.Morpher`` whose INT4 twins (AWQ input scales included) the engine uses
byte for byte; default: the engine quantizes each layer itself (RTN, ``EngineConfig.group_size``).

Hooks for controllers and simulators: ``llm.controller = fn(llm, StepInfo)`` runs at every step boundary
(before scheduling; it may call ``swap``/``restore``); ``llm.on_step`` callables get each ``StepRecord``
(host start/end, path graph/eager, batch, tokens, morph state, KV use, committed swaps, device time when
``llm.runner.time_gpu``); every ``RequestOutput`` carries arrival, first scheduled, first token, each
token's time and finish (``time.perf_counter`` clock) and its preemption count.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from morphlib.engine import loader
from morphlib.engine.block_manager import BlockManager
from morphlib.engine.config import EngineConfig, SamplingParams
from morphlib.engine.memory import Arena, Layout
from morphlib.engine.model import Model, int4_head_blob
from morphlib.engine.morphing import Morph, MorphOp
from morphlib.engine.runner import Runner
from morphlib.engine.scheduler import Scheduler
from morphlib.engine.sequence import RequestOutput, Sequence, Status
from morphlib.engine.spec import ModelSpec
from morphlib.engine import workspace
from morphlib.errors import MorphError
from morphlib.models import resolve_device
from morphlib.shapes import SHAPES


@dataclass
class StepRecord:
    """One engine step, for timing hooks, simulators and plots (host clock, seconds)."""

    index: int
    start: float
    end: float
    path: str  # "graph", "eager" or "idle"
    num_seqs: int
    num_tokens: int
    num_sampled: int
    state: tuple  # INT4 layers
    kv_used: int
    kv_capacity: int
    waiting: int
    running: int
    committed: list = field(default_factory=list)  # MorphOps committed at this boundary
    gpu_ms: float | None = None  # device time of the step (when ``llm.runner.time_gpu``)


@dataclass
class StepInfo:
    """What a controller sees at a step boundary."""

    step: int
    now: float
    kv_used: int
    kv_capacity: int
    kv_free: int
    waiting: int
    running: int
    oldest_wait_s: float
    int4_layers: tuple
    pending: tuple

    @property
    def kv_usage(self) -> float:
        return self.kv_used / max(1, self.kv_used + self.kv_free)


@dataclass
class ReplayResult:
    outputs: list[RequestOutput]
    steps: list[StepRecord]
    clipped: int
    duration_s: float

    def summary(self, slo_ttft_s: float = 2.0) -> dict:
        ttft = np.array([o.ttft for o in self.outputs])
        tpot = np.array([o.tpot for o in self.outputs if len(o.token_ids) > 1])
        toks = sum(len(o.token_ids) for o in self.outputs)
        q = (lambda a, p: float(np.percentile(a, p)) if len(a) else float("nan"))
        return {"requests": len(self.outputs), "duration_s": self.duration_s, "output_tokens": toks,
                "tokens_per_s": toks / self.duration_s if self.duration_s else float("nan"),
                "ttft_p50_s": q(ttft, 50), "ttft_p95_s": q(ttft, 95), "ttft_p99_s": q(ttft, 99),
                "tpot_mean_s": float(tpot.mean()) if len(tpot) else float("nan"), "tpot_p99_s": q(tpot, 99),
                "slo_ttft_s": slo_ttft_s, "slo_violations": float((ttft > slo_ttft_s).mean()) if len(ttft) else 0.0,
                "preemptions": int(sum(o.preemptions for o in self.outputs)), "clipped": self.clipped}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _resolve_model(model, dtype):
    """-> (hf_model or None, hf_config, tokenizer or None, name)."""
    if isinstance(model, nn.Module):
        return model, model.config, None, getattr(model, "morphlib_name", type(model).__name__)
    if not isinstance(model, str):
        raise MorphError(f"model must be a name, a folder, 'shape:<name>' or an HF model, got {type(model).__name__}")
    shape = model[6:] if model.startswith("shape:") else None
    if shape is not None:
        if shape not in SHAPES:
            raise MorphError(f"unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}")
        cfg = dict(SHAPES[shape], model_type="llama")
        return None, cfg, None, model
    from morphlib.models import load_model

    hf, tok = load_model(model, dtype=dtype, device="cpu")
    return hf, hf.config, tok, model


class LLM:
    def __init__(self, model, config: EngineConfig | None = None, *, int4=None, tokenizer=None):
        cfg = config or EngineConfig()
        if not isinstance(cfg, EngineConfig):
            raise MorphError(f"config must be an EngineConfig, got {type(cfg).__name__}")
        self.config = cfg
        dev = self.device = resolve_device(cfg.device)
        dtype = self.dtype = cfg.torch_dtype(dev)
        if dev.type == "cuda":
            if dev.index is not None:
                torch.cuda.set_device(dev)
            torch.cuda.synchronize(dev)
            self._alloc0 = torch.cuda.memory_allocated(dev)
        hf, hf_config, tok, name = _resolve_model(model, dtype)
        self.tokenizer = tokenizer or tok
        self.name = name
        spec = ModelSpec.from_hf_config(hf_config, name)
        if hf is not None:  # tied or not as the module really is (a config can say tied when it is not)
            tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
            spec = dataclasses.replace(spec, tied=tied)
        self.spec = spec
        self.max_model_len = cfg.max_model_len or min(spec.max_positions, 4096)
        if self.max_model_len > spec.max_positions:
            raise MorphError(f"max_model_len {self.max_model_len} exceeds the model's {spec.max_positions} positions")
        use_triton = cfg.attention == "triton" or (cfg.attention == "auto" and dev.type == "cuda")
        if use_triton and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise MorphError("attention='triton' needs a CUDA device (or TRITON_INTERPRET=1 to check kernels on CPU)")

        # ---- INT4 source: a Morpher's twins (same bytes as HF + Morpher) or the engine's own RTN
        self.morpher = int4
        group = int4.config.group_size if int4 is not None else cfg.group_size
        awq = int4 is not None and any(t.input_scale_inv is not None for twins in int4._int4 for t in twins.values())
        layout = self.layout = Layout(spec, dtype, dev, cfg.block_size, group, awq, cfg.staging_slots,
                                      self.max_model_len)

        # ---- sizing: budget = arena (weights + staging + KV) + measured workspace
        t0 = time.perf_counter()
        if dev.type == "cuda":
            meas = workspace.measure_cuda(layout, hf_config, cfg, self.max_model_len)
            ws_measured = meas["bytes"]
        else:
            meas, ws_measured = None, workspace.estimate_cpu(layout, cfg)
        self.workspace_probe_s = time.perf_counter() - t0
        ws = int(ws_measured * (1 + cfg.workspace_margin))
        budget = cfg.memory_budget
        if budget is None:
            if dev.type == "cuda":
                budget = int(0.9 * torch.cuda.mem_get_info(dev)[0])
            else:
                budget = layout.fixed_bytes + ws + (512 << 20)
        min_blocks = -(-self.max_model_len // cfg.block_size)
        per_id = 8 * 2  # block_base entry + host list
        avail = budget - layout.fixed_bytes - ws - per_id * spec.num_layers * layout.tail_blocks
        main = max(0, avail // (layout.block_bytes + per_id))
        if cfg.kv_blocks is not None:
            main = min(main, cfg.kv_blocks)
        if main < min_blocks:
            need = layout.fixed_bytes + ws + min_blocks * (layout.block_bytes + per_id)
            raise MorphError(
                f"memory budget {_size(budget)} is too small for {name}: it needs at least {_size(need)} "
                f"(weights {_size(layout.weight_bytes)}, swap staging {_size(layout.staging_slots * layout.slot_bytes)}, "
                f"workspace {_size(ws)}, KV for one {self.max_model_len}-token sequence "
                f"{_size(min_blocks * layout.block_bytes)})"
                if cfg.kv_blocks is None or cfg.kv_blocks >= min_blocks else
                f"kv_blocks={cfg.kv_blocks} cannot hold one {self.max_model_len}-token sequence ({min_blocks} blocks)")
        layout.set_main_blocks(main)
        self.budget, self.workspace_bytes, self.workspace_measured = budget, ws, meas

        # ---- the arena and its contents
        self.arena = Arena(layout.arena_bytes(), dev)
        if hf is not None:
            try:
                loader.fill_from_hf(self.arena, layout, hf)
            except ValueError as exc:
                raise MorphError(str(exc)) from None
        else:
            loader.fill_random(self.arena, layout, hf_config, seed=cfg.seed)
        base = layout.block_base()
        self.model = Model(layout, self.arena, base.to(dev), use_triton)
        self.bm = BlockManager(cfg.block_size, layout.num_block_ids)
        self.bm.add_group("main", layout.main_ids())
        self.scheduler = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.morph = Morph(layout, self.arena, self.model, self.bm, cfg.restore_policy)
        swappable = range(spec.num_layers) if cfg.swappable is None else cfg.swappable
        restorable = set(swappable if cfg.restorable is None else cfg.restorable)
        t0 = time.perf_counter()
        for li in sorted(set(swappable) | restorable):
            if not 0 <= li < spec.num_layers or li not in swappable:
                raise MorphError(f"swappable/restorable layer {li} is out of range (0..{spec.num_layers - 1}) "
                                 "or restorable but not swappable")
            twins = (loader.twins_from_morpher(int4, li, layout) if int4 is not None
                     else loader.quantize_layer(self.arena, layout, li, cfg.symmetric))
            region = self.arena.bytes(layout.region(li), layout.region_bytes) if li in restorable else None
            self.morph.set_host_copies(li, region, int4_head_blob(layout, twins))
        self.host_copy_s = time.perf_counter() - t0
        del hf
        self.runner = Runner(self.model, base.tolist(), cfg.max_num_seqs, -(-self.max_model_len // cfg.block_size),
                             cfg.buckets(), cfg.cuda_graphs, seed=cfg.seed)
        self.eos = self._eos_ids(hf_config)
        self.controller = None  # callable(llm, StepInfo) -> None, called at every step boundary
        self.on_step: list = []  # callables(StepRecord), called after every step
        self.steps: list[StepRecord] = []
        self.record_steps = True
        self._done: dict[int, Sequence] = {}
        self.copy_bw = 25e9  # host->device bytes/s, updated from each swap's measured copy time
        self.copy_pace = 0.8  # fraction of the last step's time that a step's swap copies may take
        self._last_step_s = 0.005
        self.t0 = time.perf_counter()
        if self.runner.use_graphs:
            self.runner.precapture([self.model.state])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # ------------------------------------------------------------------ info
    def _eos_ids(self, hf_config) -> set[int]:
        ids = set()
        for src in (getattr(self.tokenizer, "eos_token_id", None),
                    hf_config.get("eos_token_id") if isinstance(hf_config, dict) else getattr(hf_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids

    @property
    def kv_capacity(self) -> int:
        return self.bm.capacity

    @property
    def morph_state(self) -> dict[int, str]:
        """Each layer's precision: 'fp16', 'int4', or 'to-int4' / 'to-fp16' while a switch is pending."""
        return {li: self.morph.state(li) for li in range(self.spec.num_layers)}

    @property
    def int4_layers(self) -> list[int]:
        return sorted(self.model.int4_layers)

    def memory_report(self) -> dict:
        lay = self.layout
        rep = {"budget": self.budget, "arena": self.arena.nbytes, "weights": lay.weight_bytes,
               "staging": lay.staging_slots * lay.slot_bytes, "kv_main_blocks": lay.main_blocks,
               "kv_block_bytes": lay.block_bytes, "kv_tail_blocks_per_layer": lay.tail_blocks,
               "workspace_reserved": self.workspace_bytes, "workspace_measured": self.workspace_measured,
               "workspace_probe_s": self.workspace_probe_s, "kv_capacity_blocks": self.kv_capacity}
        if self.device.type == "cuda":
            rep["allocated_now"] = torch.cuda.memory_allocated(self.device) - self._alloc0
            rep["allocated_peak"] = torch.cuda.max_memory_allocated(self.device) - self._alloc0
            rep["reserved_now"] = torch.cuda.memory_reserved(self.device)
        return rep

    def weight_digest(self) -> str:
        """sha256 of every weight byte in the arena (resident + all 16-bit layer regions)."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.arena.bytes(0, self.layout.staging0).cpu().numpy().tobytes())
        return h.hexdigest()

    def info(self) -> StepInfo:
        now = time.perf_counter()
        oldest = min((s.arrival for s in self.scheduler.waiting), default=now)
        return StepInfo(len(self.steps), now, self.bm.num_used, self.bm.capacity, self.bm.num_free,
                        len(self.scheduler.waiting), len(self.scheduler.running), now - oldest,
                        tuple(self.int4_layers), tuple((op.layer, op.to, op.phase) for op in self.morph.pending))

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MorphError("text prompts need a tokenizer (this model has none): pass token ids")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(x) for x in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise MorphError("empty prompt")
        if min(ids) < 0 or max(ids) >= self.spec.vocab:
            raise MorphError(f"prompt token ids must be in [0, {self.spec.vocab})")
        return ids

    def add_request(self, prompt, params: SamplingParams | None = None, arrival: float | None = None) -> Sequence:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise MorphError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise MorphError(f"request too long: {len(ids)} prompt + {params.max_tokens} new tokens > the context "
                             f"({self.max_model_len} tokens, EngineConfig.max_model_len)")
        seq = Sequence(ids, params, time.perf_counter() if arrival is None else arrival)
        self.scheduler.add(seq)
        return seq

    def _output(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        return RequestOutput.of(seq, text)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts (text or token-id lists) to completion; outputs in input order."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise MorphError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate", leave=False)
        ids = {s.id for s in seqs}
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
            if bar is not None:
                bar.n = sum(s.status is Status.FINISHED for s in seqs)
                bar.refresh()
        if bar is not None:
            bar.close()
        for i in ids:
            self._done.pop(i, None)
        return [self._output(s) for s in seqs]

    # ------------------------------------------------------------------ the step
    def step(self) -> StepRecord:
        start = time.perf_counter()
        if self.controller is not None:
            self.controller(self, self.info())
        committed = self.morph.advance(self.scheduler, start) if self.morph.busy else []
        for op in committed:
            ms = op.copy_ms()
            if ms:
                self.copy_bw = 0.5 * self.copy_bw + 0.5 * op.copy_bytes / (ms * 1e-3)
        batch = self.scheduler.schedule()
        path, sampled, tokens = "idle", [], []
        pump = self.morph.cuda and self.morph.has_chunks
        if batch:
            for seq, _ in batch:
                if seq.first_scheduled is None:
                    seq.first_scheduled = start
            if pump:  # swap copies ride along: about one step's PCIe time, after the step's own inputs
                budget = int(self.copy_pace * self.copy_bw * self._last_step_s)
                self.runner.on_launch = lambda: self.morph.pump(budget)
            sampled, tokens, path = self.runner.run(batch)
            self.runner.on_launch = None
        elif pump:
            self.morph.pump(1 << 62)
        end = time.perf_counter()
        if batch:
            self._last_step_s = end - start
        for seq, n in batch:
            seq.num_computed += n
        for seq, tok in zip(sampled, tokens):
            seq.output.append(tok)
            seq.token_times.append(end)
            if seq.first_token is None:
                seq.first_token = end
            reason = None
            if len(seq.output) >= seq.params.max_tokens:
                reason = "length"
            elif not seq.params.ignore_eos and tok in self.eos:
                reason = "stop"
            if reason:
                self.scheduler.finish(seq, reason, end)
                self._done[seq.id] = seq
        rec = StepRecord(len(self.steps), start, end, path, len(batch), sum(n for _, n in batch), len(sampled),
                         tuple(self.int4_layers), self.bm.num_used, self.bm.capacity,
                         len(self.scheduler.waiting), len(self.scheduler.running), committed,
                         self.runner.last_gpu_ms if batch and self.runner.time_gpu else None)
        if self.record_steps:
            self.steps.append(rec)
        for hook in self.on_step:
            hook(rec)
        return rec

    # ------------------------------------------------------------------ morphing
    def _layers(self, layers) -> list[int]:
        out = []
        for li in layers:
            if isinstance(li, bool) or not isinstance(li, (int, np.integer)) or not 0 <= li < self.spec.num_layers:
                raise MorphError(f"layer {li!r} is out of range: the model has {self.spec.num_layers} layers")
            out.append(int(li))
        if len(set(out)) != len(out):
            raise MorphError(f"duplicate layers in {out}")
        return out

    def swap(self, layers, *, wait: bool = False) -> list[MorphOp]:
        """Switch ``layers`` to INT4: copies start at the next step boundary on the copy stream and each
        layer commits at the first boundary after its copy has landed. ``wait``: return when done."""
        ops = self.morph.request(self._layers(layers), "int4", time.perf_counter())
        if wait:
            self.wait_morph()
        return ops

    def restore(self, layers=None, *, wait: bool = False) -> list[MorphOp]:
        """Switch ``layers`` (default: every INT4 layer, newest first) back to their exact 16-bit bytes."""
        layers = list(reversed(self.morph.order)) if layers is None else self._layers(layers)
        ops = self.morph.request(layers, "fp16", time.perf_counter())
        if wait:
            self.wait_morph()
        return ops

    def wait_morph(self) -> None:
        """Drive pending swaps/restores to completion (stepping the engine while a restore waits for
        live KV blocks to be freed)."""
        while self.morph.busy:
            if self.morph.cuda:
                self.morph.pump(1 << 62)
            for op in self.morph.pending:
                if op.phase == "copying" and op.events:
                    op.events[-1][1].synchronize()
            before = [(op.layer, op.phase) for op in self.morph.pending]
            self.morph.advance(self.scheduler, time.perf_counter())
            after = [(op.layer, op.phase) for op in self.morph.pending]
            if after and after == before:  # nothing moved: only draining restores are left
                if self.scheduler.idle:
                    raise MorphError("a restore waits for KV blocks that nothing will free")
                self.step()

    def precapture(self, order: list[int] | None = None) -> float:
        """Capture decode graphs ahead for the states a fixed swap order passes through (each prefix of
        ``order``, default: the current state only); returns the seconds spent."""
        if not self.runner.use_graphs:
            return 0.0
        states = [self.model.state]
        if order:
            acc = set(self.model.int4_layers)
            for li in self._layers(order):
                acc.add(li)
                states.append(frozenset(acc))
        return self.runner.precapture(states)

    # ------------------------------------------------------------------ trace replay
    def replay(self, trace, *, time_scale: float = 1.0, max_requests: int | None = None, seed: int = 0,
               progress: bool = True, truncate: bool = True) -> ReplayResult:
        """Drive the engine from a ``morphlib.workloads.traces.Trace``: request i arrives at
        ``arrival_s[i] * time_scale`` seconds (wall clock) with ``context_tokens[i]`` random prompt ids and
        exactly ``generated_tokens[i]`` output tokens (EOS ignored). Requests longer than the context are
        clipped when ``truncate`` (counted), else refused."""
        n = len(trace) if max_requests is None else min(len(trace), max_requests)
        if n == 0:
            raise MorphError("the trace has no requests")
        rng = np.random.default_rng(seed)
        reqs, clipped = [], 0
        for i in range(n):
            c, g = int(trace.context_tokens[i]), int(trace.generated_tokens[i])
            if c + g > self.max_model_len:
                if not truncate:
                    raise MorphError(f"trace request {i}: {c} + {g} tokens > the context ({self.max_model_len})")
                clipped += 1
                g = min(g, self.max_model_len // 2)
                c = min(c, self.max_model_len - g)
            reqs.append((float(trace.arrival_s[i]) * time_scale, rng.integers(0, self.spec.vocab, c).tolist(), g))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"replay {getattr(trace, 'name', '')}".strip(), leave=False)
        first_step = len(self.steps)
        start = time.perf_counter()
        seqs, i = [], 0
        while True:
            now = time.perf_counter()
            while i < n and start + reqs[i][0] <= now:
                t, ids, g = reqs[i]
                seqs.append(self.add_request(ids, SamplingParams(max_tokens=g, ignore_eos=True), arrival=start + t))
                i += 1
            if self.scheduler.idle and not self.morph.busy:
                if i >= n:
                    break
                time.sleep(max(0.0, start + reqs[i][0] - time.perf_counter()))
                continue
            self.step()
            if bar is not None:
                done = sum(s.status is Status.FINISHED for s in seqs)
                if done != bar.n:
                    bar.n = done
                    bar.refresh()
        if bar is not None:
            bar.close()
        for s in seqs:
            self._done.pop(s.id, None)
        return ReplayResult([RequestOutput.of(s) for s in seqs], self.steps[first_step:], clipped,
                            time.perf_counter() - start)
