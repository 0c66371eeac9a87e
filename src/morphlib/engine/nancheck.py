"""Where a NaN or inf first appears in the engine's forward pass: a diagnostic (tests and
``scripts/probe_nan_check.py`` use it; nothing in a serving run imports it).

* ``poisoned()``: memory the engine leaves uninitialised starts as NaN instead of whatever the allocator
  held: ``torch.empty`` / ``torch.empty_like`` float tensors are NaN-filled and every ``Arena`` is filled
  with 0xFF bytes (NaN as bf16, fp16 and fp32). A read of memory nobody wrote then shows as NaN.
* ``watch()``: every op ``Model.forward`` calls (embedding, linears, INT4 matmuls, norms, rope + KV store,
  attention, silu) is checked after it runs (CUDA synchronised first; ops inside a CUDA-graph capture are
  not); the first op whose tensor inputs are finite and whose output is not is kept in ``Watch.first``
  with the runner step it ran in, and sampling from a non-finite logits row raises a one-line
  ``MorphError`` naming it (instead of torch.multinomial's device assert, which also ends the process's
  CUDA context).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from morphlib.engine import attention, memory, model, ops
from morphlib.engine.runner import Runner
from morphlib.errors import MorphError

# (module, function names, the positional argument not checked: the KV cache, whose unwritten rows are
# legitimately anything)
WATCHED = ((attention, ("attention_varlen", "attention_decode", "attention_ref"), 1),
           (ops, ("rope_store_triton", "rope_store_ref"), 6),
           (ops, ("add_rmsnorm_triton", "add_rmsnorm_ref", "silu_mul_triton", "silu_mul_ref"), None),
           (model, ("int4_matmul",), None), (F, ("linear", "embedding"), None))


@contextlib.contextmanager
def _patched(pairs):
    """pairs: (object, attribute, replacement); every attribute is restored on exit."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in pairs]
    try:
        for obj, name, new in pairs:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in reversed(saved):
            setattr(obj, name, old)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.uint8:
        t.fill_(0xFF)
    return t


@contextlib.contextmanager
def poisoned():
    empty, empty_like, arena_init = torch.empty, torch.empty_like, memory.Arena.__init__

    def init(self, nbytes, device):
        arena_init(self, nbytes, device)
        self.buf.fill_(0xFF)

    with _patched([(torch, "empty", lambda *a, **k: _poison(empty(*a, **k))),
                   (torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k))),
                   (memory.Arena, "__init__", init)]):
        yield


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


def _finite(values) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(values))


class Watch:
    def __init__(self):
        self.steps = 0  # runner steps seen
        self.step = ""  # the step running now, in words
        self.first: str | None = None  # the first op that made a non-finite output from finite inputs
        self.ops = 0  # op calls checked

    def _op(self, name, fn, cache_arg):
        def run(*args, **kwargs):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return fn(*args, **kwargs)  # a CUDA-graph capture: nothing can be read back
            inputs = [a for i, a in enumerate(args) if i != cache_arg] + list(kwargs.values())
            clean = self.first is None and _finite(inputs)
            out = fn(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ops += 1
            if clean and not _finite([out]):
                t = next(t for t in _tensors([out]) if not bool(torch.isfinite(t).all()))
                rows = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(-1).nonzero().flatten().tolist()
                self.first = (f"{name} at step {self.step}: {len(rows)} of {t.shape[0]} output rows non-finite "
                              f"(first {rows[:8]})")
            return out
        return run

    def _run(self, fn):
        def run(runner, batch, *args, **kwargs):
            self.steps += 1
            temps = sorted({s.params.temperature for s, _ in batch})
            self.step = (f"{self.steps} ({len(batch)} sequences, {sum(n for _, n in batch)} tokens, temperature "
                         f"{temps}, INT4 layers {sorted(runner.model.int4_layers)})")
            return fn(runner, batch, *args, **kwargs)
        return run

    def _guard(self, fn):
        def sample(runner, logits, *args):
            bad = ~torch.isfinite(logits).all(dim=-1)
            if bool(bad.any()):
                raise MorphError(f"non-finite logits in {int(bad.sum())} of {logits.shape[0]} sampled rows at step "
                                 f"{self.step}; first op with non-finite output: {self.first or 'none seen'}")
            return fn(runner, logits, *args)
        return sample


@contextlib.contextmanager
def watch(ops: bool = True):
    """``ops=False``: only the step names and the sampling check (no op is wrapped, nothing extra synchronised)."""
    w = Watch()
    pairs = [(mod, name, w._op(name, getattr(mod, name), cache)) for mod, names, cache in WATCHED for name in names
             if ops]
    pairs += [(Runner, "run", w._run(Runner.run)), (Runner, "_sample", w._guard(Runner._sample)),
              (Runner, "_sample_temp", w._guard(Runner._sample_temp))]
    with _patched(pairs):
        yield w
