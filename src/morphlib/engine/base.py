"""What ``LLM`` and ``Simulator`` share: an ``EngineCore``, a clock, an executor hook (``_execute``), the
controller and step hooks, requests, swap / restore, trace replay and ``reset``.

    engine.controller = fn(engine, StepInfo)   # at every step boundary (and idle ticks of a replay)
    engine.on_step.append(fn(StepRecord))      # after every step
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from morphlib.engine.config import SamplingParams
from morphlib.engine.records import StepInfo, StepRecord
from morphlib.engine.sequence import RequestOutput, Sequence, Status
from morphlib.errors import MorphError

NO_PHASES = (0.0, 0.0, 0.0)  # an executor step without device work: no prepare, launch or sync


class Engine:
    """Subclasses set ``config``, ``spec``, ``name``, ``max_model_len`` (and ``tokenizer``), call
    ``_attach(core, clock)`` and implement ``_execute(plan)``."""

    controller = None
    tokenizer = None

    def _attach(self, core, clock) -> None:
        """Adopt the core and the clock; the core's parts by name (they live as long as the engine)."""
        self.core, self.clock = core, clock
        self.scheduler, self.bm, self.morph, self.copies = core.scheduler, core.bm, core.morph, core.copies
        self.steps: list[StepRecord] = core.steps
        self.controller = None  # callable(engine, StepInfo) -> None
        self.on_step: list = []  # callables(StepRecord)

    # ------------------------------------------------------------------ state
    @property
    def kv_capacity(self) -> int:
        return self.core.bm.capacity

    @property
    def morph_state(self) -> dict[int, str]:
        """Each layer's precision: 'fp16', 'int4', or 'to-int4' / 'to-fp16' while a switch is pending."""
        return {li: self.core.morph.state(li) for li in range(self.spec.num_layers)}

    @property
    def int4_layers(self) -> list[int]:
        """The swapped layers (whose 16-bit bytes have left the device, whatever they compute in)."""
        return sorted(self.core.morph.order)

    def info(self) -> StepInfo:
        return self.core.info(self.clock.now())

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
        return self.core.add(ids, params, self.clock.now() if arrival is None else arrival)

    def _output(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        return RequestOutput.of(seq, text)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts (text or token-id lists) to completion; outputs in input order."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], (int, np.integer)))
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
        while any(s.status is not Status.FINISHED for s in seqs):
            self.step()
            if bar is not None:
                bar.n = sum(s.status is Status.FINISHED for s in seqs)
                bar.refresh()
        if bar is not None:
            bar.close()
        return [self._output(s) for s in seqs]

    # ------------------------------------------------------------------ the step
    def step(self) -> StepRecord:
        core, clock = self.core, self.clock
        now = clock.now()
        if self.controller is not None:
            self.controller(self, core.info(now))
        h0 = time.perf_counter()
        plan = core.step(now)
        h1 = time.perf_counter()
        tokens, path, gpu_ms, capture_s, (prepare, launch, sync) = self._execute(plan)
        t_end = clock.step_end(plan)
        h2 = time.perf_counter()
        rec = core.complete(plan, t_end, tokens, path=path, gpu_ms=gpu_ms, capture_s=capture_s)
        rec.host_ms = {"schedule": 1e3 * (h1 - h0), "prepare": 1e3 * prepare, "launch": 1e3 * launch,
                       "sync": 1e3 * sync, "bookkeeping": 1e3 * (time.perf_counter() - h2)}
        for hook in self.on_step:
            hook(rec)
        return rec

    def _execute(self, plan):
        """Run ``plan.batch`` (sending the side copies once launched: ``core.pump``) -> (tokens aligned with
        ``plan.sampled``, path, device ms or None, capture seconds, host seconds (prepare, launch, sync))."""
        raise NotImplementedError

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

    def swap(self, layers, *, wait: bool = False) -> list:
        """Switch ``layers`` to INT4, all or none: copies start at the next step boundary and each layer
        commits at the first boundary after its copy has landed. ``wait``: return when done."""
        ops = self.core.request(self._layers(layers), "int4", self.clock.now())
        if wait:
            self.wait_morph()
        return ops

    def restore(self, layers=None, *, wait: bool = False) -> list:
        """Switch ``layers`` (default: every swapped layer, newest first) back to their exact 16-bit bytes."""
        layers = list(reversed(self.core.morph.order)) if layers is None else self._layers(layers)
        ops = self.core.request(layers, "fp16", self.clock.now())
        if wait:
            self.wait_morph()
        return ops

    def can_swap(self, layers) -> bool:
        """Whether ``swap(layers)`` would be accepted now."""
        return self.core.morph.refusal(self._layers(layers), "int4") is None

    def can_restore(self, layers=None) -> bool:
        layers = list(reversed(self.core.morph.order)) if layers is None else self._layers(layers)
        return self.core.morph.refusal(layers, "fp16") is None

    def wait_morph(self) -> None:
        """Drive pending swaps/restores to completion (stepping the engine while a restore waits for
        live KV blocks, and waiting for copies in flight)."""
        core = self.core
        stalled = 0
        while core.morph.busy:
            if core.idle:  # nothing else will step: send every queued chunk and wait for it to land
                self.clock.sleep_until(core.copies.finish(self.clock.now()))
            before = [(op.layer, op.phase, op.migrated) for op in core.morph.pending]
            self.step()
            moved = before != [(op.layer, op.phase, op.migrated) for op in core.morph.pending]
            stalled = 0 if moved or not core.idle else stalled + 1
            if stalled > 1:
                raise MorphError("a morph operation makes no progress on an idle engine")

    COPY_SETTINGS = ("swap_mode", "copy_chunk_bytes", "copy_pace")

    def configure_copies(self, **changes) -> None:
        """Change how the morph copies issued from now on move (``swap_mode``, ``copy_chunk_bytes``,
        ``copy_pace``; checked as ``EngineConfig`` checks them), so that one engine can measure several copy
        settings without being rebuilt; refused while a swap or restore is pending."""
        unknown = sorted(set(changes) - set(self.COPY_SETTINGS))
        if unknown:
            raise MorphError(f"configure_copies: unknown setting(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(self.COPY_SETTINGS)}")
        if self.core.morph.busy:
            raise MorphError("configure_copies: refused while a swap or restore is pending (wait_morph first)")
        cfg = dataclasses.replace(self.config, **changes)
        self.config = self.core.config = cfg
        self.core.copies.configure(cfg.swap_mode, cfg.copy_chunk_bytes)
        self.core.pace = cfg.copy_pace

    def precapture(self, order=None) -> float:
        """Capture decode graphs ahead for the states a fixed swap order passes through (the simulator and
        a CPU engine have none: 0 seconds)."""
        return 0.0

    # ------------------------------------------------------------------ replay and reset
    def replay(self, trace, **kwargs):
        """``morphlib.engine.replay.replay(self, trace, ...)``: see there."""
        from morphlib.engine.replay import replay

        return replay(self, trace, **kwargs)

    def reset(self) -> None:
        """Back to the state after construction, so that one engine serves several policies on identical
        arrivals: requests dropped, every layer restored, records and counters cleared, request ids from 0,
        the clock (when virtual) at its start; captured graphs are kept."""
        self.core.scheduler.abort_all()
        self.wait_morph()
        if self.core.morph.order:
            self.restore(wait=True)
        self.core.reset()
        self.clock.reset()
