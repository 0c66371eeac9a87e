"""A small serving engine for runtime layer-precision morphing (MorphServe-style), nano-vllm-sized.

One memory budget holds the weights, the paged KV pool and the workspace; swapping a decoder layer to
INT4 writes its INT4 bytes at the head of its own 16-bit region and turns the region's tail into KV
blocks. Continuous batching with chunked prefill, preemption by recompute, Triton paged attention
(torch reference on CPU), CUDA-graph decode per (morph state, batch bucket).

One core (``EngineCore``: scheduler, block manager, morph planner, bookkeeping; it reads no clock) and two
engines around it: ``LLM`` (the torch executor and a wall clock) and ``Simulator`` (a step-time model and a
virtual clock); one replay driver serves both.

    from morphlib.engine import LLM, EngineConfig, SamplingParams
    llm = LLM("smollm2-135m", EngineConfig(memory_budget=2 << 30))
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from morphlib.engine.clock import TableStepTime, VirtualClock, WallClock
from morphlib.engine.config import EngineConfig, SamplingParams
from morphlib.engine.core import EngineCore, StepPlan
from morphlib.engine.llm import LLM
from morphlib.engine.morphing import MorphOp
from morphlib.engine.records import ReplayResult, StepInfo, StepRecord
from morphlib.engine.sequence import RequestOutput
from morphlib.engine.simulator import Simulator

__all__ = ["LLM", "Simulator", "EngineCore", "StepPlan", "EngineConfig", "SamplingParams", "RequestOutput",
           "ReplayResult", "StepInfo", "StepRecord", "MorphOp", "TableStepTime", "VirtualClock", "WallClock"]
