"""Serving engine vs Hugging Face transformers, on the real SmolLM2-135M weights in float32 (CPU):
greedy tokens identical on every position, with and without forced preemptions, with and without
layers swapped to INT4 (engine vs the same Morpher bytes in HF), and exact weights after 100 swap /
restore cycles."""

import pytest
import torch

from morphlib.engine import LLM, EngineConfig, SamplingParams

LENGTHS = [5, 12, 23, 37, 50, 66, 81, 96]  # mixed prompt lengths (<= 96: see the INT4 test)
NEW = 64


@pytest.fixture(scope="module")
def prompts(heldout):
    return [heldout.ids[i, :n].tolist() for i, n in enumerate(LENGTHS)]


def hf_greedy(model, prompts, new=NEW):
    """HF generate, greedy, left-padded batch, no EOS stop: [len(prompts)] lists of ``new`` tokens."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def hf_ref(model32, prompts):
    return hf_greedy(model32[0], prompts)


def engine_tokens(llm, prompts, new=NEW):
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    return [o.token_ids for o in outs], outs


def assert_same(got, want):
    pos = sum(len(w) for w in want)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert [len(g) for g in got] == [len(w) for w in want]
    assert same == pos, f"{same}/{pos} positions agree; first differing prompt: " \
                        f"{next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)}"


def test_greedy_tokens_equal_hf(model32, prompts, hf_ref):
    llm = LLM(model32[0], EngineConfig(max_num_batched_tokens=256), tokenizer=model32[1])
    got, outs = engine_tokens(llm, prompts)
    assert_same(got, hf_ref)
    assert len(prompts) * NEW >= 512
    for o in outs:  # per-request timestamps, in order
        assert o.arrival <= o.first_scheduled <= o.first_token <= o.finished
        assert o.token_times == sorted(o.token_times) and len(o.token_times) == NEW
    assert {r.path for r in llm.steps} == {"eager"}  # CPU: no CUDA graphs
    assert llm.bm.num_used == 0 and llm.bm.num_free == llm.kv_capacity


def test_greedy_tokens_equal_hf_under_preemption(model32, prompts, hf_ref):
    # 24 blocks x 16 tokens: the 8 requests need ~61 blocks at their longest, so the newest are preempted
    # (their blocks freed) again and again and recompute prompt + output so far; prefill is chunked (48 tokens).
    llm = LLM(model32[0], EngineConfig(kv_blocks=24, max_model_len=192, max_num_batched_tokens=48, max_num_seqs=8))
    got, outs = engine_tokens(llm, prompts)
    assert llm.scheduler.num_preemptions >= 10, llm.scheduler.num_preemptions
    assert sum(o.preemptions for o in outs) == llm.scheduler.num_preemptions
    assert_same(got, hf_ref)
    assert max(r.num_tokens for r in llm.steps) <= 48
    assert llm.bm.num_used == 0


@pytest.fixture
def int4_kernel_everywhere(monkeypatch):
    """Run the fused INT4 kernel at every row count (its rows are then bitwise independent of the batch),
    so that HF (left-padded batch) and the engine (other batch shapes) compute the same INT4 numbers."""
    from morphlib.quant import int4

    if hasattr(int4, "KERNEL_MAX_TOKENS"):
        monkeypatch.setitem(int4.KERNEL_MAX_TOKENS, "cpu", 1 << 30)


def test_swapped_layers_equal_morpher_in_hf(model32, heldout, int4_kernel_everywhere):
    """INT4 layers cast activations to bf16, which turns float32 rounding differences between batch shapes
    into visible ones; so both sides run the same batches: two groups of 4 prompts of equal length (23 and
    81 tokens), HF one left-pad-free batch per group, the engine with max_num_seqs=4 (FCFS: the same groups)."""
    from morphlib.morph import Morpher, QuantConfig

    model, _ = model32
    prompts = [heldout.ids[i, :n].tolist() for i, n in enumerate([23] * 4 + [81] * 4)]
    layers = [9, 10, 11, 12]
    # AWQ-style input scales on the swapped layers (random, positive): the engine must carry them too
    gen = torch.Generator().manual_seed(0)
    names = [("self_attn.q_proj", 576), ("self_attn.k_proj", 576), ("self_attn.v_proj", 576),
             ("self_attn.o_proj", 576), ("mlp.gate_proj", 576), ("mlp.up_proj", 576), ("mlp.down_proj", 1536)]
    scales = {li: {n: torch.rand(k, generator=gen) + 0.5 for n, k in names} for li in layers}
    morpher = Morpher(model, QuantConfig(group_size=64), scales=scales, progress=False)
    llm = LLM(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, swappable=tuple(layers)), int4=morpher)
    morpher.swap(layers)
    try:
        want = hf_greedy(model, prompts[:4]) + hf_greedy(model, prompts[4:])
    finally:
        morpher.restore()
    llm.swap(layers, wait=True)
    assert llm.int4_layers == layers
    got, _ = engine_tokens(llm, prompts)
    assert_same(got, want)
    assert {r.num_seqs for r in llm.steps if r.path != "idle"} == {4}
    # the INT4 bytes are the Morpher's, placed at the head of each layer's own region
    head = llm.arena.bytes(llm.layout.region(10), llm.layout.head_bytes).clone()
    assert torch.equal(head, llm.copies.int4_host[10])
    assert llm.layout.awq


def test_hundred_swap_restore_cycles_are_exact(model32):
    # main pool 12 blocks; two 116-token requests need 16: with 3 layers swapped the rest lands in their tails
    llm = LLM(model32[0], EngineConfig(kv_blocks=12, max_model_len=192, max_num_batched_tokens=256,
                                       swappable=(3, 4, 17)))
    digest0, cap0 = llm.weight_digest(), llm.kv_capacity
    tails = llm.layout.tail_blocks
    assert tails > 0
    for cycle in range(100):
        llm.swap([3, 4, 17], wait=True)
        assert llm.kv_capacity == cap0 + 3 * tails
        if cycle % 25 == 0:  # live KV in the tails, then restore while it is live (policy "wait")
            seqs = [llm.add_request(list(range(100 + i, 200 + i)), SamplingParams(max_tokens=16, ignore_eos=True))
                    for i in range(2)]
            llm.step()
            holders = [s for s in seqs if any(b >= llm.layout.main_blocks for b in s.block_table)]
            assert holders
            llm.restore()
            llm.step()
            assert "to-fp16" in llm.morph_state.values()  # waits: its tail blocks are live
            llm.wait_morph()  # steps the engine until the holders have finished or were preempted
            assert all(s.finished is not None or s.preemptions for s in holders)
            while any(s.finished is None for s in seqs):
                llm.step()
            assert all(len(s.output) == 16 for s in seqs)
        else:
            llm.restore(wait=True)
        assert llm.kv_capacity == cap0 and llm.int4_layers == []
    assert llm.weight_digest() == digest0
    assert llm.bm.num_used == 0
    llm.bm.check()
