"""The engine without a device: the same ``EngineCore`` (scheduler, block manager, morph planner, pacing) on a
virtual clock advanced by a step-time model, with simulated copies (landing at ``bytes / bandwidth``).

    from morphlib.engine import EngineConfig, Simulator, TableStepTime
    sim = Simulator("shape:llama-2-7b", EngineConfig(card="L4", dtype="bfloat16"),
                    TableStepTime({1: 0.045, 16: 0.050, 64: 0.070}, prefill_token_s=2e-4), workspace_bytes=1 << 30)
    res = sim.replay(trace)          # the replay driver LLM uses, on virtual time

Sizing is the engine's arithmetic (``memory.main_pool_blocks``) with a *stated* workspace in place of the
measured one (or ``EngineConfig.kv_blocks``). Sampled tokens are placeholders (token 0): simulated
requests run to ``max_tokens`` (EOS cannot be known without a model). Records carry the path the real
engine would take ("graph" for decode-only steps within the largest bucket when ``cuda_graphs``).
"""

from __future__ import annotations

from torch import nn

from morphlib.device import resolve_device
from morphlib.engine.base import NO_PHASES, Engine
from morphlib.engine.clock import VirtualClock
from morphlib.engine.config import EngineConfig
from morphlib.engine.copies import SimulatedCopies
from morphlib.engine.core import EngineCore
from morphlib.engine.memory import Layout, main_pool_blocks
from morphlib.engine.spec import ModelSpec, spec_of
from morphlib.errors import MorphError, check_int
from morphlib.cards import get_card
from morphlib.shapes import SHAPES


def _spec(model) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, nn.Module):
        return spec_of(model.config, getattr(model, "morphlib_name", type(model).__name__), model)
    if isinstance(model, str):
        shape = model[6:] if model.startswith("shape:") else model
        if shape not in SHAPES:
            raise MorphError(f"the simulator needs a model shape ({', '.join(SHAPES)}), a config or a ModelSpec; "
                             f"got {model!r}")
        return spec_of(dict(SHAPES[shape], model_type="llama"), model)
    return spec_of(model, getattr(model, "name_or_path", None) or "model")


class Simulator(Engine):
    def __init__(self, model, config: EngineConfig | None = None, step_time=None, *, workspace_bytes: int = 0):
        cfg = config or EngineConfig()
        if not isinstance(cfg, EngineConfig):
            raise MorphError(f"config must be an EngineConfig, got {type(cfg).__name__}")
        if step_time is None:
            raise MorphError("the simulator needs a step-time model (e.g. TableStepTime({1: 0.01}))")
        check_int("workspace_bytes", workspace_bytes, 0)
        self.config = cfg
        self.spec = spec = _spec(model)
        self.name = spec.name
        self.max_model_len = cfg.max_model_len or min(spec.max_positions, 4096)
        if self.max_model_len > spec.max_positions:
            raise MorphError(f"max_model_len {self.max_model_len} exceeds the model's {spec.max_positions} positions")
        device = resolve_device(cfg.device)
        self.swappable, self.restorable = cfg.morph_layers(spec.num_layers)
        self.layout = Layout(spec, cfg.torch_dtype(device), device, cfg.block_size, cfg.group_size, False,
                             cfg.staging_slots, self.max_model_len)
        if cfg.swap_compute == "fp16":
            self.layout.set_shadow(self.swappable)
        budget = cfg.memory_budget if cfg.card is None else get_card(cfg.card).budget_bytes
        if budget is None:
            if cfg.kv_blocks is None:
                raise MorphError("the simulator needs a memory budget, a card or kv_blocks to size its KV pool")
            budget = 1 << 62
        self.budget, self.workspace_bytes = budget, workspace_bytes
        self.layout.set_main_blocks(main_pool_blocks(self.layout, budget, workspace_bytes, cfg.kv_blocks,
                                                     self.max_model_len, self.name))
        copies = SimulatedCopies(cfg.copy_chunk_bytes, cfg.swap_mode, cfg.copy_bandwidth_guess())
        self.core = EngineCore(self.layout, cfg, copies, swappable=self.swappable, restorable=self.restorable,
                               cuda_graphs=cfg.cuda_graphs)
        self._attach(self.core, VirtualClock(step_time))

    def _execute(self, plan):
        self.core.pump(plan)
        if not plan.batch:
            return [], "idle", None, 0.0, NO_PHASES
        return [0] * len(plan.sampled), "graph" if plan.bucket is not None else "eager", None, 0.0, NO_PHASES
