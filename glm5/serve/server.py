"""Running the server: `serve(...)` (what `glm5 serve` calls: load, then uvicorn in the foreground) and
`ServerThread` (uvicorn on a loopback socket in a background thread, for tests, benchmarks and notebooks).

Shutdown is graceful: on SIGINT/SIGTERM uvicorn stops accepting, lets open responses (streams included) finish
within `graceful_timeout_s`, then the app's lifespan waits for remaining generations and stops the engine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

from glm5.serve.core import ServerConfig


def build_engine(
    model: Any,
    tokenizer: Any = None,
    *,
    scripted: Any = None,
    dtype: Any = None,
    device: Any = None,
    fp8: str | None = None,
    **engine_options: Any,
) -> Any:
    """An `AsyncLLMEngine` over a checkpoint folder or model; `scripted` (a JSON path or a list of
    {"match", "output"} entries) replays given outputs (glm5/serve/scripted.py)."""
    from glm5.engine import LLM, AsyncLLMEngine
    from glm5.tokenizer import GLM5Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = GLM5Tokenizer.from_pretrained(tokenizer)
    if scripted is not None:
        from glm5.serve.scripted import ScriptedOutputs, load_script

        if tokenizer is None and isinstance(model, (str, os.PathLike)):
            if os.path.isfile(os.path.join(os.fspath(model), "tokenizer.json")):
                tokenizer = GLM5Tokenizer.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("scripted output needs a tokenizer (a checkpoint with tokenizer.json, or --tokenizer)")
        engine_options["force_token"] = ScriptedOutputs(load_script(scripted), tokenizer)
    kwargs = {k: v for k, v in (("dtype", dtype), ("device", device), ("fp8", fp8)) if v is not None}
    return AsyncLLMEngine(LLM(model, tokenizer, **kwargs, **engine_options).engine)


def serve(engine: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 30.0, log_level: str = "info") -> None:  # fmt: skip
    """Serve until interrupted (blocking)."""
    import uvicorn

    from glm5.serve.app import create_app

    app = create_app(engine, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s)


class ServerThread:
    """`with ServerThread(app) as s: httpx.get(s.url + "/health")`: uvicorn on 127.0.0.1, a free port, in a thread.

    `stop()` asks for the graceful shutdown (the same path as SIGTERM) and waits for it.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", graceful_timeout_s: float = 30.0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_timeout_s,
                                lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
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
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
