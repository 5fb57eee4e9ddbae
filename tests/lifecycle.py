"""Deterministic request lifecycles for tests of aborts, disconnects and shutdown: generation that is held still
instead of merely slow, so no assertion depends on how fast this machine decodes.

`HoldAfter(n)` is an `EngineConfig.force_token` hook (it replaces no token unless given `token`): when a request
samples its `n`-th token, the hook pauses the engine. That token is still appended and streamed; no further token
is produced until the engine is resumed, while queued adds and aborts are still applied (a paused step does only
that), so a client that goes away is aborted and its blocks freed with the request demonstrably unfinished.

`ManualClock` stands in for the `time` module of code that emulates slow generation by the clock (the RL
rollout's per-token delays), so what is visible at an abort is set by the test, not by the machine's speed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class HoldAfter:
    """Pause the engine once a request has produced `n` tokens (see the module docstring).

    `produced[tuple(prompt ids)]` is the most tokens a request with that prompt reached; `held` is set while
    the engine is held. Attach the engine after building it: `hold.attach(llm_engine)`."""

    def __init__(self, n: int, token: int | None = None) -> None:
        self.n = n
        self.token = token  # emitted instead of the sampled token (e.g. so that no stop token ends a request)
        self.engine: Any = None
        self.armed = True
        self.produced: dict[tuple[int, ...], int] = {}
        self.held = threading.Event()

    def attach(self, engine: Any) -> HoldAfter:
        self.engine = engine
        return self

    def __call__(self, prompt_ids: list[int], output_ids: list[int]) -> int | None:
        count = len(output_ids) + 1  # including the token being sampled now
        key = tuple(prompt_ids)
        self.produced[key] = max(self.produced.get(key, 0), count)
        if self.armed and count >= self.n:
            self.engine.pause()
            self.held.set()
        return self.token

    def wait_held(self, timeout: float = 30.0) -> None:
        assert self.held.wait(timeout), f"no request reached {self.n} tokens within {timeout} s"

    def resume(self, keep_armed: bool = True) -> None:
        """Un-pause the engine (from any thread; an `AsyncLLMEngine` notices at its next request or wake-up).
        With keep_armed the next request is held again at `n` tokens."""
        self.armed = keep_armed
        self.held.clear()
        self.engine.resume()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll until `condition()` holds: for events that *will* happen (an abort being applied), never as a way
    to let time pass. The timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.01)


class ManualClock:
    """Stands in for the `time` module of code that measures time (e.g. the RL rollout's emulated per-token
    delays: `monkeypatch.setattr(glm5.rl.rollout, "time", clock)`): time moves only when the test sets or
    advances it, and `sleep` advances it by the time asked instead of waiting, so an idle loop still progresses.
    What a test sees at a given clock reading is then exact, however fast or loaded the machine is."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    perf_counter = time = monotonic

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds
