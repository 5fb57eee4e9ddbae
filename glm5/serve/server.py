"""Running the server: `serve(...)` (what `glm5 serve` calls: load, then uvicorn in the foreground) and
`ServerThread` (uvicorn on a loopback socket in a background thread, for tests, benchmarks and notebooks).

Shutdown drains, then exits. On the first SIGTERM/SIGINT (or `ServerThread.stop()`) the server keeps listening:
/health answers 503 (load balancers take the replica out), new generation requests get 503 + Retry-After, and the
admitted ones (streams included) run to the end. When none is left, or after `graceful_timeout_s`, uvicorn stops
accepting, lets open responses end and the app's lifespan stops the engine. Generations still running at the
timeout are aborted: their clients get 503 (a stream: an in-stream error event), so they can retry elsewhere.
A second signal skips the wait; a third SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any

import uvicorn

from glm5.engine import LLM, AsyncLLMEngine
from glm5.serve.app import create_app
from glm5.serve.core import ServerConfig
from glm5.serve.scripted import ScriptedOutputs, load_script
from glm5.tokenizer import GLM5Tokenizer

log = logging.getLogger("glm5.serve")

ABORT_GRACE_S = 5.0
"""After the graceful timeout, how long aborted requests get to send their 503 before uvicorn cancels them."""


def build_engine(
    model: Any,
    tokenizer: Any = None,
    *,
    scripted: Any = None,
    dtype: Any = None,
    device: Any = None,
    fp8: str | None = None,
    **engine_options: Any,
) -> AsyncLLMEngine:
    """An `AsyncLLMEngine` over a checkpoint folder or model; `scripted` (a JSON path or a list of
    {"match", "output"} entries) replays given outputs (glm5/serve/scripted.py)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = GLM5Tokenizer.from_pretrained(tokenizer)
    if scripted is not None:
        if tokenizer is None and isinstance(model, (str, os.PathLike)):
            if os.path.isfile(os.path.join(os.fspath(model), "tokenizer.json")):
                tokenizer = GLM5Tokenizer.from_pretrained(model)
        if tokenizer is None:
            raise ValueError(
                "scripted output needs a tokenizer (a checkpoint with tokenizer.json, or --tokenizer)"
            )
        engine_options["force_token"] = ScriptedOutputs(load_script(scripted), tokenizer)
    kwargs = {k: v for k, v in (("dtype", dtype), ("device", device), ("fp8", fp8)) if v is not None}
    # a token per step for streaming clients (LLM's offline default is OFFLINE_DECODE_STEPS)
    engine_options.setdefault("decode_steps", 1)
    return AsyncLLMEngine(LLM(model, tokenizer, **kwargs, **engine_options).engine)


def serve(
    engine: Any,
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout_s: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (blocking)."""
    app = create_app(engine, config)
    uconfig = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s
    )
    server = draining_server(uconfig, app, graceful_timeout_s)
    server.run()
    if server.engine_dead is not None:
        raise EngineFailed(server.engine_dead)


class EngineFailed(RuntimeError):
    """The engine died while serving (a rank of a multi-process engine): `glm5 serve` exits non-zero."""


def draining_server(config: Any, app: Any, graceful_timeout_s: float) -> Any:
    """A `uvicorn.Server` that drains before it shuts down (see the module docstring)."""

    class DrainingServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.state = getattr(getattr(app, "state", None), "server", None)  # glm5's ServerState, if any
            self.drain_deadline: float | None = None
            self.engine_dead: BaseException | None = None

        def drain(self) -> None:
            """Start draining (safe from a signal handler or another thread: it only sets flags)."""
            if self.drain_deadline is None:
                self.drain_deadline = time.monotonic() + graceful_timeout_s
            if self.state is not None:
                self.state.draining = True
            else:
                self.should_exit = True

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_deadline is None and not self.should_exit:
                self._captured_signals.append(sig)  # uvicorn re-raises it after the shutdown, as usual
                self.drain()
            else:
                super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.engine_dead is None and self.state is not None:
                check = getattr(self.state.engine, "check_alive", None)
                try:
                    if check is not None:
                        check()
                except Exception as exc:  # noqa: BLE001 - the engine is gone: answer 503 and exit non-zero
                    self.engine_dead = exc
                    log.error("the engine died (%s): answering 503 and shutting down", exc)
                    self.state.draining = True
                    self.config.timeout_graceful_shutdown = ABORT_GRACE_S
                    self.should_exit = True
            if self.drain_deadline is not None and not self.should_exit:
                left = self.drain_deadline - time.monotonic()
                if self.state.num_pending == 0:  # open responses (a stream's last bytes) get the time left
                    self.config.timeout_graceful_shutdown = max(left, ABORT_GRACE_S)
                    self.should_exit = True
                elif left <= 0:
                    await self.state.abort_all()
                    self.config.timeout_graceful_shutdown = ABORT_GRACE_S
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer()


class ServerThread:
    """`with ServerThread(app) as s: httpx.get(s.url + "/health")`: uvicorn on 127.0.0.1, a free port, in a thread.

    `stop()` drains and shuts down (the same path as SIGTERM: /health answers 503 meanwhile) and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", graceful_timeout_s: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s, lifespan="on"
        )
        self.server = draining_server(config, app, graceful_timeout_s)
        self.thread = threading.Thread(target=self._run, name=f"glm5-serve-{self.port}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()/stop()
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.drain()
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
