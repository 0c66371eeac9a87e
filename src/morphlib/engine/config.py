"""Engine and sampling configuration: plain dataclasses, checked once, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphlib.cards import get_card
from morphlib.errors import MorphError, check_int

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
RESTORE_POLICIES = ("wait", "preempt")
ATTENTION = ("auto", "triton", "torch")
SWAP_MODES = ("side", "sync")
SWAP_COMPUTE = ("int4", "fp16")


def _int(name: str, value, lo: int = 1) -> None:
    check_int(f"EngineConfig.{name}", value, lo)


def _fraction(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise MorphError(f"EngineConfig.{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass
class EngineConfig:
    """How an engine is built. Every field is checked once, at construction.

    memory_budget: bytes the engine may hold on its device: weights + KV pool + swap staging (one
        arena) + measured activation/graph workspace. None: ``card``'s budget when a card is named, else
        90 % of the free GPU memory on CUDA; on CPU the weights plus 512 MiB.
    card: a card of ``morphlib.cards.CARDS`` ("L4", "A100-40GB", "A100-80GB", "H100-80GB", "H200"): the
        budget is its usable memory (the same number chapter 5's capacity arithmetic uses) and its PCIe
        bandwidth is the copies' first estimate. Give a card or a memory_budget, not both.
    enforce_budget: on CUDA, cap the process's allocator at what it held before the engine plus the budget
        (``torch.cuda.set_per_process_memory_fraction``) for the engine's lifetime (``LLM.close()``).
    kv_blocks: cap on the main KV pool's blocks (None: whatever the budget leaves). Blocks freed by
        swapped layers come on top of it.
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16" or "float32".
    block_size: tokens per KV block (16, 32, 64 or 128); every block holds all layers (full depth).
    max_num_seqs / max_num_batched_tokens: batch limits per step (sequences / tokens incl. prefill chunks).
    max_model_len: longest prompt + output (None: the model's max positions, at most 4096).
    group_size / symmetric: INT4 format when the engine quantizes itself (RTN); a Morpher's twins
        bring their own.
    staging_slots: swap staging buffers (each one layer's INT4 bytes) in the arena; 2 double-buffers.
    restore_policy: what a restore does when KV blocks in the layer's freed tail are live and cannot be
        migrated (``restore_migrate`` off, or too few free blocks elsewhere): "wait" (no new use of those
        blocks; the restore finishes when their sequences have) or "preempt" (the sequences holding them
        are preempted, recompute later).
    restore_migrate: a restore first moves the tail's live KV blocks into free blocks of the main pool (or
        of older tails) with one device copy at a step boundary, block tables updated; only when too few
        blocks are free does ``restore_policy`` apply.
    no_admit_after_preempt: admit no waiting request in a step in which anything was preempted (vLLM v1's
        rule; a sequence preempted by a schedule call is never re-admitted by the same call either way).
    admission_watermark: fraction of the KV capacity that must stay free after admitting a request (0: none;
        ignored while nothing runs, so a lone request is never starved).
    swap_mode: "side" (copies on a side stream in paced chunks, commit at a later boundary) or "sync"
        (the whole copy on the compute stream at the boundary, committed at the same boundary: the
        control that stalls decode).
    copy_chunk_bytes / copy_pace: side-stream copy pieces, and the fraction of the last step's time (times
        the copy bandwidth) that the copies enqueued after one step may take (None: unpaced, every queued
        chunk is sent after the next step's launch). ``Engine.configure_copies`` changes these and
        ``swap_mode`` on a built engine.
    copy_bandwidth: host->device bytes/s assumed before any copy was measured (CUDA; then measured) and
        used by the modelled copies of the simulator and of a CPU engine (None: ``card``'s PCIe bandwidth;
        on CPU without a card, copies land at once).
    swap_grows_pool: a committed swap adds the layer's freed tail to the KV pool (off: INT4 compute only).
    swap_compute: "int4" (the swapped layer runs INT4) or "fp16" (it keeps its 16-bit compute; the KV
        blocks a swap adds come from a reserve *outside* the budget: an oracle, said so in its records).
        Copies are issued in every mode, so the copy traffic is the same.
    cuda_graphs: capture decode steps as CUDA graphs per (morph state, batch bucket).
    attention: "auto" (Triton kernels on CUDA, the torch reference on CPU), "triton" or "torch".
    swappable: layers that can be swapped: their INT4 bytes wait in pinned host memory (None: all layers).
    restorable: swappable layers whose 16-bit bytes also wait in pinned host memory, so that they can
        be restored (None: all swappable layers; a benchmark that only swaps may save the host memory).
    workspace_margin: extra fraction on top of the measured workspace.
    """

    memory_budget: int | None = None
    card: str | None = None
    enforce_budget: bool = True
    kv_blocks: int | None = None
    dtype: str = "auto"
    device: str | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    group_size: int = 64
    symmetric: bool = False
    staging_slots: int = 2
    restore_policy: str = "wait"
    restore_migrate: bool = True
    no_admit_after_preempt: bool = False
    admission_watermark: float = 0.0
    swap_mode: str = "side"
    copy_chunk_bytes: int = 16 << 20
    copy_pace: float | None = 0.8
    copy_bandwidth: float | None = None
    swap_grows_pool: bool = True
    swap_compute: str = "int4"
    cuda_graphs: bool = True
    graph_buckets: tuple[int, ...] | None = None
    attention: str = "auto"
    swappable: tuple[int, ...] | None = None
    restorable: tuple[int, ...] | None = None
    workspace_margin: float = 0.10
    seed: int = 0

    def __post_init__(self):
        if self.memory_budget is not None:
            _int("memory_budget", self.memory_budget)
        if self.card is not None:
            if self.memory_budget is not None:
                raise MorphError("EngineConfig: give a card or a memory_budget, not both")
            try:
                get_card(self.card)
            except MorphError as exc:
                raise MorphError(f"EngineConfig.card: {exc}") from None
        if self.kv_blocks is not None:
            _int("kv_blocks", self.kv_blocks)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise MorphError(f"EngineConfig.dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.block_size not in (16, 32, 64, 128):
            raise MorphError(f"EngineConfig.block_size must be 16, 32, 64 or 128, got {self.block_size!r}")
        _int("max_num_seqs", self.max_num_seqs)
        _int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise MorphError(f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                             f"least max_num_seqs ({self.max_num_seqs}): every running sequence decodes one token a step")
        if self.max_model_len is not None:
            _int("max_model_len", self.max_model_len, 2)
        _int("staging_slots", self.staging_slots)
        _int("group_size", self.group_size)
        _int("copy_chunk_bytes", self.copy_chunk_bytes)
        _int("seed", self.seed, 0)
        for name, allowed in (("restore_policy", RESTORE_POLICIES), ("attention", ATTENTION),
                              ("swap_mode", SWAP_MODES), ("swap_compute", SWAP_COMPUTE)):
            if getattr(self, name) not in allowed:
                raise MorphError(f"EngineConfig.{name} {getattr(self, name)!r} is not one of {allowed}")
        _fraction("workspace_margin", self.workspace_margin, 0, 4)
        _fraction("admission_watermark", self.admission_watermark, 0, 0.5)
        if self.copy_pace is not None:
            _fraction("copy_pace", self.copy_pace, 0.01, 1)
        if self.copy_bandwidth is not None:
            _fraction("copy_bandwidth", self.copy_bandwidth, 1e6, 1e13)
        for name in ("enforce_budget", "restore_migrate", "no_admit_after_preempt", "swap_grows_pool",
                     "cuda_graphs", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise MorphError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.graph_buckets is not None:
            buckets = tuple(self.graph_buckets)
            for b in buckets:
                _int("graph_buckets[...]", b)
            if list(buckets) != sorted(set(buckets)):
                raise MorphError(f"EngineConfig.graph_buckets must be increasing, got {buckets}")
            self.graph_buckets = buckets

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def buckets(self) -> tuple[int, ...]:
        if self.graph_buckets is not None:
            return tuple(b for b in self.graph_buckets if b <= self.max_num_seqs) or (self.max_num_seqs,)
        out, b = [], 1
        while b < self.max_num_seqs:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_num_seqs])

    def morph_layers(self, num_layers: int) -> tuple[tuple[int, ...], frozenset]:
        """(swappable layers, restorable layers) for a model of ``num_layers``, checked."""
        swappable = tuple(range(num_layers)) if self.swappable is None else tuple(self.swappable)
        restorable = frozenset(swappable if self.restorable is None else self.restorable)
        for li in sorted(set(swappable) | restorable):
            if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < num_layers or li not in swappable:
                raise MorphError(f"swappable/restorable layer {li} is out of range (0..{num_layers - 1}) "
                                 "or restorable but not swappable")
        return swappable, restorable

    def copy_bandwidth_guess(self) -> float | None:
        """The host->device bandwidth copies assume before measuring: ``copy_bandwidth``, else the card's."""
        if self.copy_bandwidth is not None:
            return float(self.copy_bandwidth)
        return get_card(self.card).h2d_bytes_per_s if self.card is not None else None


@dataclass
class SamplingParams:
    """max_tokens new tokens; temperature 0 is greedy; ignore_eos forces exactly max_tokens (dummy weights)."""

    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self):
        check_int("SamplingParams.max_tokens", self.max_tokens)
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise MorphError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
