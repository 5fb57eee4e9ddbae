"""What both generation endpoints share: server settings and state, admission (bounded queue -> 429), request
validation into `SamplingParams`, the metered engine stream, SSE framing, and client-disconnect handling.

Admission counts sequences (prompts x n), not requests: one request with 64 prompts and n=4 holds 256 of
`max_pending_requests`, and a request asking for more than `max_seqs_per_request` is a 400. Token ids past the
tokenizer's vocabulary (checkpoints pad `vocab_size`, GLM-5 to 154,880) have no text: in logprobs they read as the
placeholder `<|id:N|>` (vLLM's convention), in generated text they are empty.
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

from pydantic import BaseModel

from glm5.engine.async_engine import AsyncLLMEngine
from glm5.engine.multiproc import EngineDeadError
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
    """Sequences admitted at once (running + queued in the engine; a request counts prompts x n); more get 429 +
    Retry-After."""
    max_seqs_per_request: int = 256
    """Most sequences one generation request may ask for (prompts x n); more get 400 (split the batch)."""
    retry_after_s: int = 1
    """Seconds a refused client is told to wait (Retry-After)."""
    disconnect_poll_s: float = 0.25
    """How often a non-streaming request checks whether its client is still there."""
    default_max_tokens: int | None = None
    """Chat max_tokens when the request gives none (None: up to the context length, as vLLM)."""
    aliases: list[str] = field(default_factory=list)
    """More names accepted as `model`."""
    allow_special_tokens_in_prompt: bool = False
    """Parse special-token strings (`<|user|>`, `[gMASK]`, ...) in /v1/completions and /tokenize text prompts
    into their ids, as vLLM does. Off: such text is encoded literally (plain bytes), like all chat content."""


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
    """An admitted generation request holding `num_seqs` slots; `release()` (idempotent) gives them back."""

    def __init__(self, state: ServerState, num_seqs: int = 1) -> None:
        self._state = state
        self._held = True
        self.num_seqs = num_seqs

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.num_pending -= self.num_seqs
            if self._state.num_pending == 0:
                self._state.idle.set()


class GILFreeTokenizer:
    """The tokenizer as the server uses it: `encode` goes through `encode_batch`, which releases the GIL in the Rust
    backend. A plain `encode` holds it, so tokenizing one long prompt, even in a worker thread, would stall the event
    loop (a 12 MB body: /health silent for 13 s). Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any) -> None:
        self.wrapped = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self.wrapped.encode_batch([text], *args, **kwargs)[0]


PADDED_VOCAB_MULTIPLE = 1024
"""A model `vocab_size` up to the tokenizer's size rounded up to this is ordinary padding (Megatron pads to 128 x
the tensor-parallel size, 1024 at TP 8; Qwen2 pads 151,665 to 152,064, past a multiple of 256)."""


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the UTF-8 bytes any one token covers: the longest vocabulary entry, in UTF-8 bytes (a
    byte-level BPE entry spells each byte as one character of 1-2 bytes, so this over-counts, never under-counts)."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int | None:
    """Characters beyond which a text cannot fit in `max_model_len` tokens whatever it says, or None (no sound bound).

    A character is at least one UTF-8 byte and a token covers at most `max_token_bytes` bytes, so a text of C
    characters needs at least C / max_token_bytes tokens when the tokenizer keeps every byte (byte-level BPE, as
    GLM's). A Unicode normalizer (NFC, NFKC, ...) may compose up to 4 code points into one character of 2+ bytes,
    so the bound is widened 4x; any other normalizer (which may drop text) turns it off."""
    normalizer = getattr(tokenizer.backend, "normalizer", None)
    factor = 1
    if normalizer is not None:
        kinds = _normalizer_kinds(normalizer)
        if kinds is None or not kinds <= {"NFC", "NFD", "NFKC", "NFKD"}:
            return None
        factor = 4
    return max_model_len * max_token_bytes(tokenizer) * factor


def _normalizer_kinds(normalizer: Any) -> set[str] | None:
    try:
        spec = json.loads(normalizer.__getstate__())
    except Exception:  # noqa: BLE001 - an unknown normalizer: no bound
        return None
    if spec.get("type") == "Sequence":
        kinds: set[str] = set()
        for n in spec.get("normalizers", []):
            kinds.add(n.get("type"))
        return kinds
    return {spec.get("type")}


def invalid_text(value: Any, path: str = "") -> str | None:
    """Where the first string of a request that is not valid Unicode is (`messages[0].content`), else None.

    JSON may spell a lone surrogate (`"\\ud800"`); Python then holds a str that cannot be UTF-8 encoded, which the
    tokenizer (and the JSON answer) would fail on. Declared fields and what they contain are checked (dict keys
    too); unknown extra fields are ignored, as everywhere else."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found = invalid_text(getattr(value, name), f"{path}.{name}" if path else name)
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if invalid_text(key) is not None:
                return path or "body"
            found = invalid_text(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        if set(map(type, value)) <= {
            int,
            float,
            bool,
        }:  # token ids (lm-eval sends long lists): nothing to check
            return None
        for i, item in enumerate(value):
            found = invalid_text(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def check_text(body: Any) -> None:
    """400 naming the field when a request holds text that is not valid Unicode (see `invalid_text`)."""
    where = invalid_text(body)
    if where is not None:
        raise APIError(
            f"{where} is not valid Unicode text: it holds a lone UTF-16 surrogate (e.g. \\ud800); "
            "send well-formed UTF-8",
            param=where,
            code="invalid_text",
        )


class ServerState:
    """The engine, tokenizer, settings and counters of one running server (kept in `app.state.server`)."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        if engine.engine.tokenizer is None:
            raise ValueError(
                "serving needs a tokenizer: give a checkpoint with tokenizer.json or --tokenizer PATH"
            )
        self.tokenizer = GILFreeTokenizer(engine.engine.tokenizer)
        self.config = config
        self.metrics = ServerMetrics(engine)
        self.max_model_len: int = engine.engine.max_model_len
        self.model_vocab: int = engine.engine.model.config.vocab_size
        self.tokenizer_vocab: int = self.tokenizer.vocab_size
        self._warn_vocab_mismatch()
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.max_model_len)
        """Longer text cannot fit the context: refused before it is tokenized (None: no sound bound)."""
        self.num_pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        specials = self.tokenizer.special_token_ids
        self.think_open, self.think_close = specials.get("<think>"), specials.get("</think>")
        self.tool_call_id = specials.get("<tool_call>")
        self.eos_ids = set(engine.engine.eos_ids)
        self._token_strs: dict[int, str] = {}

    def _warn_vocab_mismatch(self) -> None:
        """One warning line when the tokenizer does not look like the model's own (padding is normal)."""
        tok, model = self.tokenizer_vocab, self.model_vocab
        padded = -(-tok // PADDED_VOCAB_MULTIPLE) * PADDED_VOCAB_MULTIPLE
        if tok > model:
            log.warning(
                "the tokenizer has %d tokens but the model only %d (vocab_size): ids %d..%d cannot be fed to "
                "the model (prompts with them get 400); is the tokenizer the model's own?",
                tok,
                model,
                model,
                tok - 1,
            )
        elif model > padded:
            log.warning(
                "the model's vocab_size %d is more than the tokenizer's %d tokens rounded up to a multiple of "
                "%d (%d): is the tokenizer the model's own? ids past it have no text (logprobs show <|id:N|>)",
                model,
                tok,
                PADDED_VOCAB_MULTIPLE,
                padded,
            )

    # --- admission -------------------------------------------------------------------------------
    def check_num_seqs(self, num_seqs: int, what: str, param: str) -> None:
        """400 when one request asks for more sequences than a request may (or than the whole queue holds)."""
        limit = min(self.config.max_seqs_per_request, self.config.max_pending_requests)
        if num_seqs > limit:
            self.metrics.rejected.labels("too_many_sequences").inc()
            raise APIError(
                f"this request asks for {what}: {num_seqs} sequences; this server takes at most {limit} "
                "per request: split it into smaller requests or lower n",
                param=param,
                code="too_many_sequences",
            )

    def admit(self, num_seqs: int = 1) -> Ticket:
        """Hold `num_seqs` of the queue's slots, or refuse: 503 while draining, 429 when they are not free."""
        dead = getattr(self.engine, "dead", None)
        if dead is not None:
            self.metrics.rejected.labels("engine_dead").inc()
            raise engine_dead_error(dead)
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError(
                "the server is shutting down; retry on another replica",
                503,
                "service_unavailable",
                code="shutting_down",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        limit = self.config.max_pending_requests
        if self.num_pending + num_seqs > limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                f"too many sequences in flight ({self.num_pending} + {num_seqs} asked > {limit}); "
                f"retry after {self.config.retry_after_s} s",
                429,
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self.num_pending += num_seqs
        self.idle.clear()
        return Ticket(self, num_seqs)

    async def abort_all(self) -> None:
        """Abort every generation (the drain ran out of time): their clients get 503 (`metered` raises it)."""
        for request_id in list(self.engine.engine.requests):
            await self.engine.abort(request_id)

    def check_model(self, model: str | None) -> None:
        names = {self.config.model_name, *self.config.aliases}
        if self.config.model_path:
            names.add(self.config.model_path)
        if model is not None and model not in names:
            raise APIError(
                f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                404,
                "not_found_error",
                "model",
                "model_not_found",
            )

    # --- tokens ----------------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        """One token's text, special tokens kept (for logprobs); `<|id:N|>` for an id past the tokenizer."""
        s = self._token_strs.get(token_id)
        if s is None:
            if self.has_text(token_id):
                s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            else:
                s = placeholder(token_id)
            self._token_strs[token_id] = s
        return s

    def has_text(self, token_id: int) -> bool:
        """Whether the tokenizer knows this id (ids up to the model's padded vocab_size have no text)."""
        return 0 <= token_id < self.tokenizer_vocab

    def decode_prompt(self, ids: list[int]) -> str:
        """A prompt's text, special tokens kept; ids past the tokenizer have none (as in generated text)."""
        return self.tokenizer.decode([t for t in ids if self.has_text(t)], skip_special_tokens=False)

    def check_text_fits(self, text: str, param: str) -> None:
        """400 before tokenizing when `text` is too long for any tokenization of it to fit the context."""
        bound = self.max_prompt_chars
        if bound is not None and len(text) > bound:
            raise APIError(
                f"context length exceeded: the text has {len(text)} characters, more than the {bound} that "
                f"{self.max_model_len} tokens can hold with this tokenizer; shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """Validate prompt ids (against the model's vocab_size: ids past the tokenizer but inside the model's padded
        vocabulary are fine) and the output budget; returns max_tokens (default: up to the context length)."""
        vocab = self.model_vocab
        if not ids:
            raise APIError("the prompt is empty: give at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param=param)
        n, limit = len(ids), self.max_model_len
        if n >= limit:
            raise APIError(
                f"context length exceeded: {n} > {limit - 1} (the prompt has {n} tokens; this model holds "
                f"{limit} per sequence, prompt + output); shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise APIError(
                f"context length exceeded: {n + max_tokens} > {limit} ({n} prompt tokens + max_tokens "
                f"{max_tokens}); lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens


def placeholder(token_id: int) -> str:
    """The text shown for a token id the tokenizer does not have (vLLM's convention)."""
    return f"<|id:{token_id}|>"


def sampling_params(body: SamplingFields, max_tokens: int, **extra: Any) -> SamplingParams:
    """The request's knobs as `SamplingParams` (a ValueError becomes a 400 naming the field)."""
    if body.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias")
    if body.min_tokens > max_tokens:
        raise APIError(
            f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens}, what this request may "
            "generate); lower min_tokens or raise max_tokens",
            param="min_tokens",
        )
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
            min_tokens=body.min_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            **extra,
        )
    except ValueError as exc:
        name = str(exc).split(" = ")[0].removeprefix("SamplingParams.")
        raise APIError(str(exc), param=name if name.isidentifier() else None) from None


def engine_dead_error(exc: BaseException) -> APIError:
    """503 for a request that met a dead engine (a rank of a multi-process engine died)."""
    return APIError(
        f"the engine failed and this server is shutting down ({exc}); retry on another replica",
        503,
        "service_unavailable",
        code="engine_dead",
    )


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
                if (
                    not recorded_prompt
                    and out.metrics is not None
                    and out.metrics.first_scheduled_time is not None
                ):
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
                if state.draining and any(c.finish_reason == "abort" for c in out.outputs):
                    raise APIError(
                        "the server shut down before this request finished; retry on another replica",
                        503,
                        "service_unavailable",
                        code="shutting_down",
                        headers={"Retry-After": str(state.config.retry_after_s)},
                    )
                yield out
    except EngineDeadError as exc:
        raise engine_dead_error(exc) from None
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
    return sse(
        {
            "error": {
                "message": f"generation failed: {type(exc).__name__}: {exc}",
                "type": "internal_error",
                "param": None,
                "code": 500,
            }
        }
    )


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
