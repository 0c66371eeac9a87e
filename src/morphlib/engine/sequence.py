"""A request as the engine sees it: token ids, KV block table, progress and timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from morphlib.engine.config import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + generated tokens. ``num_computed`` tokens have their KV in the cache; a step feeds the
    next chunk ``tokens[num_computed:num_computed + n]`` and, when the chunk reaches the end, samples
    one token. A preempted sequence drops its blocks and recomputes prompt + output so far
    (``recomputed`` counts the tokens whose KV it lost). Ids are given by the engine core (0, 1, ... after
    each ``reset``), so that two runs of one request stream name their sequences alike."""

    __slots__ = ("id", "prompt", "output", "params", "status", "num_computed", "block_table",
                 "arrival", "first_scheduled", "first_token", "token_times", "finished", "preemptions",
                 "recomputed", "preempted_in", "finish_reason")

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, arrival: float):
        self.id = seq_id
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0
        self.block_table: list[int] = []
        self.arrival = arrival
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.token_times: list[float] = []
        self.finished: float | None = None
        self.preemptions = 0
        self.recomputed = 0
        self.preempted_in = -1  # the schedule call that last preempted it
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt)
        if stop <= n:
            return self.prompt[start:stop]
        return (self.prompt + self.output)[start:stop]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, {self.status.value}, prompt={len(self.prompt)}, out={len(self.output)}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")


@dataclass
class RequestOutput:
    """One finished request: its tokens (and text when a tokenizer is known) and timestamps (seconds, the
    engine's clock: wall ``time.perf_counter()`` or a virtual one). TTFT = first_token - arrival; TPOT =
    (finished - first_token) / (n - 1), the request's mean; ``inter_token_s`` the gaps between its tokens;
    ``queueing_s`` = first_scheduled - arrival."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    arrival: float
    first_scheduled: float
    first_token: float
    token_times: list[float]
    finished: float
    preemptions: int
    finish_reason: str
    text: str | None = None
    recomputed_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        n = len(self.token_ids)
        return (self.finished - self.first_token) / (n - 1) if n > 1 else 0.0

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def queueing_s(self) -> float:
        return self.first_scheduled - self.arrival

    @property
    def inter_token_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @classmethod
    def of(cls, seq: Sequence, text: str | None = None) -> "RequestOutput":
        return cls(seq.id, list(seq.prompt), list(seq.output), seq.arrival, seq.first_scheduled, seq.first_token,
                   list(seq.token_times), seq.finished, seq.preemptions, seq.finish_reason or "length", text,
                   seq.recomputed)
