"""Swaps and restores in place, on a side stream, committed at step boundaries.

Both precisions of every swappable layer wait in pinned host memory: the 16-bit region bytes and the
INT4 head bytes (``memory.Layout``). ``advance()`` runs at every step boundary and moves each pending
operation along:

swap l (16-bit -> INT4)
    1. issue: host->device copy of the INT4 head into a free staging slot on the copy stream
       (overlaps the decode steps: those still read l's 16-bit weights, which are not touched);
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
    events: tuple | None = field(default=None, repr=False)

    def copy_ms(self) -> float | None:
        """Device time of the host->device copy (CUDA), from events on the copy stream."""
        if self.events is None:
            return None
        return self.events[0].elapsed_time(self.events[1])


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
    def set_host_copies(self, layer: int, fp16_region: torch.Tensor, int4_head: torch.Tensor) -> None:
        pin = self.cuda
        self.fp16_host[layer] = fp16_region.to("cpu").contiguous().pin_memory() if pin else fp16_region.to("cpu").clone()
        self.int4_host[layer] = int4_head.to("cpu").contiguous().pin_memory() if pin else int4_head.to("cpu").clone()

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
            if layer not in self.fp16_host:
                raise MorphError(f"layer {layer} is not swappable (no host copies: see EngineConfig.swappable)")
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
            if op.phase == "copying" and (op.events is None or op.events[1].query()):
                self._commit(op, time.perf_counter())
                done.append(op)
        return done

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
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(boundary)
            if slot in self.slot_ready:
                self.copy_stream.wait_event(self.slot_ready.pop(slot))
            start.record()
            stage.copy_(src_head, non_blocking=True)
            if tail:
                tail[0].copy_(tail[1], non_blocking=True)
            end.record()
        op.events = (start, end)
        op.phase = "copying"

    def _commit(self, op: MorphOp, now: float) -> None:
        lay = self.layout
        region = lay.region(op.layer)
        head = lay.head_bytes
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(op.events[1])
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
