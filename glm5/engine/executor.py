"""Executors: how the engine runs each step's `SchedulerOutput` on its model runner(s).

`UniProcExecutor` is the single-process path: one `ModelRunner` in this process, called directly. A
multi-process executor implements the same interface for a model sharded over several devices: it starts one
worker per device, each with a `ModelRunner` over its shard of the model and its own cache storage; `execute`
broadcasts the SchedulerOutput to every worker (it is plain, picklable data, and the only input a runner needs:
the workers keep identical per-sequence state) and returns one worker's `ModelRunnerOutput` (the others
sample the same tokens). `update_weights` sends each worker its shard. That is `MultiProcExecutor` in
glm5/engine/multiproc.py. See docs/engine.md.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from glm5.engine.config import EngineConfig
from glm5.engine.runner import ModelRunner, ModelRunnerOutput
from glm5.engine.scheduler import SchedulerOutput


class Executor(abc.ABC):
    """Runs SchedulerOutputs on the model. `num_blocks` and the bytes per block are the cache size the runners
    allocated, which the scheduler plans with."""

    num_blocks: int
    bytes_per_block: int
    """The main cache's bytes per block (every layer of it)."""
    mtp_bytes_per_block: int
    """The MTP layer's cache's (0 without speculative decoding)."""

    @abc.abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step."""

    @abc.abstractmethod
    def update_weights(self, state_dict: dict[str, torch.Tensor], hf_names: bool = False) -> None:
        """Load new weights between steps (validated before anything changes)."""

    def shutdown(self) -> None:  # noqa: B027 (optional: an in-process runner has nothing to release)
        """Release the runners (worker processes, device memory)."""

    # --- the runner in this process (rank 0's for a multi-process executor; None when all run elsewhere) ---
    _runner: ModelRunner | None = None

    def _adopt(self, runner: ModelRunner) -> None:
        """Hold the in-process runner; the cache sizes the scheduler plans with are its."""
        self._runner = runner
        self.num_blocks = runner.num_blocks
        self.bytes_per_block = runner.cache.bytes_per_block
        self.mtp_bytes_per_block = 0 if runner.mtp_cache is None else runner.mtp_cache.bytes_per_block

    @property
    def model(self) -> Any:
        return None if self._runner is None else self._runner.model

    @property
    def runner(self) -> ModelRunner | None:
        return self._runner

    def seq_state(self, seq_id: int) -> Any:
        """The runner's state of a sequence, when the runner is in this process (for tests and debugging)."""
        return None if self._runner is None else self._runner.seqs.get(seq_id)


class UniProcExecutor(Executor):
    """One `ModelRunner` in this process: `execute` is a direct call."""

    def __init__(self, model: Any, config: EngineConfig, num_blocks: int | None = None) -> None:
        self._adopt(ModelRunner(model, config, num_blocks))

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._runner.execute(scheduler_output)

    def update_weights(self, state_dict: dict[str, torch.Tensor], hf_names: bool = False) -> None:
        self._runner.update_weights(state_dict, hf_names)


def make_executor(model: Any, config: EngineConfig) -> Executor:
    """The executor for an in-memory model: `UniProcExecutor`. (A sharded model's `MultiProcExecutor`,
    glm5/engine/multiproc.py, is built from a checkpoint folder by `LLM(path, tensor_parallel_size=...)` and
    handed to `LLMEngine(..., executor=...)`.)"""
    return UniProcExecutor(model, config)
