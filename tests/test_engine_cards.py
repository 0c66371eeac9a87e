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


def test_budget_cap_names_the_device_index(monkeypatch):
    """torch's memory-fraction calls need a device index: an engine built on plain "cuda" must pass the
    current device's (seen on an H200: ValueError for torch.device('cuda'))."""
    import types

    import torch

    from morphlib.engine.llm import LLM

    calls = []

    def needs_index(device=None):
        if not isinstance(device, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        return 1.0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=100 << 30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", needs_index)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, needs_index(d))))
    class Fake:  # weak-referenceable, unlike SimpleNamespace
        device, _reserved0 = torch.device("cuda"), 0

    fake = Fake()
    LLM._enforce(fake, 10 << 30)
    assert calls and calls[0][0] == 0.1 and fake.memory_limit == 10 << 30
    fake._release()  # restores the fraction through the same index
    assert len(calls) == 2
