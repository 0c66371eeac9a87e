"""Turns a scheduled batch into tensors, runs the model (eager, or a CUDA graph for decode-only steps)
and samples.

CUDA graphs. A decode-only step (every sequence feeds one token) of ``b`` sequences runs the graph of
the smallest bucket >= b captured for the *current morph state* (the set of INT4 layers): graphs are
captured lazily per (state, bucket) and kept in a dict; all share one memory pool and one set of
static input/output buffers, so a new graph costs capture time (~ms per layer stack), not memory.
A swap changes the state; when the controller swaps in a fixed order the states are few (k+1 for k
layers) and ``precapture`` can build them ahead. Padding rows have no KV slot (-1) and context 0.
Everything else (prefill chunks, mixed steps, CPU) runs eagerly.

Each run leaves its host seconds by phase in ``last_phases_s`` (prepare: inputs; launch: device work
enqueued; sync: waiting for the device and sampling) and the seconds of any graph it had to capture
first in ``last_capture_s``.

``on_logits(seqs, logits, tokens) -> tokens``: when set, sees the logits of every sampled row of a step
(``[len(seqs), vocab]`` on the device, graph or eager) after sampling and returns the tokens the
sequences get instead: a benchmark feeds forced continuations through the real decode path with it.
"""

from __future__ import annotations

import time

import torch

from morphlib.engine.attention import AttnMeta, decode_splits
from morphlib.engine.model import Model
from morphlib.errors import MorphError


class Runner:
    def __init__(self, model: Model, block_base_host: list[int], max_num_seqs: int, max_blocks: int,
                 buckets: tuple[int, ...], use_graphs: bool, seed: int = 0):
        self.model = model
        self.layout = model.layout
        self.device = model.embed.device
        self.base = block_base_host
        self.kvd = model.spec.kv_dim
        self.bs = self.layout.block_size
        self.max_bs = max(buckets)
        self.max_blocks = max_blocks
        self.max_positions = model.cos.shape[0]  # the rope table's rows: no position may reach past them
        self.buckets = buckets
        self.use_graphs = use_graphs and self.device.type == "cuda" and model.use_triton
        self.graphs: dict = {}
        self.capture_seconds: dict = {}
        self.pool = None
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 1)
        self.on_launch = None  # called once a step's device work is enqueued, before the host waits for it
        self.on_logits = None  # fn(seqs, logits, tokens) -> tokens, after sampling (module doc)
        self.last_logits: torch.Tensor | None = None  # the sampled rows' logits, during a run
        self.time_gpu = False  # CUDA events around each step's device work (``last_gpu_ms``)
        self.last_gpu_ms: float | None = None
        self.last_phases_s = (0.0, 0.0, 0.0)  # host seconds: prepare, launch, sync
        self.last_capture_s = 0.0
        self._ev = None
        self._t = [0.0, 0.0, 0.0]  # host times: start, inputs ready, launched
        if self.use_graphs:
            mb, nb = self.max_bs, max_blocks
            self.static = torch.zeros(4 * mb + mb * nb, dtype=torch.int64, device=self.device)
            self.host = torch.zeros_like(self.static, device="cpu").pin_memory()
            self.host_np = self.host.numpy()
            self.logits = torch.empty((mb, model.spec.vocab), dtype=model.dtype, device=self.device)
            self.tokens = torch.zeros(mb, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ host-side preparation
    def _slot(self, table: list[int], j: int) -> int:
        return self.base[table[j // self.bs]] + (j % self.bs) * self.kvd

    def prepare(self, batch):
        """batch: list of (seq, n) -> (ids, positions, meta, sample_rows, sampled seqs)."""
        ids, pos, slot, q_start, q_len, ctx, tables, rows, sampled = [], [], [], [], [], [], [], [], []
        for seq, n in batch:
            c0 = seq.num_computed
            if c0 + n > self.max_positions:
                raise MorphError(f"sequence {seq.id} would reach position {c0 + n - 1}, past the engine's "
                                 f"{self.max_positions} positions (max_model_len)")
            q_start.append(len(ids))
            ids.extend(seq.tokens(c0, c0 + n))
            pos.extend(range(c0, c0 + n))
            slot.extend(self._slot(seq.block_table, j) for j in range(c0, c0 + n))
            q_len.append(n)
            ctx.append(c0 + n)
            tables.append(seq.block_table)
            if c0 + n == seq.num_tokens:
                rows.append(len(ids) - 1)
                sampled.append(seq)
        dev = self.device
        width = max(len(t) for t in tables)
        bt = torch.zeros((len(tables), width), dtype=torch.int64)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = torch.as_tensor(t, dtype=torch.int64)
        decode = all(n == 1 for n in q_len)
        meta = AttnMeta(slot_off=torch.tensor(slot, dtype=torch.int64, device=dev),
                        ctx_len=torch.tensor(ctx, dtype=torch.int64, device=dev), block_tables=bt.to(dev),
                        decode=decode, q_start=torch.tensor(q_start, dtype=torch.int64, device=dev),
                        q_len=torch.tensor(q_len, dtype=torch.int64, device=dev),
                        host={"q_start": q_start, "q_len": q_len, "ctx": ctx, "tables": tables})
        if self.model.use_triton and not decode:
            bm = 16
            ts, tm = [], []
            for i, n in enumerate(q_len):
                for m0 in range(0, n, bm):
                    ts.append(i)
                    tm.append(m0)
            meta.tile_seq = torch.tensor(ts, dtype=torch.int32, device=dev)
            meta.tile_m0 = torch.tensor(tm, dtype=torch.int32, device=dev)
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.int64, device=dev)
        rows_t = torch.tensor(rows, dtype=torch.int64, device=dev)
        return ids_t, pos_t, meta, rows_t, sampled

    # ------------------------------------------------------------------ running
    @torch.inference_mode()
    def run(self, batch, decode_only: bool | None = None) -> tuple[list, list[int], str]:
        """Returns (sampled sequences, their new tokens, path) where path is 'graph' or 'eager'.
        ``decode_only``: every sequence feeds its last token (None: worked out here)."""
        timed = self.time_gpu and self.device.type == "cuda"
        if timed and self._ev is None:
            self._ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        t = self._t
        t[0] = t[1] = t[2] = time.perf_counter()
        self.last_capture_s = 0.0
        if decode_only is None:
            decode_only = all(n == 1 and s.num_computed + 1 == s.num_tokens for s, n in batch)
        out = self._run(batch, decode_only)
        if timed:
            self._ev[1].record()
            self._ev[1].synchronize()
            self.last_gpu_ms = self._ev[0].elapsed_time(self._ev[1])
        end = time.perf_counter()
        self.last_phases_s = (t[1] - t[0] - self.last_capture_s, t[2] - t[1], end - t[2])
        if self.on_logits is not None and out[0]:
            tokens = list(self.on_logits(out[0], self.last_logits, out[1]))
            if len(tokens) != len(out[0]):
                raise MorphError(f"on_logits returned {len(tokens)} tokens for {len(out[0])} sampled sequences")
            out = (out[0], tokens, out[2])
        self.last_logits = None  # an eager step's logits are not kept alive into the next step
        return out

    def _mark(self) -> None:
        """Start of the step's device work (after host-side preparation)."""
        self._t[1] = time.perf_counter()
        if self._ev is not None and self.time_gpu:
            self._ev[0].record()

    def _run(self, batch, decode_only: bool):
        if self.use_graphs and decode_only and len(batch) <= self.max_bs:
            seqs = [s for s, _ in batch]
            return seqs, self._run_graph(seqs), "graph"
        ids, pos, meta, rows, sampled = self.prepare(batch)
        self._mark()
        if not sampled:
            self.model.decode_splits = 1
            self.model.forward(ids, pos, meta, rows)
            self._launched()
            return [], [], "eager"
        if meta.decode and self.model.use_triton:
            self.model.decode_splits = decode_splits(len(batch), self.model.spec.num_kv_heads, self.num_sms)
        logits = self.last_logits = self.model.forward(ids, pos, meta, rows)
        self._launched()
        return sampled, self._sample(logits, sampled), "eager"

    def _launched(self) -> None:
        self._t[2] = time.perf_counter()
        if self.on_launch is not None:
            self.on_launch()

    def _sample(self, logits: torch.Tensor, seqs) -> list[int]:
        temps = [s.params.temperature for s in seqs]
        if all(t == 0 for t in temps):
            return logits.argmax(dim=-1).tolist()
        return self._sample_temp(logits.float(), temps)

    def _sample_temp(self, logits: torch.Tensor, temps) -> list[int]:
        t = torch.tensor(temps, dtype=torch.float32, device=logits.device)
        greedy = logits.argmax(dim=-1)
        probs = torch.softmax(logits / t.clamp(min=1e-5)[:, None], dim=-1)
        drawn = torch.multinomial(probs, 1, generator=self.gen).flatten()
        return torch.where(t == 0, greedy, drawn).tolist()

    # ------------------------------------------------------------------ graphs
    def bucket(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    def _views(self, b: int):
        mb = self.max_bs
        s = self.static
        bt = s[4 * mb:].view(mb, self.max_blocks)[:b]
        meta = AttnMeta(slot_off=s[2 * mb:2 * mb + b], ctx_len=s[3 * mb:3 * mb + b], block_tables=bt, decode=True)
        return s[:b], s[mb:mb + b], meta

    def _forward_static(self, b: int) -> None:
        ids, pos, meta = self._views(b)
        self.model.decode_splits = decode_splits(b, self.model.spec.num_kv_heads, self.num_sms)
        self.model.forward(ids, pos, meta, None, logits_out=self.logits[:b])
        torch.argmax(self.logits[:b], dim=-1, out=self.tokens[:b])

    def capture(self, state: frozenset, b: int) -> None:
        """Capture the decode graph of bucket ``b`` for morph state ``state`` (the model's INT4 set is
        switched for the capture only: capture runs nothing that writes the cache)."""
        t0 = time.perf_counter()
        saved = self.model.int4_layers
        self.model.int4_layers = set(state)
        try:
            mb = self.max_bs
            self.static.zero_()
            self.static[2 * mb:3 * mb].fill_(-1)  # no KV stores while warming up / capturing
            self._forward_static(b)  # warm-up: Triton JIT, cuBLAS handles
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._forward_static(b)
            if self.pool is None:
                self.pool = g.pool()
            g.replay()  # the first launch uploads the graph: pay that here, not in a serving step
            torch.cuda.synchronize(self.device)
        finally:
            self.model.int4_layers = saved
        self.graphs[(state, b)] = g
        self.capture_seconds[(state, b)] = time.perf_counter() - t0

    def precapture(self, states, buckets=None) -> float:
        """Capture every (state, bucket) graph not yet cached; returns the seconds spent."""
        t0 = time.perf_counter()
        for state in states:
            for b in buckets or self.buckets:
                if (frozenset(state), b) not in self.graphs:
                    self.capture(frozenset(state), b)
        return time.perf_counter() - t0

    def _run_graph(self, seqs) -> list[int]:
        b = len(seqs)
        bb = self.bucket(b)
        key = (self.model.state, bb)
        if key not in self.graphs:
            self.capture(*key)
            self.last_capture_s = self.capture_seconds[key]
        mb, nb = self.max_bs, self.max_blocks
        h = self.host_np
        h[:4 * mb] = 0
        h[2 * mb:3 * mb] = -1
        base, bs, kvd = self.base, self.bs, self.kvd
        btv = h[4 * mb:4 * mb + bb * nb].reshape(bb, nb)
        for i, seq in enumerate(seqs):
            j = seq.num_computed
            table = seq.block_table
            h[i] = seq.token(j)
            h[mb + i] = j
            h[2 * mb + i] = base[table[j // bs]] + (j % bs) * kvd
            h[3 * mb + i] = j + 1
            btv[i, :len(table)] = table
        self._mark()
        self.static[:4 * mb].copy_(self.host[:4 * mb], non_blocking=True)
        self.static[4 * mb:4 * mb + bb * nb].copy_(self.host[4 * mb:4 * mb + bb * nb], non_blocking=True)
        self.graphs[key].replay()
        self.last_logits = self.logits[:b]
        self._launched()
        if any(s.params.temperature > 0 for s in seqs):
            return self._sample_temp(self.logits[:b].float(), [s.params.temperature for s in seqs])
        return self.tokens[:b].tolist()
