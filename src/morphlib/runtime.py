"""Process-wide settings that make GPU runs repeatable."""

from __future__ import annotations

import os

import torch


def make_deterministic() -> None:
    """Bitwise-repeatable GPU runs. Without this, two identical bf16 greedy generations of the same model
    on an H100 matched on only 93-98 % of tokens; with it, 100 %. It must be the strict mode: with
    ``warn_only=True`` the runs still differed. Call before the first CUDA operation (cuBLAS reads
    ``CUBLAS_WORKSPACE_CONFIG`` when it starts); an op without a deterministic kernel then raises."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
