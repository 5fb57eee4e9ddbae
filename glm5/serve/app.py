"""The FastAPI app of the OpenAI-compatible server: routes, API key, body limit, OpenAI-style errors, lifespan.

Routes: /v1/models, /v1/models/{id}, /v1/chat/completions, /v1/completions, /tokenize, /detokenize,
/tokenizer_info (vLLM's shapes, which lm-eval's remote tokenizer uses), /health, /metrics (Prometheus). Every
failure is answered as `{"error": {"message", "type", "param", "code"}}`, `param` named as OpenAI does
(`messages[0].content`): bad input is a 4xx (400 for invalid JSON, fields or text, 401 without the API key, 404 for
an unknown model, 413 for a body too large, declared or chunked, 415 for a POST body that is not
`application/json`, 429 when the queue is full, 503 while shutting down); only a server bug is a 500, and the
server keeps serving.

Prompt rendering and tokenization run in worker threads (the tokenizer releases the GIL), so a huge prompt never
stalls other clients, /health included; text longer than the context could hold is refused before tokenizing.

    app = create_app(AsyncLLMEngine.from_model("ckpt/"), ServerConfig(model_name="glm-5"))
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm5.engine.async_engine import AsyncLLMEngine
from glm5.serve import chat, completions
from glm5.serve.core import (
    APIError,
    ClientDisconnected,
    ServerConfig,
    ServerState,
    check_text,
    unless_disconnected,
)
from glm5.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

log = logging.getLogger("glm5.serve")

OPEN_PATHS = frozenset(["/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"])
"""Reachable without the API key (probes and scrapers; the spec is public)."""

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 429, 503)
}

JSON_POSTS = frozenset(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
"""POST endpoints whose body must be JSON (`Content-Type: application/json`, else 415)."""

DRAIN_IDLE_WAIT_S = 5.0
"""At the lifespan's end, how long to wait for generations uvicorn's shutdown left (it has already waited out the
graceful timeout and cancelled open responses) before the engine aborts them."""

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def _error(
    status: int,
    message: str,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": type or _STATUS_TYPES.get(status, "internal_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Outermost ASGI layer: counts answers per endpoint and status, checks the API key in constant time, refuses
    POST bodies that are not JSON (415) and bodies over the limit (by Content-Length, or while reading a chunked
    body) with 413. The server's state is the application's (`scope["app"].state.server`)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: ServerState = scope["app"].state.server
        path = scope.get("path", "")
        endpoint = (
            path if path in _KNOWN_PATHS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        )
        status_box = {"status": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            problem = self._check(scope, state, path)
            if problem is not None:
                await problem(scope, receive, counting_send)
                return
            limit = state.config.max_body_bytes
            seen = {"bytes": 0}

            async def limited_receive() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if (
                        seen["bytes"] > limit
                    ):  # FastAPI passes an HTTPException raised while reading the body on
                        raise HTTPException(413, f"request body too large: more than {limit} bytes")
                return message

            await self.app(scope, limited_receive, counting_send)
        finally:
            state.metrics.requests.labels(endpoint, str(status_box["status"])).inc()

    def _check(self, scope: dict, state: ServerState, path: str) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = state.config.api_key
        if key and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
                return _error(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if scope.get("method") == "POST" and path in JSON_POSTS:
            given = headers.get("content-type", "")
            kind = given.split(";", 1)[0].strip().lower()
            if kind != "application/json" and not (
                kind.startswith("application/") and kind.endswith("+json")
            ):
                return _error(
                    415,
                    f"the body must be JSON: send 'Content-Type: application/json' (got "
                    f"{given or 'no Content-Type'!r})",
                    code="unsupported_media_type",
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, f"invalid Content-Length header {length!r}")
            if int(length) > state.config.max_body_bytes:
                return _error(
                    413, f"request body too large: {int(length)} > {state.config.max_body_bytes} bytes"
                )
        return None


_KNOWN_PATHS = frozenset(
    [
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/health",
        "/metrics",
        "/openapi.json",
    ]
)


_TYPE_TAGS = frozenset(["str", "int", "float", "bool", "bytes", "none", "any", "dict", "list"])


def _is_union_tag(part: str) -> bool:
    """pydantic names each alternative of a union in the location (`constrained-str`, `list[TextPart]`,
    `function-after[...]`, `NamedToolChoice`); field names are snake_case identifiers."""
    return part in _TYPE_TAGS or any(c in part for c in "[]-,") or part[:1].isupper()


def openai_param(loc: Any, whole: bool = False) -> str | None:
    """A pydantic error location as OpenAI names a field: ("body", "messages", 0, "content", "list[TextPart]", 0,
    "text") -> `messages[0].content` (up to the first union alternative), or with `whole` the full path without
    the alternatives' names, `messages[0].content[0].text`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out and part == "body":
            continue
        elif _is_union_tag(str(part)):
            if not whole:
                break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    param = openai_param(first.get("loc", ()))
    # the deepest errors say most (a union's "should be a valid string" is the least helpful alternative)
    ranked = sorted(errors, key=lambda e: -len(e.get("loc", ())))
    parts: list[str] = []
    for e in ranked:
        part = f"{openai_param(e.get('loc', ()), whole=True) or 'body'}: {e.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    more = f" (and {len(parts) - 5} more)" if len(parts) > 5 else ""
    return "invalid request: " + "; ".join(parts[:5]) + more, param


# --- the server's state, lifespan and error handlers ------------------------------------------------------------
async def server_state(request: Request) -> ServerState:
    """The running server (`app.state.server`, set by create_app), as a route dependency."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn has drained (glm5.serve.server), stopped accepting and waited for open responses up to the
    # graceful timeout; what is left was cancelled: give it a moment to release, then abort the rest
    state: ServerState = app.state.server
    state.draining = True
    try:
        await asyncio.wait_for(state.idle.wait(), DRAIN_IDLE_WAIT_S)
    except TimeoutError:
        log.warning("shutting down with %d sequences still admitted: aborting them", state.num_pending)
    await state.engine.shutdown()


async def api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return _error(400, message, param=param, code="invalid_value")


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def server_bug(_: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    return _error(500, f"internal server error: {type(exc).__name__}: {exc}", "internal_error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: api_error,
    RequestValidationError: invalid_request,
    StarletteHTTPException: http_error,
    Exception: server_bug,
}

router = APIRouter()


# --- generation ------------------------------------------------------------------------------------------------
async def generate(
    request: Request,
    state: ServerState,
    body: Any,
    num_seqs: int,
    what: str,
    prepare: Any,
    run: Any,
    run_sse: Any,
    param: str = "n",
) -> Response:
    """Admit the request's sequences, prepare it (render + tokenize) in a worker thread, then stream it (SSE) or
    answer it whole; a client that disconnects is aborted."""
    state.check_model(body.model)
    state.check_num_seqs(num_seqs, what, param)
    ticket = state.admit(num_seqs)
    try:
        prep = await run_in_threadpool(_prepare, prepare, state, body)
    except BaseException:
        ticket.release()
        raise
    if body.stream:
        return _sse(run_sse(state, prep, ticket), ticket)
    try:
        result = await unless_disconnected(request, run(state, prep), state.config.disconnect_poll_s)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        ticket.release()
    return JSONResponse(result)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await generate(
        request, state, body, body.n, f"n = {body.n}", chat.prepare_chat, chat.chat_completion, chat.chat_sse
    )


@router.post("/v1/completions", response_model=None)
async def completions_(body: CompletionRequest, request: Request, state: State) -> Response:
    num_prompts = completions.num_prompts(body.prompt)
    return await generate(
        request,
        state,
        body,
        num_prompts * body.n,
        f"{num_prompts} prompts x n {body.n}",
        completions.prepare_completion,
        completions.completion,
        completions.completion_sse,
        param="n" if body.n > 1 else "prompt",
    )


# --- models, tokenizer, health, metrics --------------------------------------------------------------------------
def _card(state: ServerState, model_id: str) -> ModelCard:
    # `root` is the served name, never the checkpoint's filesystem path
    return ModelCard(id=model_id, root=state.config.model_name, max_model_len=state.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def models(state: State) -> ModelList:
    return ModelList(data=[_card(state, state.config.model_name)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, state: State) -> ModelCard:
    """One model (the openai SDK's `client.models.retrieve(id)`); 404 for a name this server does not serve."""
    state.check_model(model_id)
    served = {state.config.model_name, *state.config.aliases}
    return _card(state, model_id if model_id in served else state.config.model_name)


# sync routes: FastAPI runs them in worker threads, so long texts never stall the event loop
@router.post("/tokenize", response_model=TokenizeResponse)
def tokenize(body: TokenizeRequest, state: State) -> TokenizeResponse:
    check_text(body)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt")
    if body.prompt is not None:
        # as /v1/completions
        ids = state.tokenizer.encode(
            body.prompt,
            add_special_tokens=body.add_special_tokens,
            allow_special=state.config.allow_special_tokens_in_prompt,
        )
    else:
        ids = chat.tokenize_chat(state, body)
    strs = [state.token_str(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
def detokenize(body: DetokenizeRequest, state: State) -> DetokenizeResponse:
    state.check_model(body.model)
    vocab = state.tokenizer.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=False))


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(state: State) -> TokenizerInfo:
    tok = state.tokenizer
    eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else None
    pad = tok.id_to_token(tok.pad_token_id) if tok.pad_token_id is not None else None
    return TokenizerInfo(
        eos_token=eos, pad_token=pad, model_max_length=state.max_model_len, vocab_size=tok.vocab_size
    )


@router.get("/health")
async def health(state: State) -> Response:
    if state.draining:
        return _error(503, "shutting down", code="shutting_down")
    return JSONResponse({"status": "ok", "num_pending": state.num_pending})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(engine: AsyncLLMEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server's FastAPI app around a running engine (serve it with uvicorn): the routes of `router`, the
    OpenAI-style error handlers and `_Guard`, with the server's state in `app.state.server`."""
    app = FastAPI(
        title="glm5 OpenAI-compatible server",
        version="1",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.server = ServerState(engine, config or ServerConfig())
    app.add_middleware(_Guard)
    app.include_router(router)
    return app


def _prepare(prepare: Any, state: ServerState, body: Any) -> Any:
    """A request's validation, rendering and tokenization (run in a worker thread)."""
    check_text(body)
    return prepare(state, body)


def _sse(stream: Any, ticket: Any) -> StreamingResponse:
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(ticket.release),
    )


__all__ = ["ServerConfig", "create_app", "router"]
