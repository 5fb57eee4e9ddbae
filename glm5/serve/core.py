"""What both generation endpoints share: server settings and state, admission (bounded queue -> 429), request
validation into `SamplingParams`, the metered engine stream, SSE framing, and client-disconnect handling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from glm5.engine.async_engine import AsyncLLMEngine
from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling import SamplingParams
from glm5.serve.metrics import ServerMetrics
from glm5.serve.protocol import SamplingFields

log = logging.getLogger("glm5.serve")


@dataclass
class ServerConfig:
    """Settings of one server (the engine's own settings live in `EngineConfig`)."""

    model_name: str = "glm5"
    """The id clients send as `model` and /v1/models lists."""
    model_path: str | None = None
    """Where the weights came from (shown as the model's `root`; also accepted as `model`)."""
    api_key: str | None = None
    """When set, every /v1 and tokenizer request needs `Authorization: Bearer KEY` (else 401)."""
    max_body_bytes: int = 16 << 20
    """Largest request body; bigger ones get 413."""
    max_pending_requests: int = 512
    """Generation requests admitted at once (running + queued in the engine); more get 429 + Retry-After."""
    retry_after_s: int = 1
    """Seconds a refused client is told to wait (Retry-After)."""
    disconnect_poll_s: float = 0.25
    """How often a non-streaming request checks whether its client is still there."""
    default_max_tokens: int | None = None
    """Chat max_tokens when the request gives none (None: up to the context length, as vLLM)."""
    aliases: list[str] = field(default_factory=list)
    """More names accepted as `model`."""


class APIError(Exception):
    """A request error answered as `{"error": {...}}` with this status (never a traceback)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Ticket:
    """An admitted generation request; `release()` (idempotent) gives its slot back."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.num_pending -= 1
            if self._state.num_pending == 0:
                self._state.idle.set()


class ServerState:
    """The engine, tokenizer, settings and counters of one running server (kept in `app.state.server`)."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("serving needs a tokenizer: give a checkpoint with tokenizer.json or --tokenizer PATH")
        self.config = config
        self.metrics = ServerMetrics(engine)
        self.max_model_len: int = engine.engine.max_model_len
        self.num_pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        specials = self.tokenizer.special_token_ids
        self.think_open, self.think_close = specials.get("<think>"), specials.get("</think>")
        self.tool_call_id = specials.get("<tool_call>")
        self.eos_ids = set(engine.engine.eos_ids)
        self._token_strs: dict[int, str] = {}

    # --- admission -------------------------------------------------------------------------------
    def admit(self) -> Ticket:
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError("the server is shutting down; retry on another replica", 503, "service_unavailable",
                           code="shutting_down", headers={"Retry-After": str(self.config.retry_after_s)})  # fmt: skip
        if self.num_pending >= self.config.max_pending_requests:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                f"too many requests in flight ({self.num_pending} >= {self.config.max_pending_requests}); "
                f"retry after {self.config.retry_after_s} s", 429, "rate_limit_error", code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )  # fmt: skip
        self.num_pending += 1
        self.idle.clear()
        return Ticket(self)

    def check_model(self, model: str | None) -> None:
        names = {self.config.model_name, *self.config.aliases}
        if self.config.model_path:
            names.add(self.config.model_path)
        if model is not None and model not in names:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           404, "not_found_error", "model", "model_not_found")  # fmt: skip

    # --- tokens ----------------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        """One token's text, special tokens kept (for logprobs)."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self._token_strs[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """Validate prompt ids and the output budget; returns max_tokens (default: up to the context length)."""
        vocab = self.engine.engine.model.config.vocab_size
        if not ids:
            raise APIError("the prompt is empty: give at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param=param)
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise APIError(
                f"context length exceeded: {n} > {limit - 1} (the prompt has {n} tokens; this model holds "
                f"{limit} per sequence, prompt + output); shorten the prompt", param=param,
                code="context_length_exceeded",
            )  # fmt: skip
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise APIError(
                f"context length exceeded: {n + max_tokens} > {limit} ({n} prompt tokens + max_tokens "
                f"{max_tokens}); lower max_tokens or shorten the prompt", param="max_tokens",
                code="context_length_exceeded",
            )  # fmt: skip
        return max_tokens


def sampling_params(body: SamplingFields, max_tokens: int, **extra: Any) -> SamplingParams:
    """The request's knobs as `SamplingParams` (a ValueError becomes a 400 naming the field)."""
    if body.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias")
    try:
        return SamplingParams(
            n=body.n,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=body.stop,
            stop_token_ids=list(body.stop_token_ids or []) + extra.pop("stop_token_ids", []),
            ignore_eos=body.ignore_eos,
            min_tokens=min(body.min_tokens, max_tokens),
            include_stop_str_in_output=body.include_stop_str_in_output,
            **extra,
        )
    except ValueError as exc:
        name = str(exc).split(" = ")[0].removeprefix("SamplingParams.")
        raise APIError(str(exc), param=name if name.isidentifier() else None) from None


# ------------------------------------------------------------------------------------------------- streams
async def metered(
    state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str
) -> AsyncIterator[RequestOutput]:
    """The engine's deltas for one prompt, recording tokens, TTFT, inter-token latency and finish reasons.
    Closing this generator early (disconnect, cancellation) aborts the request and frees its blocks."""
    metrics = state.metrics
    start = time.monotonic()
    last: float | None = None
    recorded_prompt = False
    finished = False
    try:
        async with aclosing(state.engine.generate(prompt_ids, params, request_id)) as stream:
            async for out in stream:
                now = time.monotonic()
                num_new = sum(len(c.token_ids) for c in out.outputs)
                if not recorded_prompt and out.metrics is not None and out.metrics.first_scheduled_time is not None:
                    metrics.record_prompt(len(prompt_ids), out.metrics.num_cached_tokens)
                    recorded_prompt = True
                if num_new:
                    metrics.generation_tokens.inc(num_new)
                    if last is None:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.itl.observe(now - last)
                    last = now
                for c in out.outputs:
                    if c.finish_reason is not None:
                        metrics.finished.labels(c.finish_reason).inc()
                if out.finished:
                    finished = True
                    metrics.e2e.observe(now - start)
                yield out
    finally:
        if not finished:  # closed early: the engine aborts it, and nobody reads the abort's output
            metrics.finished.labels("abort").inc()


async def merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (which, item), in arrival order; closing this closes them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async with aclosing(it) as s:
                async for item in s:
                    await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An in-stream error event (the status line is already sent); unexpected ones are logged with traceback."""
    if isinstance(exc, APIError):
        return sse(exc.body())
    log.error("generation failed", exc_info=exc)
    return sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "internal_error",
                          "param": None, "code": 500}})  # fmt: skip


class ClientDisconnected(Exception):
    """The client went away before a non-streaming answer was ready."""


async def unless_disconnected(request: Any, work: Awaitable[Any], poll_s: float) -> Any:
    """Await `work`, cancelling it (which aborts its engine requests) if the HTTP client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
