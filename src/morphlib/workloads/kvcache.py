"""KV-cache arithmetic for paged attention, and how much KV capacity swapped layers buy (chapter 5).

* Bytes of KV per token and layer: ``2 (K and V) * kv_heads * head_dim * dtype_bytes``.
* KV blocks are **full-depth**, as in MorphServe and vLLM: one block holds ``block_size`` tokens for
  every layer, so ``block_bytes = block_size * num_layers * per_token_per_layer``.
* The KV budget of a card is ``utilization * card memory - weights - reserve`` (reserve: activations,
  CUDA context, fragmentation; a stated assumption, not a measurement). Card memory and utilization
  come from ``morphlib.cards`` (the table the serving engine's budgets come from too).
* Swapping a layer to INT4 frees ``fp16_bytes - int4_bytes`` of that layer (``shape_layer_bytes``);
  each freed range holds ``floor(freed / block_bytes)`` whole blocks (the ranges are not adjacent).

``kv_demand`` turns a request trace into KV tokens in flight, with a deliberately simple service
model: a request holds prompt + output tokens from its arrival until prefill and decode are done,
with stated per-card prefill throughput and time per output token. It is an *analytic* first look
(no queueing, no preemption, no batching limits), not a serving simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from morphlib.cards import get_card
from morphlib.errors import MorphError
from morphlib.shapes import shape_config, shape_layer_bytes

GIB = 2**30


def kv_bytes_per_token_layer(shape: str, dtype_bytes: int = 2) -> int:
    c = shape_config(shape)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_key_value_heads"] * head_dim * dtype_bytes


def kv_bytes_per_token(shape: str, dtype_bytes: int = 2) -> int:
    """KV bytes of one token over all layers."""
    return kv_bytes_per_token_layer(shape, dtype_bytes) * shape_config(shape)["num_hidden_layers"]


def kv_block_bytes(shape: str, block_size: int = 16, dtype_bytes: int = 2) -> int:
    """Bytes of one full-depth paged KV block."""
    if block_size < 1:
        raise MorphError(f"block size must be at least 1 token, got {block_size}")
    return block_size * kv_bytes_per_token(shape, dtype_bytes)


def kv_blocks_from_budget(shape: str, budget_bytes: float, block_size: int = 16, dtype_bytes: int = 2) -> int:
    """Whole KV blocks that fit in ``budget_bytes`` (an error when the budget is negative)."""
    if budget_bytes < 0:
        raise MorphError(f"negative KV budget ({budget_bytes / GIB:.2f} GiB): the weights do not fit")
    return int(budget_bytes // kv_block_bytes(shape, block_size, dtype_bytes))


def weight_bytes(shape: str, swapped_layers: int = 0, group_size: int = 64) -> int:
    """16-bit bytes of the whole model (embeddings, head, norms, layers), ``swapped_layers`` of them INT4."""
    c = shape_config(shape)
    n = c["num_hidden_layers"]
    if not 0 <= swapped_layers <= n:
        raise MorphError(f"cannot swap {swapped_layers} layers of {shape} ({n} layers)")
    layer = shape_layer_bytes(shape, group_size)
    h, v = c["hidden_size"], c["vocab_size"]
    embed = v * h * 2 * (1 if c.get("tie_word_embeddings") else 2)
    norms = (2 * n + 1) * h * 2
    return embed + norms + (n - swapped_layers) * layer["fp16_bytes"] + swapped_layers * layer["int4_bytes"]


def extra_blocks(shape: str, swapped_layers: int, block_size: int = 16, group_size: int = 64,
                 dtype_bytes: int = 2) -> int:
    """KV blocks the freed ranges of ``swapped_layers`` INT4 layers hold (whole blocks per layer)."""
    layer = shape_layer_bytes(shape, group_size)
    freed = layer["fp16_bytes"] - layer["int4_bytes"]
    return swapped_layers * int(freed // kv_block_bytes(shape, block_size, dtype_bytes))


@dataclass(frozen=True)
class Card:
    """A GPU and the (assumed) speed of serving on it; ``memory_bytes`` is the nominal capacity."""

    name: str
    memory_bytes: float
    utilization: float = 0.90  # fraction of memory the engine may use (vLLM's default)
    reserve_bytes: float = 1 * GIB  # activations, CUDA context, fragmentation
    prefill_tokens_per_s: float = 4000.0  # assumed prefill throughput
    tpot_s: float = 0.045  # assumed time per output token


def _card(key: str, **speed) -> Card:
    """A card of ``morphlib.cards`` (memory as reported, usable fraction) with assumed serving speeds."""
    c = get_card(key)
    return Card(c.name, c.memory_bytes, utilization=c.usable_fraction, **speed)


CARDS = {
    # L4: 300 GB/s; a 13.5 GB FP16 7B model -> ~45 ms per decode step (memory roofline).
    "L4-24GB": _card("L4", prefill_tokens_per_s=4000.0, tpot_s=0.045),
    # H100 SXM 80 GB: 3.35 TB/s -> ~4 ms roofline; ~15 ms with real kernels and batching overhead.
    "H100-80GB": _card("H100-80GB", prefill_tokens_per_s=20000.0, tpot_s=0.015),
}


def kv_capacity(shape: str, card: Card, swapped_layers: int = 0, block_size: int = 16, group_size: int = 64,
                dtype_bytes: int = 2) -> dict:
    """KV blocks and tokens on ``card`` with ``swapped_layers`` layers in INT4 (MorphServe's accounting:
    the FP16 budget's blocks plus the blocks the freed layer ranges hold)."""
    weights = weight_bytes(shape, 0, group_size)
    budget = card.utilization * card.memory_bytes - weights - card.reserve_bytes
    base = kv_blocks_from_budget(shape, budget, block_size, dtype_bytes)
    extra = extra_blocks(shape, swapped_layers, block_size, group_size, dtype_bytes)
    return {"shape": shape, "card": card.name, "swapped_layers": swapped_layers, "block_size": block_size,
            "weights_gib": weights / GIB, "kv_budget_gib": budget / GIB,
            "blocks": base + extra, "extra_blocks": extra, "tokens": (base + extra) * block_size,
            "gain_pct": 100.0 * extra / base if base else math.inf}


def capacity_table(shape: str, cards: dict[str, Card], swap_counts, block_size: int = 16,
                   group_size: int = 64) -> pd.DataFrame:
    rows = [{"card_key": key, **kv_capacity(shape, card, k, block_size, group_size)}
            for key, card in cards.items() for k in swap_counts]
    return pd.DataFrame(rows)


def kv_demand(arrival_s: np.ndarray, context: np.ndarray, generated: np.ndarray, card: Card,
              step_s: float = 0.5, t_end: float | None = None) -> pd.DataFrame:
    """KV tokens (and requests) in flight on a time grid, if every request were admitted at arrival and
    held prompt + output tokens for ``prompt / prefill_rate + output * tpot`` seconds."""
    if not step_s > 0:
        raise MorphError(f"time step must be positive, got {step_s}")
    service = context / card.prefill_tokens_per_s + generated * card.tpot_s
    starts, ends, tokens = arrival_s, arrival_s + service, (context + generated).astype(np.float64)
    grid = np.arange(0.0, (t_end if t_end is not None else float(ends.max())) + step_s, step_s)
    order_s, order_e = np.argsort(starts, kind="stable"), np.argsort(ends, kind="stable")
    cum_s = np.concatenate([[0.0], np.cumsum(tokens[order_s])])
    cum_e = np.concatenate([[0.0], np.cumsum(tokens[order_e])])
    n_started = np.searchsorted(starts[order_s], grid, side="right")
    n_ended = np.searchsorted(ends[order_e], grid, side="right")
    return pd.DataFrame({"t_s": grid, "kv_tokens": cum_s[n_started] - cum_e[n_ended],
                         "requests": n_started - n_ended})


def busiest_window(demand: pd.DataFrame, length_s: float = 72.0) -> float:
    """Start time of the ``length_s`` window with the highest mean KV demand."""
    step = float(demand["t_s"].iloc[1] - demand["t_s"].iloc[0])
    width = max(1, int(round(length_s / step)))
    if width >= len(demand):
        return 0.0
    means = np.convolve(demand["kv_tokens"].to_numpy(), np.ones(width) / width, mode="valid")
    return float(demand["t_s"].iloc[int(np.argmax(means))])


def overload_pct(demand: pd.DataFrame, capacity_tokens: float) -> float:
    """Percent of the grid's time points at which KV demand exceeds ``capacity_tokens``."""
    return 100.0 * float((demand["kv_tokens"] > capacity_tokens).mean())
