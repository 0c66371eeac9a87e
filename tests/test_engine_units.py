"""Serving engine pieces on a tiny random Llama (CPU, seconds): block manager property test, arena layout,
restore policies with live KV blocks, trace replay, controller callback, one-line errors."""

import random

import numpy as np
import pytest
import torch

from morphlib.engine import LLM, EngineConfig, SamplingParams
from morphlib.engine.block_manager import BlockManager
from morphlib.errors import MorphError


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def small(tiny, **kw):
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_batched_tokens", 64)
    kw.setdefault("max_num_seqs", 8)
    return LLM(tiny, EngineConfig(**kw))


# ----------------------------------------------------------------------------- block manager
def test_block_manager_random_operations():
    """>= 10,000 random allocate / grow / shrink / free / add-group / drain / remove-group operations:
    no leak, no block owned twice, shrinking refused while a group's blocks are live, all free after drain."""
    rng = random.Random(0)
    bs = 4
    groups = {"main": range(0, 40)} | {layer: range(40 + 10 * layer, 50 + 10 * layer) for layer in range(6)}
    bm = BlockManager(bs, 100)
    bm.add_group("main", groups["main"])
    enabled = {"main"}
    tables: dict[int, list[int]] = {}
    tokens: dict[int, int] = {}
    refused = next_id = 0
    for _ in range(12000):
        op = rng.random()
        if op < 0.30:  # new sequence
            n = rng.randint(1, 3 * bs)
            t: list[int] = []
            if bm.can_allocate(bm.blocks_needed(t, n)):
                bm.grow(next_id, t, n)
                tables[next_id], tokens[next_id] = t, n
                next_id += 1
        elif op < 0.55 and tables:  # grow
            sid = rng.choice(list(tables))
            n = tokens[sid] + rng.randint(1, 2 * bs)
            if bm.can_allocate(bm.blocks_needed(tables[sid], n)):
                bm.grow(sid, tables[sid], n)
                tokens[sid] = n
            else:
                with pytest.raises(MorphError):
                    bm.grow(sid, tables[sid], n + 1000 * bs)
        elif op < 0.65 and tables:  # shrink a sequence
            sid = rng.choice(list(tables))
            tokens[sid] = rng.randint(0, tokens[sid])
            bm.shrink(sid, tables[sid], tokens[sid])
        elif op < 0.85 and tables:  # free
            sid = rng.choice(list(tables))
            bm.release(sid, tables.pop(sid))
            tokens.pop(sid)
        elif op < 0.93:  # capacity grows (a layer swapped to INT4)
            off = [k for k in groups if k not in enabled]
            if off:
                k = rng.choice(off)
                bm.add_group(k, groups[k])
                enabled.add(k)
        else:  # capacity shrinks (a restore): refused while live
            on = [k for k in enabled if k != "main"]
            if on:
                k = rng.choice(on)
                live = bm.drain(k)
                if live:
                    refused += 1
                    with pytest.raises(MorphError):
                        bm.remove_group(k)
                    holders = bm.holders(k)
                    assert holders <= set(tables)
                    bm.undrain(k) if rng.random() < 0.5 else None
                    if k in bm.draining:  # free the holders, then the shrink succeeds
                        for sid in holders:
                            bm.release(sid, tables.pop(sid))
                            tokens.pop(sid)
                        bm.remove_group(k)
                        enabled.discard(k)
                else:
                    bm.remove_group(k)
                    enabled.discard(k)
        bm.check(tables)
        assert bm.num_used == sum(len(t) for t in tables.values())
        assert not any(i in bm.free.get(bm.group_of[i], ()) for t in tables.values() for i in t)
    assert refused > 50
    for sid in list(tables):
        bm.release(sid, tables.pop(sid))
    bm.check({})
    assert bm.num_used == 0 and bm.num_free == bm.capacity == sum(len(groups[k]) for k in enabled)


# ----------------------------------------------------------------------------- arena layout
def test_arena_layout_is_disjoint_and_in_budget(tiny):
    llm = small(tiny, memory_budget=256 << 20, swappable=(1, 2))
    lay = llm.layout
    assert lay.head_bytes <= lay.tail_offset < lay.region_bytes and lay.tail_blocks > 0
    spans = [(lay.block_offset(i), lay.block_offset(i) + lay.block_bytes) for i in range(lay.num_block_ids)]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "KV blocks overlap"
    for layer in range(lay.spec.num_layers):  # tail blocks lie in their own region, after the INT4 head
        r = lay.region(layer)
        for i in lay.tail_ids(layer):
            assert r + lay.head_bytes <= lay.block_offset(i) and lay.block_offset(i) + lay.block_bytes <= r + lay.region_bytes
    assert all(lay.pool0 <= lay.block_offset(i) for i in lay.main_ids())
    assert llm.arena.nbytes + llm.workspace_bytes <= llm.budget
    cap = llm.kv_capacity
    llm.swap([1, 2], wait=True)
    assert llm.kv_capacity == cap + 2 * lay.tail_blocks
    assert llm.morph_state[1] == "int4" and llm.morph_state[0] == "fp16"


# ----------------------------------------------------------------------------- restore with live blocks
def _fill_tails(llm, n=6, prompt=60):
    seqs = [llm.add_request(list(range(7 + i, 7 + i + prompt)), SamplingParams(max_tokens=40, ignore_eos=True))
            for i in range(n)]
    while not all(s.output for s in seqs):
        llm.step()
    return seqs


@pytest.mark.parametrize("policy", ["wait", "preempt"])
def test_restore_with_live_tail_blocks(tiny, policy):
    """The main pool is full, so nothing can migrate: the restore waits or preempts."""
    llm = small(tiny, kv_blocks=16, restore_policy=policy)
    llm.swap([2], wait=True)
    tail = set(llm.layout.tail_ids(2))
    seqs = _fill_tails(llm)
    holders = [s for s in seqs if tail & set(s.block_table)]
    assert holders, "the main pool should be full and the tail in use"
    cap = llm.kv_capacity
    llm.restore([2])
    llm.step()
    tables = {s.id: s.block_table for s in llm.scheduler.running}
    llm.bm.check(tables)
    if policy == "wait":
        assert llm.morph_state[2] == "to-fp16"  # still INT4: its tail holds live KV
        assert 2 in llm.bm.draining and llm.kv_capacity == cap - len(tail)
        while llm.morph_state[2] != "fp16":
            llm.step()
            llm.bm.check({s.id: s.block_table for s in llm.scheduler.running})
    else:  # holders were preempted at the boundary, the copies ride along with that step
        assert llm.morph_state[2] == "to-fp16" and 2 not in llm.bm.groups
        llm.step()
        assert llm.morph_state[2] == "fp16"
        assert all(s.preemptions >= 1 for s in holders)
        assert llm.morph.history[-1].preempted == len(holders)
    while any(s.finished is None for s in seqs):
        llm.step()
        llm.bm.check({s.id: s.block_table for s in llm.scheduler.running})
    assert all(len(s.output) == 40 for s in seqs)
    assert llm.bm.num_used == 0 and llm.kv_capacity == 16


# ----------------------------------------------------------------------------- replay, controller, hooks
def test_replay_trace_timestamps_and_progress(tiny, capsys):
    from morphlib.workloads.traces import Trace

    n = 12
    trace = Trace("tiny", "azure", np.linspace(0, 0.3, n), np.array([5, 30, 80, 12] * 3),
                  np.array([4, 9, 2, 300] * 3), "t0")
    llm = small(tiny)
    res = llm.replay(trace, progress=True)
    assert len(res.outputs) == n and res.clipped == 3  # 80 + ... fits; 12 + 300 > 256 is clipped
    for o, g in zip(res.outputs, trace.generated_tokens):
        assert o.arrival <= o.first_scheduled <= o.first_token <= o.finished
        assert len(o.token_ids) == min(int(g), 128) and len(o.token_times) == len(o.token_ids)
    assert res.outputs[1].arrival - res.outputs[0].arrival == pytest.approx(0.3 / (n - 1), abs=1e-9)
    s = res.summary()
    assert s["requests"] == n and s["ttft_p95_s"] >= s["ttft_p50_s"] >= 0 and 0 <= s["ttft_attainment"] <= 1
    assert res.steps and all(r.end >= r.start for r in res.steps)
    assert "replay" in capsys.readouterr().err
    with pytest.raises(MorphError, match="context"):
        llm.replay(trace, truncate=False, progress=False)


def test_controller_and_step_hooks(tiny):
    llm = small(tiny)
    seen, records = [], []

    def controller(engine, info):
        seen.append(info)
        if info.step == 2:
            engine.swap([1, 3])
        if info.step == 8:
            engine.restore()

    llm.controller = controller
    llm.on_step.append(records.append)
    out = llm.generate([list(range(3, 40)), list(range(50, 60))], SamplingParams(max_tokens=14, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [14, 14]
    assert [i.step for i in seen] == list(range(len(seen))) and len(records) == len(seen)
    assert any(r.state == (1, 3) for r in records) and records[-1].state == ()
    assert sum(len(r.committed) for r in records) == 4
    assert all(0 <= i.kv_usage <= 1 for i in seen)


def test_on_logits_hook_feeds_forced_tokens_and_sees_each_positions_logits(tiny):
    """The runner's ``on_logits`` hook: every sampled row's logits, in the order of the sequences given,
    and the tokens it returns are what the sequences get (a forced continuation, fed one step at a time
    through the engine's decode path); the logits seen are HF's teacher-forced logits at those positions."""
    llm = small(tiny, max_num_batched_tokens=16)  # chunked prefill, then mixed and decode-only steps
    gen = torch.Generator().manual_seed(3)
    prompts = [list(range(5, 30)), list(range(40, 47))]
    forced = torch.randint(0, 512, (2, 9), generator=gen).tolist()
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def hook(seqs, logits, tokens):
        assert logits.shape == (len(seqs), 512) and len(tokens) == len(seqs)
        for seq, row in zip(seqs, logits):
            seen[(seq.id, len(seq.output))] = row.clone()
        return [forced[seq.id][len(seq.output)] for seq in seqs]

    llm.runner.on_logits = hook
    out = llm.generate(prompts, SamplingParams(max_tokens=9, ignore_eos=True))
    assert [o.token_ids for o in out] == forced and len(seen) == 18
    with torch.no_grad():
        for i, (p, f) in enumerate(zip(prompts, forced)):
            ref = tiny(torch.tensor([p + f])).logits[0, len(p) - 1:-1]
            got = torch.stack([seen[(i, j)] for j in range(9)])
            assert torch.allclose(got, ref, atol=1e-4), (i, (got - ref).abs().max())
    llm.runner.on_logits = lambda seqs, logits, tokens: tokens[:-1]
    with pytest.raises(MorphError, match="on_logits returned 1 tokens for 2 sampled sequences"):
        llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=2, ignore_eos=True))


def test_chunked_prefill_and_temperature(tiny):
    llm = small(tiny, max_num_batched_tokens=16)
    out = llm.generate([list(range(1, 101))], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    prefill_steps = [r for r in llm.steps if r.num_tokens > 1 or r.num_sampled == 0]
    assert len(prefill_steps) >= 100 // 16 and max(r.num_tokens for r in llm.steps) <= 16
    assert len(out.token_ids) == 3
    hot = llm.generate([list(range(1, 20))] * 4, SamplingParams(max_tokens=8, temperature=1.5, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in hot}) > 1


# ----------------------------------------------------------------------------- one-line errors
def test_one_line_errors(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MorphError, match=r"too small .* needs at least \d+\.\d+ MiB \(weights") as e:
        small(tiny, memory_budget=1 << 20)
    assert "\n" not in str(e.value)
    with pytest.raises(MorphError, match="model type 'gpt2'"):
        LLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    for bad in (dict(block_size=7), dict(max_num_seqs=0), dict(dtype="int8"), dict(restore_policy="drop"),
                dict(max_num_batched_tokens=4, max_num_seqs=8), dict(memory_budget=-1), dict(graph_buckets=(4, 2)),
                dict(attention="flash")):
        with pytest.raises(MorphError, match="EngineConfig"):
            EngineConfig(**bad)
    with pytest.raises(MorphError, match="SamplingParams"):
        SamplingParams(max_tokens=0)
    llm = small(tiny, swappable=(1,), restorable=())
    with pytest.raises(MorphError, match="too long"):
        llm.generate([list(range(250))], SamplingParams(max_tokens=10))
    with pytest.raises(MorphError, match="tokenizer"):
        llm.generate(["text needs a tokenizer"])
    with pytest.raises(MorphError, match="out of range"):
        llm.swap([4])
    with pytest.raises(MorphError, match="not swappable"):
        llm.swap([0])
    llm.swap([1], wait=True)
    with pytest.raises(MorphError, match="not restorable"):
        llm.restore([1])
    with pytest.raises(MorphError, match="token ids"):
        llm.generate([[1, 2, 99999]])
    with pytest.raises(MorphError, match="unknown model shape"):
        LLM("shape:gpt-5")


def test_bench_engine_cli_says_it_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from morphlib.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench-engine"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: bench-engine needs a CUDA GPU (--device cpu runs its correctness measure only, small)"
