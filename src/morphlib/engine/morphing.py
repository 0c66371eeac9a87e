"""The morph planner: swaps and restores in place, committed at step boundaries, clock-free.

Both precisions of every swappable layer wait in host memory: the 16-bit region bytes and the INT4
head bytes (``memory.Layout``). ``advance(scheduler, now, step)`` runs at every step boundary and moves
each pending operation along; ``now`` is only written into the records. Bytes move through a copy
backend (``copies.py``: simulated, CPU, CUDA side stream, CUDA synchronous), which also says when they
have landed.

swap l (16-bit -> INT4)
    1. issue: the INT4 head -> a free staging slot (side mode: paced chunks that overlap the decode
       steps, which still read l's 16-bit weights, untouched; sync mode: all at once on the compute stream);
    2. commit, at the first boundary where the copy has landed: staging -> head of l's region (device to
       device, compute stream), l runs INT4 from the next step on, and the region's tail becomes
       ``tail_blocks`` new KV blocks.

restore l (INT4 -> 16-bit)
    1. reserve: the tail's KV blocks leave the pool (``BlockManager.remove_group``). Live ones are first
       *migrated* (``EngineConfig.restore_migrate``): moved into free blocks of the main pool or older
       tails with one device copy at this boundary, block tables rewritten, so that a restore never pins
       capacity for the lifetime of a request. Only when too few blocks are free: policy ``wait`` stops
       handing the tail's blocks out and retries at each boundary (migrating as soon as blocks free up),
       policy ``preempt`` preempts their holders at once (they recompute later). A live block is never
       lost or handed out twice.
    2. issue: the 16-bit tail bytes straight into the region's tail (no kernel reads them now) and the
       16-bit head into a staging slot;
    3. commit when landed: staging -> head; the layer runs 16-bit from the next step.

Ablations (``EngineConfig``): ``swap_grows_pool=False`` commits the precision change only (the tail
stays out of the pool); ``swap_compute="fp16"`` keeps the layer's 16-bit compute and its copies land in
a shadow region outside the budget whose tail blocks join the pool (an oracle: ``MorphOp.oracle``).
Requests are atomic: every layer of one ``request`` is queued, or none is (a one-line error says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.memory import Layout
from morphlib.errors import MorphError


@dataclass
class MorphOp:
    """One swap (``to="int4"``) or restore (``to="fp16"``) of one layer and what happened to it: the
    engine-clock times and step indices of request, issue and commit, bytes copied, KV blocks migrated,
    sequences preempted, host milliseconds spent on it (issue, sending its chunks, commit), and the device
    time of its copies (``copy_ms``, ``span_ms``) and of its commit copy (``commit_ms``): CUDA events, or
    host timestamps on CPU."""

    layer: int
    to: str  # "int4" or "fp16"
    requested: float
    request_step: int = 0
    phase: str = "queued"  # queued -> (draining) -> copying -> done
    slot: int | None = None
    issued: float | None = None
    issue_step: int | None = None
    committed: float | None = None
    commit_step: int | None = None
    copy_bytes: int = 0
    preempted: int = 0
    migrated: int = 0
    reserved: bool = False
    grows_pool: bool = True
    oracle: bool = False  # compute stayed 16-bit; the KV blocks of the swap came from outside the budget
    host_ms: float = 0.0
    landed_at: float = float("-inf")  # modelled landing time (simulated / CPU copies)
    chunks: list = field(default_factory=list, repr=False)  # chunks not yet sent (copy backend)
    waits: list = field(default_factory=list, repr=False)  # events the first chunk waits for (CUDA)
    events: list | None = field(default=None, repr=False)  # [(start, end)] per chunk sent (CUDA)
    commit_events: tuple | None = field(default=None, repr=False)

    @property
    def latency_s(self) -> float | None:
        """Request to commit, engine clock."""
        return None if self.committed is None else self.committed - self.requested

    def copy_ms(self) -> float | None:
        """Device time spent copying: the sum of the chunks' times, from events (CPU: host timestamps)."""
        if not self.events:
            return None
        return sum(a.elapsed_time(b) for a, b in self.events)

    def span_ms(self) -> float | None:
        """First chunk's start to last chunk's end (includes the gaps of pacing)."""
        if not self.events:
            return None
        return self.events[0][0].elapsed_time(self.events[-1][1])

    def commit_ms(self) -> float | None:
        """Device time of the commit's device-to-device copy (None until it has run)."""
        if self.commit_events is None or not self.commit_events[1].query():
            return None
        return self.commit_events[0].elapsed_time(self.commit_events[1])

    def record(self) -> dict:
        """The op as plain numbers (for results files)."""
        return {"layer": self.layer, "to": self.to, "requested": self.requested, "request_step": self.request_step,
                "issued": self.issued, "issue_step": self.issue_step, "committed": self.committed,
                "commit_step": self.commit_step, "latency_s": self.latency_s, "copy_bytes": self.copy_bytes,
                "migrated_blocks": self.migrated, "preempted": self.preempted, "grows_pool": self.grows_pool,
                "oracle": self.oracle, "host_ms": self.host_ms, "copy_device_ms": self.copy_ms(),
                "commit_device_ms": self.commit_ms()}


class MorphPlanner:
    def __init__(self, layout: Layout, bm: BlockManager, copies, *, swappable, restorable, policy: str,
                 migrate: bool, grows_pool: bool, int4_compute: bool):
        self.layout, self.bm, self.copies = layout, bm, copies
        self.swappable, self.restorable = frozenset(swappable), frozenset(restorable)
        self.policy, self.migrate, self.grows_pool, self.int4_compute = policy, migrate, grows_pool, int4_compute
        self.pending: list[MorphOp] = []
        self.history: list[MorphOp] = []
        self.slot_free = list(range(layout.staging_slots))
        self.order: list[int] = []  # swapped layers in the order they were committed
        self.compute: frozenset = frozenset()  # layers that compute in INT4 (the graphs' key)
        self.swapped: tuple = ()  # sorted(order), kept for the step records

    # ------------------------------------------------------------------ state
    def state(self, layer: int) -> str:
        for op in self.pending:
            if op.layer == layer:
                return "to-int4" if op.to == "int4" else "to-fp16"
        return "int4" if layer in self.order else "fp16"

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def refusal(self, layers, to: str) -> str | None:
        """Why ``request(layers, to)`` would be refused, or None."""
        for layer in layers:
            if layer not in self.swappable:
                return f"layer {layer} is not swappable (no host copies: see EngineConfig.swappable)"
            if to == "fp16" and layer not in self.restorable:
                return f"layer {layer} is not restorable (no 16-bit host copy: see EngineConfig.restorable)"
            cur = self.state(layer)
            if cur.startswith("to-"):
                return f"layer {layer} is already being switched ({cur})"
        return None

    def request(self, layers, to: str, now: float, step: int) -> list[MorphOp]:
        """Queue a switch of every layer of ``layers`` not already in precision ``to``: all of them or, with a
        one-line error saying why, none."""
        why = self.refusal(layers, to)
        if why is not None:
            verb = "swap" if to == "int4" else "restore"
            raise MorphError(f"{verb} of layers {list(layers)} refused: {why}")
        ops = [MorphOp(layer, to, now, step, grows_pool=self.grows_pool, oracle=not self.int4_compute)
               for layer in layers if self.state(layer) != to]
        self.pending.extend(ops)
        return ops

    # ------------------------------------------------------------------ the step-boundary protocol
    def advance(self, scheduler, now: float, step: int) -> list[MorphOp]:
        """Move pending operations along; returns those committed now."""
        done = []
        for op in list(self.pending):
            if op.to == "fp16" and not op.reserved and not self._reserve(op, scheduler):
                continue
            if op.phase in ("queued", "draining"):
                if not self.slot_free:
                    continue
                self._issue(op, now, step)
            if op.phase == "copying" and self.copies.ready(op, now):
                self._commit(op, now, step)
                done.append(op)
        return done

    def _reserve(self, op: MorphOp, scheduler) -> bool:
        layer = op.layer
        if layer not in self.bm.groups:  # swapped without growing the pool: nothing to take back
            op.reserved = True
            return True
        live = self.bm.drain(layer)
        if live and self.migrate:
            pairs = self.bm.migrate(layer)
            if pairs:
                scheduler.remap(pairs)
                self.copies.migrate(self._runs(pairs))
                op.migrated += len(pairs)
                live = []
        if live and self.policy == "preempt":
            op.preempted += scheduler.preempt_ids(self.bm.holders(layer))
            live = self.bm.live_blocks(layer)
        if live:
            op.phase = "draining"
            return False
        self.bm.remove_group(layer)
        op.reserved = True
        return True

    def _runs(self, pairs) -> list[tuple[int, int, int]]:
        """(src, dst, bytes) copies for block moves, adjacent blocks merged into one copy."""
        lay, bb = self.layout, self.layout.block_bytes
        runs: list[list[int]] = []
        for src, dst in pairs:
            s, d = lay.block_offset(src), lay.block_offset(dst)
            if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
                runs[-1][2] += bb
            else:
                runs.append([s, d, bb])
        return [tuple(r) for r in runs]

    def _issue(self, op: MorphOp, now: float, step: int) -> None:
        lay = self.layout
        op.slot = self.slot_free.pop(0)
        op.issued, op.issue_step, op.phase = now, step, "copying"
        stage, head = lay.slot(op.slot), lay.head_bytes
        pieces = [(stage, op.to, op.layer, 0, head)]
        if op.to == "fp16":
            pieces.append((lay.home(op.layer) + head, "fp16", op.layer, head, lay.region_bytes - head))
        self.copies.start(op, pieces, now)

    def _commit(self, op: MorphOp, now: float, step: int) -> None:
        lay = self.layout
        self.copies.commit(op, lay.home(op.layer), lay.slot(op.slot), lay.head_bytes)
        self.slot_free.append(op.slot)
        if op.to == "int4":
            self.order.append(op.layer)
            if self.grows_pool:
                self.bm.add_group(op.layer, lay.tail_ids(op.layer))
            if self.int4_compute:
                self.compute = self.compute | {op.layer}
        else:
            self.order.remove(op.layer)
            self.compute = self.compute - {op.layer}
        self.swapped = tuple(sorted(self.order))
        op.phase, op.committed, op.commit_step = "done", now, step
        self.pending.remove(op)
        self.history.append(op)

    def reset(self) -> None:
        """Forget the history; staging slots back in order (every layer was restored first)."""
        if self.pending or self.order:
            raise MorphError("cannot reset the morph planner while layers are swapped or switching")
        self.history.clear()
        self.slot_free = list(range(self.layout.staging_slots))

    def compute_states(self, order) -> list[frozenset]:
        """The compute states a fixed swap order passes through (each prefix; one state when the swapped
        layers keep their 16-bit compute)."""
        states = [self.compute]
        if self.int4_compute:
            acc = set(self.compute)
            for li in order:
                acc.add(li)
                states.append(frozenset(acc))
        return states
