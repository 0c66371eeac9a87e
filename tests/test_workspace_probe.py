"""The workspace probe (``workspace.measure_cuda``, the steps every CUDA engine runs at construction) reads no
memory it did not write: run on CPU (the torch path; allocator statistics read 0) with every uninitialised
tensor and the arena poisoned with NaN, all its steps' ops stay finite and it samples from finite logits.
A control shows the check has teeth: one KV row read past a sequence's context (in a block that sequence
owns, never written) makes attention the first non-finite op and sampling a one-line error."""

from __future__ import annotations

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


@pytest.fixture
def cpu_probe(monkeypatch):
    """measure_cuda on CPU: CUDA's allocator statistics read 0, the model runs the torch path."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    monkeypatch.setattr(workspace, "Model", lambda *a, use_triton: Model(*a, use_triton=False))
    layout = Layout(ModelSpec.from_hf_config(HF), torch.float32, torch.device("cpu"), CFG.block_size, CFG.group_size,
                    False, CFG.staging_slots, CFG.max_model_len)
    return lambda: workspace.measure_cuda(layout, HF, CFG, CFG.max_model_len)


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
