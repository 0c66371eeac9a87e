"""The engine's API: ``LLM(model, EngineConfig(...)).generate(prompts, SamplingParams(...))``, ``replay(trace)``,
``swap`` / ``restore`` / ``morph_state``, a controller callback at step boundaries and per-step records.

    from morphlib.engine import LLM, EngineConfig, SamplingParams
    llm = LLM("smollm2-135m", EngineConfig(card="L4"))
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    llm.swap([10, 11, 12])            # side stream; committed at a later step boundary
    llm.restore()                     # LIFO; migrates (or waits for / preempts) live KV blocks in the tails

``LLM`` = the engine core (``core.py``) + the torch executor (``Runner``: CUDA graphs / eager, CPU) + a
clock (wall by default; ``clock=VirtualClock(step_time_model)`` makes a CPU engine's decisions follow a
step-time table, as the ``Simulator``'s do).

``model``: a built-in name or HF folder (``morphlib.models.load_model``), an HF ``LlamaForCausalLM``
instance, or ``"shape:<name>"`` (``morphlib.shapes.SHAPES``) for random weights made in the arena.
``int4``: a ``morphlib.morph.Morpher`` whose INT4 twins (AWQ input scales included) the engine uses
byte for byte; default: the engine quantizes each layer itself (RTN, ``EngineConfig.group_size``).

Hooks for controllers and simulators: ``llm.controller = fn(llm, StepInfo)`` runs at every step boundary
(before scheduling; it may call ``swap``/``restore``); ``llm.on_step`` callables get each ``StepRecord``;
every ``RequestOutput`` carries arrival, first scheduled, first token, each token's time and finish
(engine clock) and its preemption and recomputation counts.
"""

from __future__ import annotations

import gc
import os
import time
import weakref

from torch import nn

import torch

from morphlib.cards import get_card
from morphlib.device import resolve_device
from morphlib.engine import loader, workspace
from morphlib.engine.base import NO_PHASES, Engine
from morphlib.engine.clock import WallClock
from morphlib.engine.config import EngineConfig
from morphlib.engine.copies import DeviceCopies
from morphlib.engine.core import EngineCore
from morphlib.engine.memory import Arena, Layout, _size, main_pool_blocks
from morphlib.engine.model import Model, int4_head_blob
from morphlib.engine.records import ReplayResult, StepInfo, StepRecord  # noqa: F401  (re-exported)
from morphlib.engine.runner import Runner
from morphlib.engine.spec import spec_of
from morphlib.errors import MorphError
from morphlib.shapes import SHAPES


def _resolve_model(model, dtype):
    """-> (hf_model or None, hf_config, tokenizer or None, name)."""
    if isinstance(model, nn.Module):
        return model, model.config, None, getattr(model, "morphlib_name", type(model).__name__)
    if not isinstance(model, str):
        raise MorphError(f"model must be a name, a folder, 'shape:<name>' or an HF model, got {type(model).__name__}")
    shape = model[6:] if model.startswith("shape:") else None
    if shape is not None:
        if shape not in SHAPES:
            raise MorphError(f"unknown model shape {shape!r}: choose one of {', '.join(SHAPES)}")
        cfg = dict(SHAPES[shape], model_type="llama")
        return None, cfg, None, model
    from morphlib.models import load_model

    hf, tok = load_model(model, dtype=dtype, device="cpu")
    return hf, hf.config, tok, model


def eos_ids(tokenizer, hf_config) -> set[int]:
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                hf_config.get("eos_token_id") if isinstance(hf_config, dict) else getattr(hf_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


def _restore_fraction(device, fraction: float) -> None:
    torch.cuda.set_per_process_memory_fraction(fraction, device)


class LLM(Engine):
    def __init__(self, model, config: EngineConfig | None = None, *, int4=None, tokenizer=None, clock=None):
        self._check_config(config)
        self._start_memory_accounting()
        hf, hf_config = self._read_model(model, tokenizer)
        self._plan_layout(int4)
        self._size_memory(hf_config)
        self._fill_arena(hf, hf_config)
        del hf
        copies = self._host_copies(int4)
        self._build_core(copies, hf_config)
        self.runner = Runner(self.model, self.base.tolist(), self.config.max_num_seqs,
                             -(-self.max_model_len // self.config.block_size), self.config.buckets(),
                             self.config.cuda_graphs, seed=self.config.seed)
        self._attach(self.core, clock or WallClock())
        if self.runner.use_graphs:
            self.runner.precapture([self.model.state])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ construction, step by step
    def _check_config(self, config) -> None:
        cfg = config or EngineConfig()
        if not isinstance(cfg, EngineConfig):
            raise MorphError(f"config must be an EngineConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = cfg.torch_dtype(self.device)

    def _start_memory_accounting(self) -> None:
        """CUDA: what the process holds before the engine (its allocations are measured above that)."""
        self._release = None
        dev = self.device
        if dev.type != "cuda":
            return
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.cuda.synchronize(dev)
        gc.collect()
        torch.cuda.empty_cache()
        self._alloc0 = torch.cuda.memory_allocated(dev)
        self._reserved0 = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    def _read_model(self, model, tokenizer):
        hf, hf_config, tok, name = _resolve_model(model, self.dtype)
        self.tokenizer = tokenizer or tok
        self.name = name
        self.spec = spec = spec_of(hf_config, name, hf)
        self.max_model_len = self.config.max_model_len or min(spec.max_positions, 4096)
        if self.max_model_len > spec.max_positions:
            raise MorphError(f"max_model_len {self.max_model_len} exceeds the model's {spec.max_positions} positions")
        cfg, dev = self.config, self.device
        self.use_triton = cfg.attention == "triton" or (cfg.attention == "auto" and dev.type == "cuda")
        if self.use_triton and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise MorphError("attention='triton' needs a CUDA device (or TRITON_INTERPRET=1 to check kernels on CPU)")
        self.swappable, self.restorable = cfg.morph_layers(spec.num_layers)
        return hf, hf_config

    def _plan_layout(self, int4) -> None:
        """Where everything goes in the arena: a Morpher's INT4 format (AWQ scales included) or the engine's own."""
        cfg = self.config
        self.morpher = int4
        group = int4.config.group_size if int4 is not None else cfg.group_size
        awq = int4 is not None and any(t.input_scale_inv is not None for twins in int4._int4 for t in twins.values())
        self.layout = Layout(self.spec, self.dtype, self.device, cfg.block_size, group, awq, cfg.staging_slots,
                             self.max_model_len)
        if cfg.swap_compute == "fp16":  # the oracle: swaps' bytes and KV blocks in shadow regions outside the budget
            self.layout.set_shadow(self.swappable)

    def _size_memory(self, hf_config) -> None:
        """Budget = arena (weights + staging + KV) + measured workspace; enforced on CUDA."""
        cfg, dev, layout = self.config, self.device, self.layout
        cuda = dev.type == "cuda"
        budget = cfg.memory_budget
        if budget is None and cfg.card is not None:
            budget = get_card(cfg.card).budget_bytes
        if budget is None and cuda:
            budget = int(0.9 * torch.cuda.mem_get_info(dev)[0])
        if cuda and cfg.enforce_budget:
            self._enforce(budget + layout.shadow_bytes)
        t0 = time.perf_counter()
        if cuda:
            meas = workspace.measure_cuda(layout, hf_config, cfg, self.max_model_len)
            measured = meas["bytes"]
        else:
            meas, measured = None, workspace.estimate_cpu(layout, cfg)
        self.workspace_probe_s = time.perf_counter() - t0
        ws = int(measured * (1 + cfg.workspace_margin))
        if budget is None:
            budget = layout.fixed_bytes + ws + (512 << 20)
        layout.set_main_blocks(main_pool_blocks(layout, budget, ws, cfg.kv_blocks, self.max_model_len, self.name))
        self.budget, self.workspace_bytes, self.workspace_measured = budget, ws, meas

    def _enforce(self, nbytes: int) -> None:
        """Cap the process's CUDA allocator at what it held before plus ``nbytes``, until ``close()``."""
        dev = self.device
        total = torch.cuda.get_device_properties(dev).total_memory
        limit = self._reserved0 + nbytes
        if limit > total:
            raise MorphError(f"memory budget {_size(nbytes)} does not fit on {torch.cuda.get_device_name(dev)} "
                             f"({_size(total)}, {_size(self._reserved0)} already held by this process)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()  # the fraction API wants one
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        before = getter(index) if getter is not None else 1.0
        torch.cuda.set_per_process_memory_fraction(limit / total, index)
        self.memory_limit = limit
        self._release = weakref.finalize(self, _restore_fraction, index, before)

    def _fill_arena(self, hf, hf_config) -> None:
        """The one allocation, weights in it (from the HF model, or random), and the model's views."""
        layout = self.layout
        self.arena = Arena(layout.arena_bytes(), self.device)
        if hf is not None:
            try:
                loader.fill_from_hf(self.arena, layout, hf)
            except ValueError as exc:
                raise MorphError(str(exc)) from None
        else:
            loader.fill_random(self.arena, layout, hf_config, seed=self.config.seed)
        self.base = layout.block_base()
        self.model = Model(layout, self.arena, self.base.to(self.device), self.use_triton)

    def _host_copies(self, int4) -> DeviceCopies:
        """Both precisions of each swappable layer in (pinned) host memory, behind the copy backend."""
        cfg, layout = self.config, self.layout
        copies = DeviceCopies(self.arena, cfg.copy_chunk_bytes, cfg.swap_mode, cfg.copy_bandwidth_guess())
        t0 = time.perf_counter()
        for li in sorted(set(self.swappable)):
            twins = (loader.twins_from_morpher(int4, li, layout) if int4 is not None
                     else loader.quantize_layer(self.arena, layout, li, cfg.symmetric))
            region = self.arena.bytes(layout.region(li), layout.region_bytes) if li in self.restorable else None
            copies.set_host_copies(li, region, int4_head_blob(layout, twins))
            del twins
        self.host_copy_s = time.perf_counter() - t0
        return copies

    def _build_core(self, copies, hf_config) -> None:
        self.core = EngineCore(self.layout, self.config, copies, swappable=self.swappable,
                               restorable=self.restorable, eos=eos_ids(self.tokenizer, hf_config),
                               cuda_graphs=self.config.cuda_graphs and self.device.type == "cuda" and self.use_triton)
        self.eos = self.core.eos

    # ------------------------------------------------------------------ the executor
    def _execute(self, plan):
        model, runner = self.model, self.runner
        if model.int4_layers is not plan.compute:
            model.int4_layers = plan.compute
        if not plan.batch:
            self.core.pump(plan)
            return [], "idle", None, 0.0, NO_PHASES
        runner.on_launch = (lambda: self.core.pump(plan)) if plan.copy_budget else None
        _, tokens, path = runner.run(plan.batch, plan.decode_seqs == len(plan.batch))
        runner.on_launch = None
        return (tokens, path, runner.last_gpu_ms if runner.time_gpu else None, runner.last_capture_s,
                runner.last_phases_s)

    # ------------------------------------------------------------------ info
    def memory_report(self) -> dict:
        lay = self.layout
        rep = {"budget": self.budget, "card": self.config.card, "arena": self.arena.nbytes,
               "weights": lay.weight_bytes, "staging": lay.staging_slots * lay.slot_bytes,
               "kv_main_blocks": lay.main_blocks, "kv_block_bytes": lay.block_bytes,
               "kv_tail_blocks_per_layer": lay.tail_blocks, "oracle_reserve_bytes": lay.shadow_bytes,
               "workspace_reserved": self.workspace_bytes, "workspace_measured": self.workspace_measured,
               "workspace_probe_s": self.workspace_probe_s, "kv_capacity_blocks": self.kv_capacity}
        if self.device.type == "cuda":
            dev = self.device
            rep["allocated_now"] = torch.cuda.memory_allocated(dev) - self._alloc0
            rep["allocated_peak"] = torch.cuda.max_memory_allocated(dev) - self._alloc0
            rep["reserved_now"] = torch.cuda.memory_reserved(dev) - self._reserved0
            rep["reserved_peak"] = torch.cuda.max_memory_reserved(dev) - self._reserved0
            rep["peak_over_budget_bytes"] = (max(rep["allocated_peak"], rep["reserved_peak"])
                                             - self.budget - lay.shadow_bytes)
            rep["enforced_limit"] = getattr(self, "memory_limit", None)
        return rep

    def weight_digest(self) -> str:
        """sha256 of every weight byte in the arena (resident + all 16-bit layer regions)."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.arena.bytes(0, self.layout.staging0).cpu().numpy().tobytes())
        return h.hexdigest()

    def precapture(self, order=None) -> float:
        """Capture decode graphs ahead for the states a fixed swap order passes through (each prefix of
        ``order``, default: the current state only); returns the seconds spent."""
        if not self.runner.use_graphs:
            return 0.0
        return self.runner.precapture(self.core.morph.compute_states(self._layers(order or [])))

    def reset(self) -> None:
        super().reset()
        self.runner.gen.manual_seed(self.config.seed)

    def close(self) -> None:
        """Give the CUDA allocator's cap back (the engine's memory goes when the object does)."""
        if self._release is not None:
            self._release()
