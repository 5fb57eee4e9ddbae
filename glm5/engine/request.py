"""A request and its sequences as the engine and its scheduler see them: tokens so far, scheduling state and
the output being streamed. (The model runner keeps its own per-sequence state -- random generator, penalty
counts, MTP hidden states -- built from the `SchedulerOutput`s it is sent: glm5/engine/runner.py.)"""

from __future__ import annotations

import enum
import time
from typing import Any

from glm5.engine.outputs import IncrementalDetokenizer, RequestMetrics
from glm5.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FORK = "fork"
    """An n > 1 completion waiting for the first one's prefill (it then shares its blocks)."""
    FINISHED = "finished"


class Seq:
    """One completion being generated: its tokens, how many have cache entries, its status and output so far."""

    def __init__(self, seq_id: int, request: Request, index: int, seed: int | None = None) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.seed = seed
        """Seed of the sequence's random generator in the runner (None: greedy, no generator)."""
        self.tokens: list[int] = list(request.prompt_token_ids)
        self.num_cached = 0
        self.status = Status.WAITING
        self.detok: IncrementalDetokenizer | None = None
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.weight_versions: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.children: list[Seq] = []
        self.sent_tokens = 0
        self.sent_finish = False
        self.runner_state: Any = None
        """The runner's state of this sequence when the runner runs in this process (`UniProcExecutor`): for
        introspection and tests only; the engine never reads it, and it is None with other executors."""

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.request.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.request.num_prompt

    @property
    def pending_hidden(self) -> Any:
        """The MTP catch-up hidden states the in-process runner holds for this sequence (see `runner_state`)."""
        return getattr(self.runner_state, "pending_hidden", None)


class Request:
    """A prompt, its sampling parameters and its n sequences."""

    def __init__(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt = len(prompt_token_ids)
        self.params = params
        self.seqs: list[Seq] = []
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_logprobs_sent = False
        self.stop_ids: set[int] = set()

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)
