"""The workspace probe (``workspace.measure_cuda``, the steps every CUDA engine runs at construction) reads no
memory it did not write: run on CPU (the torch path; allocator statistics read 0) with every uninitialised
tensor and the arena poisoned with NaN, all its steps' ops stay finite and it samples from finite logits.
A control shows the check has teeth: one KV row read past a sequence's context (in a block that sequence
owns, never written) makes attention the first non-finite op and sampling a one-line error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from morphlib.engine import nancheck, workspace
from morphlib.engine.config import EngineConfig
from morphlib.engine.memory import Layout
from morphlib.engine.model import Model
from morphlib.engine.runner import Runner
from morphlib.engine.spec import ModelSpec
from morphlib.errors import MorphError

HF = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
          num_key_value_heads=1, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
# the probe's shapes, scaled down: the token budget as one long sequence and as max_num_seqs short ones
CFG = EngineConfig(device="cpu", max_num_seqs=4, max_num_batched_tokens=64, graph_buckets=(1, 2, 4), max_model_len=32)


@pytest.fixture(params=[CFG, dataclasses.replace(CFG, max_num_seqs=1, graph_buckets=(1,))], ids=["4 seqs", "1 seq"])
def cpu_probe(monkeypatch, request):
    """measure_cuda on CPU: CUDA's allocator statistics read 0, the model runs the torch path. With one sequence
    (chapter 3's second engine) the 64-token budget once made one 64-token prompt, past the 32 rope positions."""
    cfg = request.param
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    monkeypatch.setattr(workspace, "Model", lambda *a, use_triton: Model(*a, use_triton=False))
    layout = Layout(ModelSpec.from_hf_config(HF), torch.float32, torch.device("cpu"), cfg.block_size, cfg.group_size,
                    False, cfg.staging_slots, cfg.max_model_len)
    return lambda: workspace.measure_cuda(layout, HF, cfg, cfg.max_model_len)


@pytest.mark.parametrize("t_max", [1, 7, 64, 2048, 5000])
@pytest.mark.parametrize("max_num_seqs", [1, 3, 32, 256])
@pytest.mark.parametrize("max_model_len", [2, 17, 256, 4096])
def test_probe_lengths_form_a_step_the_scheduler_could(t_max, max_num_seqs, max_model_len):
    long_lens, many_lens = workspace.probe_lengths(t_max, max_num_seqs, max_model_len)
    largest = min(t_max, max_num_seqs * (max_model_len - 1))
    for lens in (long_lens, many_lens):
        assert sum(lens) == largest and 1 <= len(lens) <= max_num_seqs
        assert all(1 <= n <= max_model_len - 1 for n in lens)
    assert len(many_lens) == min(max_num_seqs, largest) and max(many_lens) - min(many_lens) <= 1


def test_a_position_past_the_rope_table_is_a_one_line_error():
    """Chapter 3's NaN on the H200: a 2048-token probe prompt in a 256-position engine read rope rows past the
    table (memory another engine had left). The runner now refuses such a step before any kernel runs."""
    from morphlib.engine.sequence import SamplingParams, Sequence

    layout = Layout(ModelSpec.from_hf_config(HF), torch.float32, torch.device("cpu"), CFG.block_size, CFG.group_size,
                    False, CFG.staging_slots, CFG.max_model_len)
    layout.set_main_blocks(8)
    from morphlib.engine.memory import Arena

    model = Model(layout, Arena(layout.arena_bytes(), layout.device), layout.block_base(), use_triton=False)
    runner = Runner(model, layout.block_base().tolist(), 1, 8, (1,), False)
    seq = Sequence(0, [1] * 40, SamplingParams(max_tokens=1, temperature=0.0), 0.0)
    seq.block_table = list(range(3))
    with pytest.raises(MorphError, match="position 39, past the engine's 32 positions"):
        runner.run([(seq, 40)])


def test_probe_reads_only_memory_it_wrote(cpu_probe):
    with nancheck.poisoned(), nancheck.watch() as w:
        cpu_probe()
    # bf16 and INT4, each: one long sequence's prefill (greedy) and max_num_seqs prefills sampled at temperature 1
    assert w.steps == 4 and w.ops > 4 * 10
    assert w.first is None


def test_poisoned_read_is_caught(cpu_probe, monkeypatch):
    prepare = Runner.prepare

    def past_context(runner, batch):
        out = prepare(runner, batch)
        meta = out[2]
        meta.ctx_len[0] += 1  # the long sequence (31 tokens, 2 blocks) reads row 31 of its second block
        meta.host["ctx"][0] += 1
        return out

    monkeypatch.setattr(Runner, "prepare", past_context)
    with nancheck.poisoned(), nancheck.watch() as w, pytest.raises(MorphError, match="non-finite logits") as err:
        cpu_probe()
    assert w.first.startswith("attention_ref at step 1") and "attention_ref" in str(err.value)
    assert "\n" not in str(err.value)
