"""What the engine returns (vLLM-shaped `RequestOutput` / `CompletionOutput`), and incremental detokenisation with
stop strings.

`LLM.generate` returns each request's full result. `LLMEngine.step()` and the async engine's `generate` stream
deltas instead: each `RequestOutput` then holds, per completion, only the tokens, text and logprobs produced
since the previous one (`finished` and `finish_reason` mark the last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass
class CompletionOutput:
    """One of a request's `n` completions (or, when streaming, what it gained in the last step)."""

    index: int
    """Which of the n completions this is."""
    text: str
    """Generated text (stop strings cut off unless asked for); empty without a tokenizer."""
    token_ids: list[int]
    """Generated token ids, the stop token included when one ended the output."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: {token_id: logprob} for the sampled token and the top alternatives."""
    cumulative_logprob: float | None = None
    """Sum of the sampled tokens' logprobs (when logprobs were asked for)."""
    finish_reason: str | None = None
    """"stop" (eos, stop id or stop string), "length" (max_tokens / context) or "abort"; None while running."""
    stop_reason: int | str | None = None
    """The stop id or stop string that ended the output."""
    weight_versions: list[int] = field(default_factory=list)
    """Per generated token: the weight version that produced it (RL's per-token policy version)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    num_draft_tokens: int = 0
    """Speculative tokens proposed for this request."""
    num_accepted_tokens: int = 0
    """Speculative tokens accepted."""

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """The result of one prompt (`outputs[j]` is completion j), or one streamed delta of it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token (None for the first): {token_id: logprob} of the token plus alternatives."""
    weight_version: int = 0
    """Weight version when this output was produced."""
    metrics: RequestMetrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """SamplingParams.extra of the request, passed through."""

    @property
    def num_cached_tokens(self) -> int:
        return 0 if self.metrics is None else self.metrics.num_cached_tokens


class IncrementalDetokenizer:
    """Text of a growing list of token ids, one step at a time, and stop-string matching.

    Decodes a short window (vLLM's prefix/read offsets) instead of the whole output each step, and waits while
    the window ends in an incomplete UTF-8 sequence. Text that could still be the start of a stop string is
    held back from streaming until it is decided.
    """

    def __init__(
        self, tokenizer: Any, skip_special_tokens: bool, stop: Sequence[str] = (), include_stop: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop = include_stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        """Characters of `text` already streamed."""
        self._prefix = 0
        self._read = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._vocab = getattr(tokenizer, "vocab_size", None)

    def add(self, token_ids: Sequence[int]) -> str | None:
        """Append tokens; returns the stop string they completed (the text is then cut there), else None.

        Ids past the tokenizer's vocabulary (checkpoints pad the embedding table beyond it) have no text: they
        are kept in `token_ids` but decode to nothing, as in vLLM, instead of failing the whole batch."""
        if self._vocab is not None:
            token_ids = [t for t in token_ids if t < self._vocab]
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self.skip_special_tokens)
        now = decode(self.ids[self._prefix :], skip_special_tokens=self.skip_special_tokens)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        old_len = len(self.text)
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._match_stop(old_len)

    def _match_stop(self, old_len: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s) if self.include_stop else i]
        return s

    def take(self, final: bool) -> str:
        """Text not streamed yet (minus a possible stop-string start, unless final)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self._hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
