"""The FastAPI app of the OpenAI-compatible server: routes, API key, body limit, OpenAI-style errors, lifespan.

Routes: /v1/models, /v1/chat/completions, /v1/completions, /tokenize, /detokenize, /tokenizer_info (vLLM's
shapes, which lm-eval's remote tokenizer uses), /health, /metrics (Prometheus). Every failure is answered as
`{"error": {"message", "type", "param", "code"}}`: bad input is a 4xx (400 for invalid JSON or fields, 401
without the API key, 404 for an unknown model, 413 for a body or context too large, 429 when the queue is full,
503 while shutting down); only a server bug is a 500, and the server keeps serving.

    app = create_app(AsyncLLMEngine.from_model("ckpt/"), ServerConfig(model_name="glm-5"))
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm5.engine.async_engine import AsyncLLMEngine
from glm5.serve import chat, completions
from glm5.serve.core import APIError, ClientDisconnected, ServerConfig, ServerState, unless_disconnected
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
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}

_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                 415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip


def _error(status: int, message: str, type: str | None = None, param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": type or _STATUS_TYPES.get(status, "internal_error"),
                      "param": param, "code": code}}  # fmt: skip
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """Outermost ASGI layer: counts answers per endpoint and status, checks the API key in constant time, and
    refuses bodies over the limit (by Content-Length, or while reading a chunked body) with 413."""

    def __init__(self, app: Any, state_ref: dict[str, ServerState]) -> None:
        self.app = app
        self.state_ref = state_ref

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state_ref["state"]
        path = scope.get("path", "")
        endpoint = path if path in _KNOWN_PATHS else "other"
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
                    if seen["bytes"] > limit:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, limited_receive, counting_send)
            except _BodyTooLarge:
                await _error(413, f"request body too large: more than {limit} bytes")(scope, receive, counting_send)
        finally:
            state.metrics.requests.labels(endpoint, str(status_box["status"])).inc()

    def _check(self, scope: dict, state: ServerState, path: str) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = state.config.api_key
        if key and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
                return _error(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, f"invalid Content-Length header {length!r}")
            if int(length) > state.config.max_body_bytes:
                return _error(413, f"request body too large: {int(length)} > {state.config.max_body_bytes} bytes")
        return None


class _BodyTooLarge(Exception):
    pass


_KNOWN_PATHS = frozenset(["/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
                          "/tokenizer_info", "/health", "/metrics", "/openapi.json"])  # fmt: skip


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    param = ".".join(loc) or None
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, param


def create_app(engine: AsyncLLMEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server's FastAPI app around a running engine (serve it with uvicorn)."""
    config = config or ServerConfig()
    state = ServerState(engine, config)
    state_ref = {"state": state}

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        # uvicorn has stopped accepting and waited for open responses; finish whatever is still generating
        state.draining = True
        await state.idle.wait()
        await engine.shutdown()

    app = FastAPI(title="glm5 OpenAI-compatible server", version="1", lifespan=lifespan,
                  responses=ERROR_RESPONSES)  # fmt: skip
    app.state.server = state
    app.add_middleware(_Guard, state_ref=state_ref)

    def st() -> ServerState:
        return state_ref["state"]

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}", "internal_error")

    # --- generation ------------------------------------------------------------------------------
    async def generate(request: Request, stream: bool, prep: Any, run: Any, run_sse: Any) -> Response:
        """Admit the request, then stream it (SSE) or answer it whole; a client that disconnects is aborted."""
        state = st()
        ticket = state.admit()
        if stream:
            return _sse(run_sse(state, prep, ticket), ticket)
        try:
            result = await unless_disconnected(request, run(state, prep), state.config.disconnect_poll_s)
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            ticket.release()
        return JSONResponse(result)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prep = chat.prepare_chat(st(), body)
        return await generate(request, body.stream, prep, chat.chat_completion, chat.chat_sse)

    @app.post("/v1/completions", response_model=None)
    async def completions_(body: CompletionRequest, request: Request) -> Response:
        prep = completions.prepare_completion(st(), body)
        return await generate(request, body.stream, prep, completions.completion, completions.completion_sse)

    # --- models, tokenizer, health, metrics ----------------------------------------------------
    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        state = st()
        return ModelList(data=[ModelCard(id=state.config.model_name, root=state.config.model_path,
                                         max_model_len=state.max_model_len)])  # fmt: skip

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state = st()
        state.check_model(body.model)
        tok = state.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt")
        if body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            kwargs = body.chat_template_kwargs or {}
            enable = kwargs.get("enable_thinking", True)
            clear = kwargs.get("clear_thinking", True)
            if not isinstance(enable, bool) or not isinstance(clear, bool):
                raise APIError("chat_template_kwargs.enable_thinking / clear_thinking must be booleans",
                               param="chat_template_kwargs")  # fmt: skip
            messages = [chat._message_dict(m) for m in body.messages]
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            try:
                ids = tok.apply_chat_template(messages, tools=tools, enable_thinking=enable, clear_thinking=clear,
                                              add_generation_prompt=body.add_generation_prompt,
                                              return_loss_mask=False)  # fmt: skip
            except ValueError as exc:
                raise APIError(str(exc), param="messages") from None
        strs = [state.token_str(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state = st()
        state.check_model(body.model)
        vocab = state.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=False))

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> TokenizerInfo:
        state = st()
        tok = state.tokenizer
        eos = tok.id_to_token(tok.eos_token_id) if tok.eos_token_id is not None else None
        pad = tok.id_to_token(tok.pad_token_id) if tok.pad_token_id is not None else None
        return TokenizerInfo(eos_token=eos, pad_token=pad, model_max_length=state.max_model_len,
                             vocab_size=tok.vocab_size)  # fmt: skip

    @app.get("/health")
    async def health() -> Response:
        state = st()
        if state.draining:
            return _error(503, "shutting down", code="shutting_down")
        return JSONResponse({"status": "ok", "num_pending": state.num_pending})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(st().metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _sse(stream: Any, ticket: Any) -> StreamingResponse:
    from starlette.background import BackgroundTask

    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(ticket.release))  # fmt: skip


__all__ = ["ServerConfig", "create_app"]
