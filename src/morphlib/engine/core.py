"""The engine core: scheduler, block manager, morph planner, sequences, step and request bookkeeping and
copy pacing, driven by times it is given (it reads no clock).

    plan = core.step(now)                  # boundary: morph ops advance, then the scheduler picks the batch
    ...                                    # an executor runs plan.batch (and pumps the side copies)
    record = core.complete(plan, t_end, tokens, path=...)

``LLM`` drives it with the torch executor and a wall clock, ``Simulator`` with a step-time model and a
virtual clock: the same decisions, block tables and morph commits for the same inputs and times.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.config import EngineConfig, SamplingParams
from morphlib.engine.memory import Layout
from morphlib.engine.morphing import MorphOp, MorphPlanner
from morphlib.engine.records import StepInfo, StepRecord
from morphlib.engine.scheduler import Scheduler
from morphlib.engine.sequence import Sequence

FIRST_STEP_S = 0.005  # the "last step time" copies are paced against before any step has run
NONE = ()  # no morph op committed (shared: records are many, and every object in them costs the GC)


@dataclass(slots=True)
class StepPlan:
    """What one step runs, decided at its boundary."""

    index: int
    start: float
    batch: list  # [(Sequence, tokens)]
    sampled: list  # the sequences whose chunk reaches their end (they sample a token), in batch order
    committed: list | tuple  # MorphOps committed at this boundary
    compute: frozenset  # layers that compute in INT4 during the step
    state: tuple  # swapped layers
    num_tokens: int = 0
    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_sum: int = 0
    bucket: int | None = None
    copy_budget: float = 0.0  # bytes the side copies may send after the launch (0: none queued)
    copy_bytes: int = 0  # bytes sent (filled in by ``pump``)
    sync_copy_bytes: int = 0  # bytes copied on the compute stream at this boundary (sync mode)
    copy_in_flight: bool = False
    preempted: int = 0
    admitted: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.batch)


class EngineCore:
    def __init__(self, layout: Layout, config: EngineConfig, copies, *, swappable, restorable, eos=(),
                 cuda_graphs: bool = True):
        self.layout, self.config, self.copies = layout, config, copies
        self.bm = BlockManager(config.block_size, layout.num_block_ids)
        self.bm.add_group("main", layout.main_ids())
        self.scheduler = Scheduler(self.bm, config.max_num_seqs, config.max_num_batched_tokens,
                                   no_admit_after_preempt=config.no_admit_after_preempt,
                                   watermark=config.admission_watermark)
        self.morph = MorphPlanner(layout, self.bm, copies, swappable=swappable, restorable=restorable,
                                  policy=config.restore_policy, migrate=config.restore_migrate,
                                  grows_pool=config.swap_grows_pool, int4_compute=config.swap_compute == "int4")
        self.eos = set(eos)
        self.buckets = config.buckets() if cuda_graphs else ()
        self.pace = config.copy_pace
        self.steps: list[StepRecord] = []
        self.record_steps = True
        self.num_steps = 0
        self.next_id = 0
        self.last_step_s = FIRST_STEP_S

    # ------------------------------------------------------------------ requests
    def add(self, prompt: list[int], params: SamplingParams, arrival: float) -> Sequence:
        seq = Sequence(self.next_id, prompt, params, arrival)
        self.next_id += 1
        self.scheduler.add(seq)
        return seq

    @property
    def idle(self) -> bool:
        """No request waits or runs."""
        return self.scheduler.idle

    def info(self, now: float) -> StepInfo:
        sch, bm = self.scheduler, self.bm
        oldest = min((s.arrival for s in sch.waiting), default=now)
        return StepInfo(self.num_steps, now, bm.num_used, bm.capacity, bm.num_free, len(sch.waiting),
                        len(sch.running), now - oldest, self.morph.swapped,
                        tuple((op.layer, op.to, op.phase) for op in self.morph.pending), sch.num_preemptions)

    # ------------------------------------------------------------------ the step
    def step(self, now: float) -> StepPlan:
        """The boundary: pending morph ops advance (reserve / migrate, issue, commit), then the batch."""
        sch, morph, copies = self.scheduler, self.morph, self.copies
        sch.begin_boundary()
        sent0 = copies.sent_bytes
        committed = (morph.advance(sch, now, self.num_steps) or NONE) if morph.busy else NONE
        sync_bytes = copies.sent_bytes - sent0
        batch = sch.schedule()
        plan = StepPlan(self.num_steps, now, batch, [], committed, morph.compute, morph.swapped,
                        sync_copy_bytes=sync_bytes, copy_bytes=sync_bytes, copy_in_flight=bool(copies.inflight),
                        preempted=len(sch.preempted), admitted=len(sch.admitted))
        tokens = decode = ctx = 0
        sampled = plan.sampled
        for seq, n in batch:
            c = seq.num_computed + n
            tokens += n
            ctx += c
            if c == seq.num_tokens:
                sampled.append(seq)
                decode += n == 1
            if seq.first_scheduled is None:
                seq.first_scheduled = now
        plan.num_tokens, plan.decode_seqs, plan.prefill_tokens, plan.context_sum = tokens, decode, tokens - decode, ctx
        if batch and decode == len(batch) and self.buckets and len(batch) <= self.buckets[-1]:
            plan.bucket = next(b for b in self.buckets if b >= len(batch))
        if copies.queue:
            plan.copy_budget = copies.budget(self.pace, self.last_step_s) if batch else float("inf")
        return plan

    def pump(self, plan: StepPlan) -> None:
        """Send the side copies this step may carry (call once the step's own work is launched)."""
        if plan.copy_budget:
            plan.copy_bytes += self.copies.pump(plan.copy_budget, plan.start)

    def complete(self, plan: StepPlan, t_end: float, tokens, *, path: str, gpu_ms: float | None = None,
                 capture_s: float = 0.0) -> StepRecord:
        """Book a finished step: progress, sampled tokens (aligned with ``plan.sampled``), finished requests."""
        batch = plan.batch
        if batch:
            self.last_step_s = t_end - plan.start
        for seq, n in batch:
            seq.num_computed += n
        finished = 0
        sch, eos = self.scheduler, self.eos
        for seq, tok in zip(plan.sampled, tokens):
            seq.output.append(tok)
            seq.token_times.append(t_end)
            if seq.first_token is None:
                seq.first_token = t_end
            reason = None
            if len(seq.output) >= seq.params.max_tokens:
                reason = "length"
            elif not seq.params.ignore_eos and tok in eos:
                reason = "stop"
            if reason:
                sch.finish(seq, reason, t_end)
                finished += 1
        bm = self.bm
        rec = StepRecord(plan.index, plan.start, t_end, path, len(batch), plan.num_tokens, len(plan.sampled),
                         plan.state, bm.num_used, bm.capacity, len(sch.waiting), len(sch.running), plan.committed,
                         gpu_ms, plan.prefill_tokens, plan.decode_seqs, plan.context_sum, plan.bucket,
                         plan.copy_bytes, plan.sync_copy_bytes, plan.copy_in_flight, capture_s, None,
                         plan.preempted, plan.admitted, finished, tuple([s.id for s, _ in batch]),
                         tuple([n for _, n in batch]))
        self.num_steps += 1
        if self.record_steps:
            self.steps.append(rec)
        return rec

    # ------------------------------------------------------------------ morphing
    def request(self, layers, to: str, now: float) -> list[MorphOp]:
        return self.morph.request(layers, to, now, self.num_steps)

    def reset(self) -> None:
        """Forget every request, record and counter (the engine has dropped its requests and restored
        its layers first): the next request is id 0 again."""
        self.scheduler.abort_all()
        self.bm.reset()
        sch = self.scheduler
        sch.num_preemptions = sch.num_recomputed = sch.calls = 0
        sch.preempted, sch.admitted = [], []
        self.morph.reset()
        self.steps.clear()
        self.num_steps = self.next_id = 0
        self.last_step_s = FIRST_STEP_S
        self.copies.reset()
