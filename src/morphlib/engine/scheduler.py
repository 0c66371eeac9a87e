"""Continuous batching with chunked prefill (a token budget per step), FCFS admission and preemption by
recompute.

Each step: (1) running sequences, oldest first, each get their next chunk (1 token when decoding, up
to the remaining budget when still prefilling); when a chunk needs a KV block and none is free, the
newest running sequence is preempted (its blocks freed, it goes back to the head of the queue and
later recomputes prompt + output so far) until it fits; (2) waiting sequences are admitted in
arrival order while the budget, ``max_num_seqs`` and free blocks allow; the first that does not fit
stops admission (no overtaking).
"""

from __future__ import annotations

from collections import deque

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.max_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.bm.blocks_needed(seq.block_table, seq.num_computed + n)
            while need > self.bm.num_free:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.grow(seq.id, seq.block_table, seq.num_computed + n)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self.bm.blocks_needed(seq.block_table, seq.num_computed + n) > self.bm.num_free:
                break
            self.waiting.popleft()
            self.bm.grow(seq.id, seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it back at the head of the queue (recompute later)."""
        self.bm.release(seq.id, seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def preempt_ids(self, seq_ids) -> int:
        """Preempt the running sequences with these ids (newest first, so the queue keeps FCFS order)."""
        victims = [s for s in reversed(self.running) if s.id in set(seq_ids)]
        for s in victims:
            self.preempt(s)
        return len(victims)

    def finish(self, seq: Sequence, reason: str, now: float) -> None:
        self.bm.release(seq.id, seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished = now
        self.running.remove(seq)
