"""asyncio front end of the engine for servers: `async for delta in engine.generate(prompt, params)`.

One background task drives `LLMEngine.step()` in a worker thread (so the event loop keeps serving while the
model runs) and routes each step's deltas to per-request queues. A request whose consumer stops iterating
(client disconnect, `break`, cancellation) is aborted and its blocks freed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import torch

from glm5.engine.engine import LLMEngine, Prompt
from glm5.engine.llm import LLM
from glm5.engine.multiproc import EngineDeadError
from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling import SamplingParams


class AsyncLLMEngine:
    """Wraps an `LLMEngine`; every method is called from the event loop (the engine's own thread-safety
    covers the step running in a worker thread meanwhile)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._closed = False
        self.dead: BaseException | None = None
        """The error that killed the engine (a multi-process engine's rank died: EngineDeadError), else None."""

    @classmethod
    def from_model(cls, model_or_path: Any, tokenizer: Any = None, **options: Any) -> AsyncLLMEngine:
        """Build the engine like `LLM(model_or_path, tokenizer, **options)`."""
        return cls(LLM(model_or_path, tokenizer, **options).engine)

    # --- requests --------------------------------------------------------------------------------
    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas (new tokens / text / logprobs per completion); the last has finished=True."""
        self.check_alive()
        if self._closed:
            raise RuntimeError("the engine has been shut down")
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        request = self.engine.make_request(request_id, prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.engine.submit(request)
        self._ensure_loop()
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)
                self._wake.set()

    def check_alive(self) -> None:
        """Raise the engine's fatal error (EngineDeadError) if it has one; also polls a multi-process executor."""
        if self.dead is None:
            check = getattr(self.engine.executor, "check_alive", None)
            if check is not None:
                try:
                    check()
                except Exception as exc:  # noqa: BLE001 - kept and raised to every caller
                    self._die(exc)
        if self.dead is not None:
            raise self.dead

    def _die(self, exc: BaseException) -> None:
        self.dead = exc
        for queue in self._queues.values():
            queue.put_nowait(exc)
        if self._wake is not None:
            self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        if self._wake is not None:
            self._wake.set()

    async def pause(self) -> None:
        """Stop scheduling (requests keep their state); e.g. while the RL trainer pushes weights."""
        self.engine.pause()

    async def resume(self) -> None:
        self.engine.resume()
        if self._wake is not None:
            self._wake.set()

    async def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int | None = None, hf_names: bool = False
    ) -> int:
        """Load weights between steps (in a worker thread: the event loop keeps running)."""
        return await asyncio.to_thread(self.engine.update_weights, state_dict, version, hf_names)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Stop the background loop; running requests are aborted."""
        self._closed = True
        if self.dead is None:
            self.engine.abort_request(list(self.engine.requests) + list(self._queues))
            if self._task is not None:
                self._wake.set()
                await self._task
                self._task = None
        await asyncio.to_thread(self.engine.shutdown)  # worker processes of a multi-process engine

    # --- the loop --------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        engine = self.engine
        while True:
            if self.dead is not None or (self._closed and not engine.has_unfinished_requests()):
                return
            # paused: only queued adds/aborts are applied (a step does nothing else), so aborts free blocks
            if not engine.has_unfinished_requests() or (engine.paused and not engine.has_queued_work()):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(engine.step)
            except EngineDeadError as exc:  # a rank died: fail every stream, and the engine for good
                self._die(exc)
                return
            except Exception as exc:  # a bug or an out-of-memory: fail every waiting stream, keep serving
                for queue in self._queues.values():
                    queue.put_nowait(exc)
                await asyncio.to_thread(self._abort_all)
                continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def _abort_all(self) -> None:
        self.engine.abort_request(list(self.engine.requests))
        self.engine.step()
