"""Copy backends: how a morph operation's bytes move, and when they have landed.

The morph planner (``morphing.py``) decides *what* to copy and *when* to commit; a backend moves the
bytes and answers "has it landed?" at each step boundary. The planner hands it, at issue, a list of
pieces (arena byte offset <- a layer's host copy, INT4 head or 16-bit region, from some offset, n bytes);
the backend cuts them into ``chunk_bytes`` chunks.

* ``mode="side"``: chunks wait in a queue; ``pump(budget)`` sends up to ``budget`` bytes of them after a
  step has launched its own work (at least one chunk), so a step's small input copy never queues behind
  a whole layer on the copy engine (seen on an H200: a 405 MB copy added its full 7.3 ms to the step it
  overlapped). The op commits at the first boundary after its last chunk has landed.
* ``mode="sync"``: every chunk is sent at issue, on the compute stream, and the op commits at the same
  boundary: the step that follows waits for the copy (chapter 4's control).

Backends:

* ``SimulatedCopies``: no bytes; a chunk sent at time t lands at ``max(t, link free) + n / bandwidth``
  (side mode; one link, FIFO), a sync copy at once (its time belongs to the step: ``StepPlan.sync_copy_bytes``).
  ``bandwidth=None`` lands everything at once.
* ``DeviceCopies`` (CPU or CUDA, the real engine): the same timing model decides on CPU, where copies run
  synchronously (so a CPU engine on a virtual clock commits exactly when a simulator does); on CUDA the
  side mode uses a copy stream and events (landed = the last chunk's event has completed, polled, never
  waited on), the sync mode the compute stream, and the bandwidth is measured from the events.
  It also makes the commit copy (staging -> head, device to device, on the compute stream) and the KV
  block migrations of a restore. Every chunk and commit is timed: CUDA events, or on CPU host timestamps
  (``HostEvent``, the same ``elapsed_time``), so ``MorphOp.copy_ms`` / ``span_ms`` / ``commit_ms`` exist
  on both; an op's ``host_ms`` counts its issue, the sending of its chunks and its commit.
"""

from __future__ import annotations

import time

import torch

POLL_S = 2e-4  # how soon an idle replay looks again at copies in flight on CUDA


class SimulatedCopies:
    """Timing and chunk bookkeeping without bytes (and the base of the device backend)."""

    def __init__(self, chunk_bytes: int, mode: str, bandwidth: float | None):
        self.chunk_bytes, self.mode, self.bandwidth = chunk_bytes, mode, bandwidth
        self.sync = mode == "sync"
        self.queue: list = []  # ops with chunks left to send, in issue order
        self.inflight: list = []  # ops started and not yet committed
        self.link_free = float("-inf")  # modelled time at which the side link is idle
        self.sent_bytes = 0  # every byte sent so far (host->device)

    # ------------------------------------------------------------------ the planner's calls
    def start(self, op, pieces, now: float) -> None:
        """Issue ``op``'s copies: ``pieces`` = [(arena offset, "int4" | "fp16", layer, host offset, bytes)]."""
        c = self.chunk_bytes
        op.chunks = [(dst + i, src, layer, off + i, min(c, n - i)) for dst, src, layer, off, n in pieces
                     for i in range(0, n, c)]
        op.copy_bytes = sum(n for *_, n in pieces)
        op.landed_at = float("-inf")
        self.inflight.append(op)
        self._begin(op)
        if self.sync:
            self._send(op, len(op.chunks), now)
        else:
            self.queue.append(op)

    def pump(self, budget: float, now: float) -> int:
        """Send queued chunks, up to ``budget`` bytes (at least one chunk); returns the bytes sent."""
        sent = 0
        while self.queue and (sent == 0 or sent < budget):
            op = self.queue[0]
            k = 0
            while k < len(op.chunks) and (sent == 0 or sent < budget):
                sent += op.chunks[k][-1]
                k += 1
            self._send(op, k, now)
            if not op.chunks:
                self.queue.pop(0)
        return sent

    def ready(self, op, now: float) -> bool:
        """Whether every byte of ``op`` has landed (the planner may commit it at this boundary)."""
        return not op.chunks and self._landed(op, now)

    def next_landing(self, now: float) -> float:
        """The earliest time > now at which a sent copy lands (``now`` when that is not modelled)."""
        return max(now, min((op.landed_at for op in self.inflight if not op.chunks), default=now))

    def finish(self, now: float) -> float:
        """Send everything queued and wait for it; returns the (modelled) time it has all landed."""
        self.pump(float("inf"), now)
        return max([now] + [op.landed_at for op in self.inflight])

    def commit(self, op, dst: int, src: int, nbytes: int) -> None:
        """The commit's device-to-device copy (staging -> head): no bytes to move here."""
        self.inflight.remove(op)

    def migrate(self, runs: list[tuple[int, int, int]]) -> None:
        """KV block migration (src offset, dst offset, bytes) runs: nothing to do without bytes."""

    def budget(self, pace: float | None, last_step_s: float) -> float:
        """Bytes one step may send in side mode: ``pace`` x bandwidth x the last step's time (no limit when
        ``pace`` is None: unpaced)."""
        if pace is None or self.bandwidth is None:
            return float("inf")
        return pace * self.bandwidth * last_step_s

    def configure(self, mode: str, chunk_bytes: int) -> None:
        """Copy mode and chunk size of the operations issued from now on."""
        self.mode, self.sync, self.chunk_bytes = mode, mode == "sync", chunk_bytes

    def reset(self) -> None:
        self.queue.clear()
        self.inflight.clear()
        self.link_free = float("-inf")
        self.sent_bytes = 0

    # ------------------------------------------------------------------ timing model
    def _begin(self, op) -> None:
        """Device work at issue (the device backend: the copy stream waits for the boundary)."""

    def _send(self, op, k: int, now: float) -> None:
        chunks, op.chunks = op.chunks[:k], op.chunks[k:]
        n = sum(c[-1] for c in chunks)
        self.sent_bytes += n
        if self.sync or self.bandwidth is None:
            op.landed_at = max(op.landed_at, now)
        else:
            start = max(now, self.link_free)
            self.link_free = op.landed_at = start + n / self.bandwidth
        self._move(op, chunks)

    def _move(self, op, chunks) -> None:
        """Move the bytes of ``chunks`` (the device backend); the simulator moves none."""

    def _landed(self, op, now: float) -> bool:
        return now >= op.landed_at


class HostEvent:
    """A CPU stand-in for a CUDA timing event: the ``time.perf_counter`` time at which it was made."""

    __slots__ = ("t",)

    def __init__(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to ``end`` (as ``torch.cuda.Event.elapsed_time``)."""
        return 1e3 * (end.t - self.t)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class DeviceCopies(SimulatedCopies):
    """Real copies into the engine's arena from pinned host copies of each swappable layer."""

    def __init__(self, arena, chunk_bytes: int, mode: str, bandwidth: float | None):
        self.cuda = arena.buf.device.type == "cuda"
        super().__init__(chunk_bytes, mode, bandwidth if not self.cuda else (bandwidth or 25e9))
        self.arena = arena
        self.device = arena.buf.device
        self.int4_host: dict[int, torch.Tensor] = {}
        self.fp16_host: dict[int, torch.Tensor] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slot_ready: dict[int, object] = {}  # slot -> event after which the slot may be overwritten

    def set_host_copies(self, layer: int, fp16_region: torch.Tensor | None, int4_head: torch.Tensor) -> None:
        """Keep (pinned, on CUDA) host copies of a layer's INT4 head and, unless None, its 16-bit region."""
        def host(t):
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
            out.copy_(t)
            return out

        if fp16_region is not None:
            self.fp16_host[layer] = host(fp16_region)
        self.int4_host[layer] = host(int4_head)

    def _begin(self, op) -> None:
        t0 = time.perf_counter()
        op.events = []
        if self.cuda and not self.sync:
            compute = torch.cuda.current_stream(self.device)
            boundary = torch.cuda.Event()
            boundary.record(compute)  # everything enqueued so far (KV writes to a tail, migrations, commits)
            op.waits = [boundary] + ([self.slot_ready.pop(op.slot)] if op.slot in self.slot_ready else [])
        op.host_ms += 1e3 * (time.perf_counter() - t0)

    def _move(self, op, chunks) -> None:
        t0 = time.perf_counter()
        host = {"int4": self.int4_host, "fp16": self.fp16_host}
        if not self.cuda:  # synchronous memcpy, timed by host timestamps (the CPU's "device time")
            for dst, src, layer, off, n in chunks:
                start = HostEvent()
                self.arena.buf[dst:dst + n].copy_(host[src][layer][off:off + n])
                op.events.append((start, HostEvent()))
            op.host_ms += 1e3 * (time.perf_counter() - t0)
            return
        stream = torch.cuda.current_stream(self.device) if self.sync else self.stream
        with torch.cuda.stream(stream):
            for ev in op.waits:
                stream.wait_event(ev)
            op.waits = []
            for dst, src, layer, off, n in chunks:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.arena.buf[dst:dst + n].copy_(host[src][layer][off:off + n], non_blocking=True)
                end.record()
                op.events.append((start, end))
        op.host_ms += 1e3 * (time.perf_counter() - t0)

    def _landed(self, op, now: float) -> bool:
        if not self.cuda:
            return super()._landed(op, now)
        return self.sync or not op.events or op.events[-1][1].query()

    def next_landing(self, now: float) -> float:
        if self.cuda:  # not modelled: poll the events again shortly
            return now + POLL_S if self.inflight else now
        return super().next_landing(now)

    def finish(self, now: float) -> float:
        t = super().finish(now)
        if self.cuda:
            for op in self.inflight:
                if op.events:
                    op.events[-1][1].synchronize()
            return now
        return t

    def commit(self, op, dst: int, src: int, nbytes: int) -> None:
        t0 = time.perf_counter()
        super().commit(op, dst, src, nbytes)
        buf = self.arena.buf
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            if op.events and not self.sync:
                compute.wait_event(op.events[-1][1])
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(compute)
            buf[dst:dst + nbytes].copy_(buf[src:src + nbytes])
            e.record(compute)
            op.commit_events = (s, e)
            self.slot_ready[op.slot] = e
            ms = None if self.sync else op.copy_ms()  # (side mode: every chunk's event has completed)
            if ms:  # the copies' measured bandwidth paces the next ones
                self.bandwidth = 0.5 * self.bandwidth + 0.5 * op.copy_bytes / (ms * 1e-3)
        else:
            s = HostEvent()
            buf[dst:dst + nbytes].copy_(buf[src:src + nbytes])
            op.commit_events = (s, HostEvent())
        op.host_ms += 1e3 * (time.perf_counter() - t0)

    def migrate(self, runs: list[tuple[int, int, int]]) -> None:
        buf = self.arena.buf
        for src, dst, n in runs:  # on the compute stream: after the steps that wrote them, before the next
            buf[dst:dst + n].copy_(buf[src:src + n])

    def reset(self) -> None:
        super().reset()
        self.slot_ready.clear()
