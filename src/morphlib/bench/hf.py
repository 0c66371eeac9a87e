"""The Hugging Face baselines of the engine benchmark: decode timing (eager ``generate``; static cache +
``torch.compile``) and logits on shared forced continuations (the fp32 teacher-forced reference, and
HF's incremental decode with its KV cache fed the forced tokens).

* ``eager_ms``: ``generate`` per new token, (T(1 + n) - T(1)) / n, prefill excluded.
* ``compiled_ms``: the same with a static cache, which ``generate`` compiles itself
  (``CompileConfig(fullgraph=True, mode="reduce-overhead")``: CUDA graphs); the first calls compile (40-70 s).
* ``reference``: the continuation = fp32 HF's own greedy tokens (``eval.metrics.greedy_tokens``), fixed
  once; then one teacher-forced fp32 pass over prompt + continuation gives the reference logits. fp32
  matmuls run without TF32 while it is made.
* ``incremental_scores``: HF's decode with its KV cache, one forced token per step, scored against the
  reference (``agreement.Scores``): how far HF's own incremental decode in its dtype agrees with fp32.
"""

from __future__ import annotations

import contextlib
import time

import torch

from morphlib.bench.agreement import Reference, Scores
from morphlib.errors import MorphError, check_int
from morphlib.eval.metrics import greedy_tokens


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _timed_generate(model, ids: torch.Tensor, new: int, **config) -> float:
    """Seconds of one greedy ``generate`` of exactly ``new`` tokens (end-of-sequence ignored)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                           **config)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _random_ids(model, batch: int, ctx: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(_device(model))


def eager_ms(model, batch: int, ctx: int, new: int = 16, seed: int = 0) -> float:
    """HF eager ``generate``: ms per new token of ``batch`` random prompts of ``ctx`` tokens (CUDA)."""
    ids = _random_ids(model, batch, ctx, seed)
    _timed_generate(model, ids, 2)
    t1 = min(_timed_generate(model, ids, 1) for _ in range(2))
    tn = min(_timed_generate(model, ids, 1 + new) for _ in range(2))
    return 1e3 * (tn - t1) / new


def compiled_ms(model, ctx: int, new: int = 32, seed: int = 0) -> float:
    """HF static cache + ``torch.compile`` (reduce-overhead), batch 1: ms per new token (CUDA)."""
    from transformers.generation.configuration_utils import CompileConfig

    ids = _random_ids(model, 1, ctx, seed)
    static = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
    _timed_generate(model, ids, 1 + new, **static)
    _timed_generate(model, ids, 1 + new, **static)
    t1 = min(_timed_generate(model, ids, 1, **static) for _ in range(2))
    tn = min(_timed_generate(model, ids, 1 + new, **static) for _ in range(3))
    return 1e3 * (tn - t1) / new


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (no TF32) inside the block; the settings come back after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def reference(model32, prompts: torch.Tensor, new_tokens: int, greedy_batch: int = 64, forced_batch: int = 8) -> Reference:
    """The fp32 reference on equal-length ``prompts`` [n, P]: fp32 greedy continuations of ``new_tokens``
    (fixed once; ``greedy_batch`` prompts at a time), then teacher-forced fp32 logits at each continuation
    position (``forced_batch`` sequences per pass: their fp32 logits are the large part)."""
    new_tokens, forced_batch = check_int("new_tokens", new_tokens), check_int("forced_batch", forced_batch)
    if next(model32.parameters()).dtype != torch.float32:
        raise MorphError(f"the reference model must be float32, got {next(model32.parameters()).dtype}")
    dev = _device(model32)
    with exact_fp32():
        cont = greedy_tokens(model32, prompts, new_tokens, greedy_batch)
        ref = Reference(cont, model32.config.vocab_size, dev)
        p = prompts.shape[1]
        for start in range(0, len(prompts), forced_batch):
            ids = torch.cat([prompts[start:start + forced_batch], cont[start:start + forced_batch, :-1]], dim=1).to(dev)
            ref.fill(start, model32(ids, use_cache=False).logits[:, p - 1:].float())
    return ref


@torch.no_grad()
def incremental_scores(model, ref: Reference, prompts: torch.Tensor, batch_size: int = 64) -> Scores:
    """HF's incremental decode (KV cache) of ``model`` fed the reference's continuation one token a step,
    each position's logits scored against ``ref``."""
    scores = Scores(ref, f"HF incremental ({next(model.parameters()).dtype})")
    dev = _device(model)
    cont = ref.continuation
    n, t = cont.shape
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        out = model(prompts[rows].to(dev), use_cache=True)
        for j in range(t):
            scores.add(rows, torch.full_like(rows, j), out.logits[:, -1])
            if j + 1 < t:
                out = model(cont[rows, j:j + 1].to(dev), past_key_values=out.past_key_values, use_cache=True)
    return scores
