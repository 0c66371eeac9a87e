"""Budgets from one card table: the engine (``EngineConfig(card=...)``) and chapter 5's capacity arithmetic
(``morphlib.workloads.kvcache``) read the same bytes, and "Llama-2-7B on an L4" gives the same number of
KV blocks both ways when the engine's workspace + staging is the arithmetic's stated reserve (the engine
side with its *measured* workspace is a ``gpu`` test in ``test_engine_gpu.py``)."""

import pytest

from morphlib.cards import CARDS, get_card
from morphlib.engine import EngineConfig, Simulator, TableStepTime
from morphlib.engine.memory import Layout, main_pool_blocks
from morphlib.engine.spec import ModelSpec
from morphlib.errors import MorphError
from morphlib.shapes import SHAPES
from morphlib.workloads import kvcache

GIB = 2**30


def test_one_table_for_engine_and_arithmetic():
    assert set(CARDS) == {"L4", "A100-40GB", "A100-80GB", "H100-80GB", "H200"}
    for card in CARDS.values():
        assert 20e9 < card.memory_bytes < 160e9 and 0 < card.usable_fraction <= 1 and card.h2d_bytes_per_s > 1e9
        assert card.budget_bytes == int(card.usable_fraction * card.memory_bytes)
    assert get_card("L4").memory_bytes == 23034 * 2**20  # nvidia-smi's memory.total for an L4
    for key, table_key in (("L4-24GB", "L4"), ("H100-80GB", "H100-80GB")):
        arith, card = kvcache.CARDS[key], get_card(table_key)
        assert (arith.memory_bytes, arith.utilization) == (card.memory_bytes, card.usable_fraction)
    assert EngineConfig(card="L4").copy_bandwidth_guess() == 25e9
    with pytest.raises(MorphError, match="unknown card 'T4'"):
        EngineConfig(card="T4")
    with pytest.raises(MorphError, match="not both"):
        EngineConfig(card="L4", memory_budget=1 << 30)


def test_llama_7b_on_an_l4_gives_the_arithmetics_block_count():
    arith = kvcache.kv_capacity("llama-2-7b", kvcache.CARDS["L4-24GB"], 0)  # reserve: 1 GiB
    spec = ModelSpec.from_hf_config(dict(SHAPES["llama-2-7b"], model_type="llama"), "llama-2-7b")
    import torch

    layout = Layout(spec, torch.bfloat16, torch.device("cpu"), 16, 64, False, 2, 4096)
    staging = layout.staging_slots * layout.slot_bytes
    engine = main_pool_blocks(layout, get_card("L4").budget_bytes, GIB - staging, None, 4096, "llama-2-7b")
    assert arith["blocks"] > 800
    assert abs(engine / arith["blocks"] - 1) <= 0.02, (engine, arith["blocks"])
    sim = Simulator("shape:llama-2-7b", EngineConfig(card="L4", dtype="bfloat16"), TableStepTime({1: 0.045}),
                    workspace_bytes=GIB - staging)
    assert sim.layout.main_blocks == engine and sim.budget == get_card("L4").budget_bytes
    # 16 swapped layers: the tails the arithmetic counts are the engine's tail groups
    assert 16 * layout.tail_blocks == kvcache.extra_blocks("llama-2-7b", 16)
