"""How much device memory the engine needs besides its arena (activations, INT4 dequantize buffers,
CUDA-graph pool, static step buffers): measured on CUDA, estimated on CPU.

CUDA: a *probe* engine with one decoder layer (the activations of a step do not depend on the depth:
each layer's temporaries are freed before the next, in eager mode and inside a graph's pool alike)
and random weights runs, in both precisions, the steps whose temporaries are largest: an eager prefill
of ``max_num_batched_tokens`` tokens as one sequence (attention and MLP activations), the same tokens
as ``max_num_seqs`` sequences that all finish their prompt and sample with a temperature (a logits row
per sequence, their float copy and softmax), and the capture of every decode bucket's graph (the
graphs share one pool, but a small bucket may split attention further); the peak of
``torch.cuda.max_memory_reserved`` (>= allocated) above its own arena is the workspace. The real arena is then sized as budget minus
that workspace (times 1 + margin), so ``torch.cuda.memory_allocated`` stays inside the budget.
"""

from __future__ import annotations

import gc

import torch

from morphlib.engine.block_manager import BlockManager
from morphlib.engine.config import EngineConfig, SamplingParams
from morphlib.engine.loader import fill_random, quantize_layer
from morphlib.engine.memory import Arena, Layout
from morphlib.engine.model import Model, int4_head_blob
from morphlib.engine.runner import Runner
from morphlib.engine.sequence import Sequence


def estimate_cpu(layout: Layout, cfg: EngineConfig) -> int:
    """A generous analytic bound (CPU has no allocator statistics to measure)."""
    s = layout.spec
    t = cfg.max_num_batched_tokens
    act = t * (6 * s.hidden + 2 * (s.q_dim + 2 * s.kv_dim) + 4 * s.intermediate) * 4
    logits = cfg.max_num_seqs * s.vocab * 4 * 2
    dequant = max(n * k for n, k in layout.int4_shapes.values()) * 12  # one INT4 matrix at a time
    return act + logits + dequant + (64 << 20)


@torch.no_grad()
def probe_lengths(t_max: int, max_num_seqs: int, max_model_len: int) -> tuple[list[int], list[int]]:
    """The prompt lengths of the probe's two steps: the largest step the scheduler can form, as few long
    sequences (largest activations) and as ``max_num_seqs`` short ones, all sampled (largest logits). No
    sequence is longer than ``max_model_len - 1`` tokens (a position past the rope table reads memory no
    one wrote: NaN on a reused GPU) and no step holds more than ``max_num_seqs`` sequences."""
    cap = max(1, max_model_len - 1)
    t = min(t_max, max_num_seqs * cap)
    long_lens, left = [], t
    while left > 0:
        long_lens.append(min(left, cap))
        left -= long_lens[-1]
    n_many = min(max_num_seqs, t)
    return long_lens, [t // n_many + (i < t % n_many) for i in range(n_many)]


def measure_cuda(layout: Layout, hf_config, cfg: EngineConfig, max_model_len: int) -> dict:
    dev = layout.device
    spec = layout.spec.with_layers(1)
    lay = Layout(spec, layout.dtype, dev, layout.block_size, layout.group_size, layout.awq, 1, max_model_len)
    t_max = cfg.max_num_batched_tokens
    buckets = cfg.buckets()
    mb = max(buckets)
    max_blocks = -(-max_model_len // layout.block_size)
    long_lens, many_lens = probe_lengths(t_max, cfg.max_num_seqs, max_model_len)
    blocks = lambda lens: sum(-(-n // layout.block_size) for n in lens)  # noqa: E731
    lay.set_main_blocks(max(blocks(long_lens), blocks(many_lens)) + 2)
    torch.cuda.synchronize(dev)
    gc.collect()
    torch.cuda.empty_cache()
    a0, r0 = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    arena = Arena(lay.arena_bytes(), dev)
    arena_reserved = torch.cuda.memory_reserved(dev) - r0
    fill_random(arena, lay, hf_config, seed=1)
    base = lay.block_base()
    model = Model(lay, arena, base.to(dev), use_triton=True)
    runner = Runner(model, base.tolist(), mb, max_blocks, buckets, cfg.cuda_graphs, seed=0)
    bm = BlockManager(lay.block_size, lay.num_block_ids)
    bm.add_group("main", lay.main_ids())
    head = int4_head_blob(lay, quantize_layer(arena, lay, 0, cfg.symmetric)).to(dev)
    for int4 in (False, True):
        if int4:
            arena.bytes(lay.region(0), lay.head_bytes).copy_(head)
            model.int4_layers = frozenset({0})
        for lens, temperature in ((long_lens, 0.0), (many_lens, 1.0)):
            seqs = [Sequence(i, [1] * n, SamplingParams(max_tokens=1, temperature=temperature), 0.0)
                    for i, n in enumerate(lens)]
            for s in seqs:
                bm.grow(s.id, s.block_table, s.num_tokens)
            runner.run([(s, s.num_tokens) for s in seqs])
            for s in seqs:
                bm.release(s.id, s.block_table)
        if runner.use_graphs:
            for b in buckets:
                runner.capture(model.state, b)
    torch.cuda.synchronize(dev)
    peak_alloc = torch.cuda.max_memory_allocated(dev) - a0 - arena.nbytes
    peak_res = torch.cuda.max_memory_reserved(dev) - r0 - arena_reserved
    del runner, model, arena, bm, head
    gc.collect()
    torch.cuda.empty_cache()
    return {"allocated": int(peak_alloc), "reserved": int(peak_res), "bytes": int(max(peak_alloc, peak_res))}
