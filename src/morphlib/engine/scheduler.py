"""Continuous batching with chunked prefill (a token budget per step), FCFS admission and preemption by
recompute.

Each step: (1) running sequences, oldest first, each get their next chunk (1 token when decoding, up
to the remaining budget when still prefilling); when a chunk needs a KV block and none is free, the
newest running sequence is preempted (its blocks freed, it goes back to the head of the queue and
later recomputes prompt + output so far) until it fits; (2) waiting sequences are admitted in
arrival order while the budget, ``max_num_seqs`` and free blocks allow; the first that does not fit
stops admission (no overtaking).

Admission never takes back a sequence that this same call preempted (that would hand it the blocks
just freed and preempt it again at the next step: the thrash that multiplies recomputation under KV
pressure); with ``no_admit_after_preempt`` nothing is admitted in a step that preempted anything,
the restore's preemptions at the boundary included (vLLM v1). ``watermark`` is the fraction of the
capacity that must stay free after an admission (ignored while nothing runs).
"""

from __future__ import annotations

import math
from collections import deque

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, *,
                 no_admit_after_preempt: bool = False, watermark: float = 0.0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.no_admit_after_preempt = no_admit_after_preempt
        self.watermark = watermark
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_recomputed = 0  # tokens whose KV preemptions dropped (recomputed later)
        self.calls = 0  # schedule() calls so far
        self.preempted: list[int] = []  # ids preempted since the last schedule() began (boundary + schedule)
        self.admitted: list[int] = []  # ids admitted by the last schedule()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def begin_boundary(self) -> None:
        """A new step boundary: forget the last step's preemptions (call before the morph planner runs)."""
        self.preempted = []

    def schedule(self) -> list[tuple[Sequence, int]]:
        self.calls += 1
        call = self.calls
        budget = self.max_tokens
        batch: list[tuple[Sequence, int]] = []
        bm = self.bm
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = bm.blocks_needed(seq.block_table, seq.num_computed + n)
            while need > bm.num_free:
                victim = self.running[-1]
                self.preempt(victim, call)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            bm.grow(seq.id, seq.block_table, seq.num_computed + n)
            batch.append((seq, n))
            budget -= n
        self.admitted = []
        if self.no_admit_after_preempt and self.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.preempted_in == call:  # never re-admit what this call preempted (nor overtake it)
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            keep = math.ceil(self.watermark * bm.capacity) if self.watermark and self.running else 0
            if bm.blocks_needed(seq.block_table, seq.num_computed + n) > bm.num_free - keep:
                break
            self.waiting.popleft()
            bm.grow(seq.id, seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.admitted.append(seq.id)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence, call: int | None = None) -> None:
        """Free ``seq``'s blocks and put it back at the head of the queue (recompute later)."""
        self.bm.release(seq.id, seq.block_table)
        seq.recomputed += seq.num_computed
        self.num_recomputed += seq.num_computed
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        seq.preempted_in = self.calls if call is None else call
        self.num_preemptions += 1
        self.preempted.append(seq.id)
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def preempt_ids(self, seq_ids) -> int:
        """Preempt the running sequences with these ids (newest first, so the queue keeps FCFS order)."""
        ids = set(seq_ids)
        victims = [s for s in reversed(self.running) if s.id in ids]
        for s in victims:
            self.preempt(s)
        return len(victims)

    def remap(self, pairs: list[tuple[int, int]]) -> None:
        """Rewrite the running sequences' block tables after a migration: block ``old`` is now ``new``."""
        moved = dict(pairs)
        for seq in self.running:
            table = seq.block_table
            for j, b in enumerate(table):
                if b in moved:
                    table[j] = moved[b]

    def finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.bm.release(seq.id, seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished = now
        self.running.remove(seq)

    def abort_all(self) -> None:
        """Drop every request (their blocks freed), for ``reset``."""
        for seq in list(self.running):
            self.bm.release(seq.id, seq.block_table)
        self.running.clear()
        self.waiting.clear()
