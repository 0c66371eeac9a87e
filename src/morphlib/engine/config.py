"""Engine and sampling configuration: plain dataclasses, checked once, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphlib.errors import MorphError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
RESTORE_POLICIES = ("wait", "preempt")
ATTENTION = ("auto", "triton", "torch")


def _int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise MorphError(f"EngineConfig.{name} must be an integer >= {lo}, got {value!r}")


@dataclass
class EngineConfig:
    """How an engine is built. Every field is checked once, at construction.

    memory_budget: bytes the engine may hold on its device: weights + KV pool + swap staging (one
        arena) + measured activation/graph workspace. None: 90 % of the free GPU memory on CUDA;
        on CPU the weights plus 512 MiB.
    kv_blocks: cap on the main KV pool's blocks (None: whatever the budget leaves). Blocks freed by
        swapped layers come on top of it.
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16" or "float32".
    block_size: tokens per KV block (16, 32, 64 or 128); every block holds all layers (full depth).
    max_num_seqs / max_num_batched_tokens: batch limits per step (sequences / tokens incl. prefill chunks).
    max_model_len: longest prompt + output (None: the model's max positions, at most 4096).
    group_size / symmetric: INT4 format when the engine quantizes itself (RTN); a Morpher's twins
        bring their own.
    staging_slots: swap staging buffers (each one layer's INT4 bytes) in the arena; 2 double-buffers.
    restore_policy: what a restore does when KV blocks in the layer's freed tail are live:
        "wait" (no new use of those blocks; the restore finishes when their sequences have) or
        "preempt" (the sequences holding them are preempted, recompute later).
    cuda_graphs: capture decode steps as CUDA graphs per (morph state, batch bucket).
    attention: "auto" (Triton kernels on CUDA, the torch reference on CPU), "triton" or "torch".
    swappable: layers that can be swapped: their INT4 bytes wait in pinned host memory (None: all layers).
    restorable: swappable layers whose 16-bit bytes also wait in pinned host memory, so that they can
        be restored (None: all swappable layers; a benchmark that only swaps may save the host memory).
    workspace_margin: extra fraction on top of the measured workspace.
    """

    memory_budget: int | None = None
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
        if self.restore_policy not in RESTORE_POLICIES:
            raise MorphError(f"EngineConfig.restore_policy {self.restore_policy!r} is not one of {RESTORE_POLICIES}")
        if self.attention not in ATTENTION:
            raise MorphError(f"EngineConfig.attention {self.attention!r} is not one of {ATTENTION}")
        if not 0 <= self.workspace_margin <= 4:
            raise MorphError(f"EngineConfig.workspace_margin must be in [0, 4], got {self.workspace_margin!r}")
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


@dataclass
class SamplingParams:
    """max_tokens new tokens; temperature 0 is greedy; ignore_eos forces exactly max_tokens (dummy weights)."""

    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MorphError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise MorphError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
