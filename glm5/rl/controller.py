"""The RL loop, on one screen (slime's train.py): sync, one-step-off and fully-async are configurations of it.

    for each step:
        [sync]  generate inline until B groups are ready        (overlap=False)
        batch = buffer.get_batch(B)                             (blocks; async: rollouts run on their own)
        trainer.train_step(batch)                               (version v -> v+1)
        transport.publish(weights, v+1); rollout.sync_weights   (drain | abort | in-place, per RolloutConfig)
        buffer.set_version(v+1)                                 (admission opens for the next groups)

eta = 0 with overlap=False is synchronous RL; eta = 1 with drain is one-step-off; eta >= 1 with overlap and
abort (partial rollouts) or in-place updates is fully asynchronous. The same objects run in one process or
behind Ray actor proxies (glm5/rl/actors.py): the loop only calls methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from glm5.engine.engine import EngineConfig
from glm5.eval.metrics import outcome_rates
from glm5.rl.buffer import DataBuffer, staleness_histogram
from glm5.rl.rollout import RolloutManager, make_rollout_engine, pareto_delay
from glm5.rl.trainer import RLTrainer
from glm5.rl.trainer_group import TrainerGroup
from glm5.rl.types import Sample
from glm5.rl.weight_sync import DiskTransport, ObjectStoreTransport, WeightTransport

if TYPE_CHECKING:
    from glm5.rl.recipes import RLRecipe


@runtime_checkable
class LoopBuffer(Protocol):
    """What the loop asks of the data buffer: glm5.rl.buffer.DataBuffer, or BufferProxy over Ray."""

    def batch_size(self) -> int: ...

    def num_ready(self) -> int: ...

    def get_batch(self, num_groups: int | None = None, timeout: float = 0.0) -> list[list[Sample]] | None: ...

    def set_version(self, version: int) -> None: ...

    def counts(self) -> dict[str, int]: ...


@runtime_checkable
class LoopRollout(Protocol):
    """What the loop asks of generation: glm5.rl.rollout.RolloutManager, or WorkerPool over Ray."""

    def sync_weights(self, transport: WeightTransport, version: int) -> None: ...

    def run_until(self, done: Callable[[], bool], timeout: float = 600.0) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check(self) -> None: ...

    def metrics(self) -> dict[str, float]: ...


@runtime_checkable
class LoopTrainer(Protocol):
    """What the loop asks of the trainer: glm5.rl.trainer.RLTrainer, glm5.rl.trainer_group.TrainerGroup (FSDP2
    over N processes), or TrainerProxy over Ray."""

    def weights(self) -> Any:
        """The current state dict (over Ray: an object-store reference to it)."""
        ...

    def train_step(self, groups: list[list[Sample]]) -> dict[str, Any]: ...


def batch_stats(groups: list[list[Sample]], version: int) -> dict[str, Any]:
    """Reward, accuracy, abstention and hallucination rates (`outcome_rates`), lengths, staleness."""
    samples = [s for g in groups for s in g]
    n = max(len(samples), 1)
    hist = staleness_histogram(groups, version)
    versions = [v for s in samples for v in s.trained_versions()]
    return {
        "reward": sum(float(s.reward) for s in samples) / n,
        **outcome_rates(samples),
        "response_len": sum(sum(s.loss_mask) for s in samples) / n,
        "staleness": {str(k): v for k, v in hist.items()},
        "staleness_mean": sum(k * v for k, v in hist.items()) / max(sum(hist.values()), 1),
        "staleness_max": max(hist, default=0),
        "min_token_version": min(versions, default=version),
        "max_token_version": max(versions, default=version),
        "num_samples": len(samples),
    }


def run_loop(
    buffer: LoopBuffer,
    rollout: LoopRollout,
    trainer: LoopTrainer,
    transport: WeightTransport,
    *,
    steps: int,
    overlap: bool,
    start_version: int = 0,
    update_every: int = 1,
    on_step: Callable[[dict[str, Any], list[list[Sample]]], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    max_wait_s: float = 600.0,
) -> list[dict[str, Any]]:
    """Train until the trainer reaches version `steps`; returns one metrics record per step.

    The collaborators are whatever satisfies LoopBuffer, LoopRollout, LoopTrainer and WeightTransport: the
    in-process objects (build_local) or their Ray proxies (glm5.rl.actors.build_ray). `on_step(record, batch)`
    sees every step (progress, logs, test assertions); `checkpoint(version)` is called every
    `checkpoint_every` steps after the weights are synced and the buffer's version set.
    """
    version = start_version
    batch_size = buffer.batch_size()
    transport.publish(trainer.weights(), version)  # engines start from the trainer's weights
    rollout.sync_weights(transport, version)
    buffer.set_version(version)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    samples_done = 0
    if overlap:
        rollout.start()
    try:
        while version < steps:
            t0 = time.perf_counter()
            rollout.check()  # surfaces rollout errors; over Ray, replaces dead workers (with current weights)
            if not overlap:
                rollout.run_until(lambda: buffer.num_ready() >= batch_size, timeout=max_wait_s)
            batch = buffer.get_batch(batch_size, timeout=0.5)
            while batch is None:  # the trainer sleeps on the buffer's condition, it does not spin
                rollout.check()
                if time.perf_counter() - t0 > max_wait_s:
                    raise TimeoutError(f"no training batch within {max_wait_s:.0f} s: {buffer.counts()}")
                batch = buffer.get_batch(batch_size, timeout=0.5)
            t_data = time.perf_counter() - t0
            stats = batch_stats(batch, version)
            metrics = trainer.train_step(batch)
            version += 1
            if version % update_every == 0 or version == steps:
                transport.publish(trainer.weights(), version)
                rollout.sync_weights(transport, version)
            buffer.set_version(version)
            samples_done += stats["num_samples"]
            elapsed = time.perf_counter() - started
            record = {
                "kind": "rl",
                "step": version - 1,
                "version": version,
                **stats,
                **metrics,
                "wait_s": t_data,
                "step_s": time.perf_counter() - t0,
                "elapsed_s": elapsed,
                "samples_per_s": samples_done / max(elapsed, 1e-9),
                **rollout.metrics(),
                **{f"buffer_{k}": v for k, v in buffer.counts().items()},
            }
            records.append(record)
            if on_step is not None:
                on_step(record, batch)
            if checkpoint is not None and checkpoint_every and version % checkpoint_every == 0:
                checkpoint(version)
    finally:
        if overlap:
            rollout.stop()
    return records


def build_local(recipe: RLRecipe, task: dict[str, Any], out: str | None = None) -> dict[str, Any]:
    """The in-process system of a recipe (buffer, engine + rollout manager, trainer, weight transport) around
    the policy and prompts of `task` (glm5.rl.recipes.build_task)."""
    buffer_cfg, rollout_cfg, trainer_cfg = recipe.configs()
    policy = task["model"]
    engine, engine_factory = make_rollout_engine(  # its own copy of the policy (one or several processes)
        policy,
        task["tokenizer"],
        EngineConfig(block_size=16, num_blocks=1024, max_num_seqs=256, seed=recipe.seed),
        recipe.rollout_parallel,
        out,
    )
    buffer = DataBuffer(task["prompts"], buffer_cfg)
    delay = pareto_delay(**recipe.delay, seed=recipe.seed) if recipe.delay else None
    rollout = RolloutManager(
        engine,
        buffer,
        task["reward_fn"],
        rollout_cfg,
        tokenizer=task["tokenizer"],
        reply_fn=task["reply_fn"],
        env=task["env"],
        delay_fn=delay,
        engine_factory=engine_factory,
    )
    if recipe.trainer_procs > 1:  # FSDP2 (+ EP) in its own processes: this one may hold the engine's group
        trainer: Any = TrainerGroup(policy, trainer_cfg, recipe.trainer_procs, reference=True)
    else:
        trainer = RLTrainer(policy, trainer_cfg)
    if recipe.transport == "disk":
        transport: WeightTransport = DiskTransport(f"{out or '.'}/weights")
    else:
        transport = ObjectStoreTransport(use_ray=False)
    return {
        "buffer": buffer,
        "engine": engine,
        "rollout": rollout,
        "trainer": trainer,
        "transport": transport,
    }
