"""Swaps and restores in place, on a side stream, committed at step boundaries.

Both precisions of every swappable layer wait in pinned host memory: the 16-bit region bytes and the
INT4 head bytes (``memory.Layout``). ``advance()`` runs at every step boundary and moves each pending
operation along:

swap l (16-bit -> INT4)
    1. issue: host->device copy of the INT4 head into a free staging slot on the copy stream
       (overlaps the decode steps: those still read l's 16-bit weights, which are not touched). The copy
       is cut into chunks that ``pump`` enqueues *after* each step has launched its own work, at most
       about one step's worth of PCIe time per step: a step's small host->device input copy shares the
       copy engine with the swap and would otherwise queue behind the whole layer (seen on an H200: a
       405 MB copy added its full 7.3 ms to the step it overlapped);
    2. commit, at the first boundary where the copy's event has completed (polled, never waited):
       a device-to-device copy staging -> head of l's region on the compute stream, the layer runs
       INT4 from the next step on, and the region's tail becomes ``tail_blocks`` new KV blocks.

restore l (INT4 -> 16-bit)
    1. reserve: the tail's KV blocks leave the pool (``BlockManager.remove_group``). While one of them
       is live: policy ``wait`` stops handing them out and retries at each boundary (the restore
       finishes when their sequences have finished or been preempted); policy ``preempt`` preempts
       those sequences at once (they recompute later). A live block is never lost or handed out twice.
    2. issue: host->device copy of the 16-bit tail bytes straight into the region's tail (no kernel
       reads them now) and of the 16-bit head bytes into a staging slot, on the copy stream;
    3. commit when done: staging -> head on the compute stream; the layer runs 16-bit from the next step.

On CPU there is no stream: copies run synchronously at the boundary and commit at once.
Every operation records host timestamps (requested, issued, committed) and, on CUDA, the copy's
device time between two events on the copy stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.memory import Arena, Layout
from morphlib.errors import MorphError

CHUNK = 16 << 20  # bytes per enqueued copy piece


@dataclass
class MorphOp:
    layer: int
    to: str  # "int4" or "fp16"
    requested: float
    phase: str = "queued"  # queued -> (draining) -> copying -> done
    slot: int | None = None
    issued: float | None = None
    committed: float | None = None
    copy_bytes: int = 0
    preempted: int = 0
    reserved: bool = False
    events: list | None = field(default=None, repr=False)  # [(start, end)] per chunk

    chunks: list = field(default_factory=list, repr=False)  # (dst, src) pieces not yet enqueued
    waits: list = field(default_factory=list, repr=False)  # events the first chunk waits for

    def copy_ms(self) -> float | None:
        """Device time spent copying (CUDA): the sum of the chunks' times, from events on the copy stream."""
        if not self.events:
            return None
        return sum(a.elapsed_time(b) for a, b in self.events)

    def span_ms(self) -> float | None:
        """First chunk's start to last chunk's end (includes the gaps of pacing)."""
        if not self.events:
            return None
        return self.events[0][0].elapsed_time(self.events[-1][1])


class Morph:
    def __init__(self, layout: Layout, arena: Arena, model, bm: BlockManager, policy: str):
        self.layout, self.arena, self.model, self.bm, self.policy = layout, arena, model, bm, policy
        self.device = arena.buf.device
        self.cuda = self.device.type == "cuda"
        self.fp16_host: dict[int, torch.Tensor] = {}
        self.int4_host: dict[int, torch.Tensor] = {}
        self.pending: list[MorphOp] = []
        self.history: list[MorphOp] = []
        self.slot_free = list(range(layout.staging_slots))
        self.slot_ready: dict[int, object] = {}  # slot -> event after which the slot may be overwritten
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.order: list[int] = []  # INT4 layers in the order they were committed

    # ------------------------------------------------------------------ host copies
    def set_host_copies(self, layer: int, fp16_region: torch.Tensor | None, int4_head: torch.Tensor) -> None:
        """Keep (pinned, on CUDA) host copies of a layer's INT4 head and, unless None, its 16-bit region."""
        def host(t):
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
            out.copy_(t)
            return out

        if fp16_region is not None:
            self.fp16_host[layer] = host(fp16_region)
        self.int4_host[layer] = host(int4_head)

    # ------------------------------------------------------------------ state
    def state(self, layer: int) -> str:
        for op in self.pending:
            if op.layer == layer:
                return "to-int4" if op.to == "int4" else "to-fp16"
        return "int4" if layer in self.model.int4_layers else "fp16"

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def request(self, layers, to: str, now: float) -> list[MorphOp]:
        ops = []
        for layer in layers:
            if layer not in self.int4_host:
                raise MorphError(f"layer {layer} is not swappable (no host copies: see EngineConfig.swappable)")
            if to == "fp16" and layer not in self.fp16_host:
                raise MorphError(f"layer {layer} is not restorable (no 16-bit host copy: see EngineConfig.restorable)")
            cur = self.state(layer)
            if cur.startswith("to-"):
                raise MorphError(f"layer {layer} is already being switched ({cur})")
            if cur == to:
                continue
            op = MorphOp(layer, to, now)
            self.pending.append(op)
            ops.append(op)
        return ops

    # ------------------------------------------------------------------ the step-boundary protocol
    def advance(self, scheduler, now: float) -> list[MorphOp]:
        """Move pending operations along; returns those committed now."""
        done = []
        for op in list(self.pending):
            if op.to == "fp16" and not op.reserved and not self._reserve(op, scheduler):
                continue
            if op.phase in ("queued", "draining"):
                if not self.slot_free:
                    continue
                self._issue(op, now)
            if op.phase == "copying" and not op.chunks and (op.events is None or op.events[-1][1].query()):
                self._commit(op, time.perf_counter())
                done.append(op)
        return done

    @property
    def has_chunks(self) -> bool:
        return any(op.chunks for op in self.pending)

    def pump(self, budget: int) -> int:
        """Enqueue copy chunks on the copy stream, up to ``budget`` bytes (at least one chunk); call it after
        the step's own device work has been enqueued. Returns the bytes enqueued."""
        sent = 0
        for op in self.pending:
            if not op.chunks:
                continue
            with torch.cuda.stream(self.copy_stream):
                for ev in op.waits:
                    self.copy_stream.wait_event(ev)
                op.waits = []
                while op.chunks and (sent == 0 or sent < budget):
                    dst, src = op.chunks.pop(0)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dst.copy_(src, non_blocking=True)
                    end.record()
                    op.events.append((start, end))
                    sent += dst.numel()
            if sent >= budget:
                break
        return sent

    def _reserve(self, op: MorphOp, scheduler) -> bool:
        live = self.bm.drain(op.layer)
        if live and self.policy == "preempt":
            op.preempted += scheduler.preempt_ids(self.bm.holders(op.layer))
            live = self.bm.live_blocks(op.layer)
        if live:
            op.phase = "draining"
            return False
        self.bm.remove_group(op.layer)
        op.reserved = True
        return True

    def _issue(self, op: MorphOp, now: float) -> None:
        lay = self.layout
        slot = self.slot_free.pop(0)
        op.slot, op.issued = slot, now
        region = lay.region(op.layer)
        head = lay.head_bytes
        stage = self.arena.bytes(lay.slot(slot), head)
        if op.to == "int4":
            src_head = self.int4_host[op.layer][:head]
            tail = None
        else:
            src_head = self.fp16_host[op.layer][:head]
            tail = (self.arena.bytes(region + head, lay.region_bytes - head), self.fp16_host[op.layer][head:])
        op.copy_bytes = head + (tail[0].numel() if tail else 0)
        if not self.cuda:
            stage.copy_(src_head)
            if tail:
                tail[0].copy_(tail[1])
            op.phase = "copying"
            return
        compute = torch.cuda.current_stream(self.device)
        boundary = torch.cuda.Event()
        boundary.record(compute)  # everything enqueued so far (KV writes to a tail, commits) comes first
        op.waits = [boundary] + ([self.slot_ready.pop(slot)] if slot in self.slot_ready else [])
        pairs = [(stage, src_head)] + ([tail] if tail else [])
        op.chunks = [(d[i:i + CHUNK], s_[i:i + CHUNK]) for d, s_ in pairs for i in range(0, d.numel(), CHUNK)]
        op.events = []
        op.phase = "copying"

    def _commit(self, op: MorphOp, now: float) -> None:
        lay = self.layout
        region = lay.region(op.layer)
        head = lay.head_bytes
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(op.events[-1][1])
        self.arena.bytes(region, head).copy_(self.arena.bytes(lay.slot(op.slot), head))
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.slot_ready[op.slot] = ev
        self.slot_free.append(op.slot)
        if op.to == "int4":
            self.model.int4_layers.add(op.layer)
            self.order.append(op.layer)
            self.bm.add_group(op.layer, lay.tail_ids(op.layer))
        else:
            self.model.int4_layers.discard(op.layer)
            self.order.remove(op.layer)
        op.phase, op.committed = "done", now
        self.pending.remove(op)
        self.history.append(op)
