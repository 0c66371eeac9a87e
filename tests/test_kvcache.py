"""KV-cache arithmetic against values computed by hand."""

import numpy as np
import pytest

from morphlib.errors import MorphError
from morphlib.workloads.kvcache import (CARDS, GIB, Card, busiest_window, extra_blocks, kv_block_bytes, kv_blocks_from_budget,
                              kv_bytes_per_token, kv_bytes_per_token_layer, kv_capacity, kv_demand, overload_pct,
                              weight_bytes)

MIB = 2**20


def test_bytes_per_token_by_hand():
    # Llama-2-7B (MHA): 2 (K,V) * 32 kv heads * 128 head dim * 2 bytes = 16 KiB per layer; 32 layers = 512 KiB
    assert kv_bytes_per_token_layer("llama-2-7b") == 2 * 32 * 128 * 2 == 16 * 1024
    assert kv_bytes_per_token("llama-2-7b") == 512 * 1024
    assert kv_block_bytes("llama-2-7b", 16) == 8 * MIB
    # GQA shapes: Llama-3-8B 8 kv heads -> 4 KiB per layer, 128 KiB per token; SmolLM2 3 x 64 -> 768 B per layer
    assert kv_bytes_per_token("llama-3-8b") == 128 * 1024
    assert kv_bytes_per_token_layer("smollm2-135m") == 2 * 3 * 64 * 2 == 768
    assert kv_bytes_per_token("smollm2-135m") == 768 * 30
    assert kv_bytes_per_token("tinyllama-1.1b") == 2 * 4 * 64 * 2 * 22
    assert kv_bytes_per_token_layer("llama-2-7b", dtype_bytes=1) == 8 * 1024  # FP8 KV


def test_blocks_from_budget():
    assert kv_blocks_from_budget("llama-2-7b", 1 * GIB, 16) == 128
    assert kv_blocks_from_budget("llama-2-7b", 8 * MIB - 1, 16) == 0
    assert kv_blocks_from_budget("llama-2-7b", 1 * GIB, 32) == 64
    with pytest.raises(MorphError, match="weights do not fit"):
        kv_blocks_from_budget("llama-2-7b", -1.0)
    with pytest.raises(MorphError, match="unknown model shape"):
        kv_blocks_from_budget("gpt-9", GIB)


def test_weights_and_swap_gain_by_hand():
    assert weight_bytes("llama-2-7b") == 6_738_415_616 * 2  # Llama-2-7B's parameter count
    assert weight_bytes("smollm2-135m") == 134_515_008 * 2  # tied embeddings
    layer_fp16 = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2  # 404,750,336 bytes
    layer_int4 = layer_fp16 // 2 // 2 + layer_fp16 // 2 // 64 * 4  # 4 bits + a bf16 (scale, zero) per 64
    assert weight_bytes("llama-2-7b", 16) == weight_bytes("llama-2-7b") - 16 * (layer_fp16 - layer_int4)
    per_layer = (layer_fp16 - layer_int4) // (8 * MIB)
    assert per_layer == 34
    assert extra_blocks("llama-2-7b", 16) == 16 * 34
    with pytest.raises(MorphError):
        weight_bytes("llama-2-7b", 33)


def test_capacity_on_l4_by_hand():
    card = Card("L4", 24e9, utilization=0.9, reserve_bytes=GIB)
    c0 = kv_capacity("llama-2-7b", card, 0)
    budget = 0.9 * 24e9 - 6_738_415_616 * 2 - GIB
    assert c0["blocks"] == int(budget // (8 * MIB)) == 840 and c0["tokens"] == 13_440
    c16 = kv_capacity("llama-2-7b", card, 16)
    assert c16["blocks"] == 840 + 544 and c16["gain_pct"] == pytest.approx(100 * 544 / 840)
    with pytest.raises(MorphError, match="weights do not fit"):
        kv_capacity("llama-2-7b", Card("tiny", 8e9), 0)
    assert set(CARDS) == {"L4-24GB", "H100-80GB"}


def test_demand_step_function():
    card = Card("toy", 1e9, prefill_tokens_per_s=1000.0, tpot_s=0.1)
    arrival = np.array([0.0, 0.5])
    ctx, gen = np.array([100, 50]), np.array([10, 5])
    # A holds 110 tokens on [0, 0.1 + 1.0); B holds 55 on [0.5, 0.5 + 0.05 + 0.5)
    d = kv_demand(arrival, ctx, gen, card, step_s=0.25, t_end=1.5)
    assert d.kv_tokens.tolist() == [110, 110, 165, 165, 165, 0, 0]
    assert d.requests.tolist() == [1, 1, 2, 2, 2, 0, 0]
    assert overload_pct(d, 150) == pytest.approx(100 * 3 / 7)
    assert busiest_window(d, 0.75) == 0.5
    with pytest.raises(MorphError):
        kv_demand(arrival, ctx, gen, card, step_s=0)
