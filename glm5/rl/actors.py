"""Thin Ray actor wrappers of the plain classes (docs/rl.md § Ray actors), and the driver-side proxies that let the same
`run_loop` drive them.

    DataBuffer      -> a threaded actor (num_cpus=0): leases, completions and a blocking get_batch at once
    RolloutWorker   -> an actor (num_cpus=0.5) holding an LLMEngine + RolloutManager whose buffer is a proxy
                       of the buffer actor; it generates on a background thread
    RLTrainer       -> an actor (num_cpus=1); its weights go to the object store once per version

Placement: the rollout workers and the trainer are scheduled into one placement group (`place_actors`), a bundle
per rank (0.5 CPU per rollout worker, 1 CPU for the trainer), PACK by default (STRICT_PACK: one node, or fail),
so the system's resources are reserved at once or the run stops with the shortfall named. A replacement worker
takes its dead predecessor's bundle.

Fault tolerance: leases live in the buffer actor, not in the worker. `WorkerPool.check()` (called by the loop
every step) pings the workers; a dead one's leases are requeued (`release_worker`), and a replacement is
created, given the *current* weights, and only then started. Each actor calls torch.set_num_threads(1).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any


def _ray() -> Any:
    try:
        import ray  # lazy: optional dependency
    except ImportError as exc:
        raise ValueError("--ray needs the `ray` package: pip install ray") from exc
    return ray


def init_local_ray(num_cpus: int = 2) -> None:
    ray = _ray()
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


class RemoteProxy:
    """Calls an actor's methods synchronously: proxy.method(...) == ray.get(actor.method.remote(...))."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __getattr__(self, name: str) -> Any:
        ray = _ray()
        method = getattr(self.handle, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


class _BufferHost:
    """The DataBuffer inside an actor."""

    def __init__(self, prompts: list[dict], config: Any) -> None:
        import torch  # lazy: worker process only

        from glm5.rl.buffer import DataBuffer  # lazy: worker process only

        torch.set_num_threads(1)
        self.buffer = DataBuffer(prompts, config)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.buffer, name)(*args, **kwargs)


class BufferProxy:
    """Driver- and worker-side view of the buffer actor with DataBuffer's method names."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __getattr__(self, name: str) -> Any:
        ray = _ray()
        return lambda *args, **kwargs: ray.get(self.handle.call.remote(name, *args, **kwargs))


class RolloutWorker:
    """One engine + rollout manager (an actor). `model_config` and `state` rebuild the policy in the actor."""

    def __init__(
        self,
        name: str,
        model_config: Any,
        state: dict,
        tokenizer: Any,
        buffer_handle: Any,
        reward_fn: Any,
        rollout_config: Any,
        reply_fn: Any,
        env: Any,
        delay_fn: Any,
        seed: int,
    ) -> None:
        import torch  # lazy: worker process only

        from glm5.engine.engine import EngineConfig, LLMEngine  # lazy: worker process only
        from glm5.model import GLM5ForCausalLM  # lazy: worker process only
        from glm5.rl.rollout import RolloutManager  # lazy: worker process only

        torch.set_num_threads(1)
        model = GLM5ForCausalLM(model_config)
        model.load_state_dict(state)
        engine = LLMEngine(
            model, tokenizer, EngineConfig(block_size=16, num_blocks=1024, max_num_seqs=256, seed=seed)
        )
        self.name = name
        self.manager = RolloutManager(
            engine,
            BufferProxy(buffer_handle),
            reward_fn,
            rollout_config,
            tokenizer=tokenizer,
            reply_fn=reply_fn,
            env=env,
            delay_fn=delay_fn,
            worker=name,
        )

    def ping(self) -> int:
        return self.manager.engine.weight_version

    def update_weights(self, state: dict, version: int) -> int:
        self.manager.update_weights(state, version)
        return version

    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop()

    def check(self) -> None:
        self.manager.check()

    def metrics(self) -> dict:
        return self.manager.metrics()

    def crash(self) -> None:
        """Fault injection for tests: the process dies mid-generation."""
        os._exit(1)

    def placement_group_id(self) -> str | None:
        return _placement_group_id()


def _placement_group_id() -> str | None:
    """The hex id of the placement group this actor was scheduled in (None: outside any)."""
    pg = _ray().util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


WORKER_CPUS = 0.5
"""CPUs of a rollout worker's bundle."""
TRAINER_CPUS = 1.0
"""CPUs of the trainer's bundle."""
STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def place_actors(
    num_workers: int,
    strategy: str = "PACK",
    timeout: float = 60.0,
    trainer_ranks: int = 1,
    trainer_cpus: float = TRAINER_CPUS,
) -> Any:
    """A ready placement group with one bundle per rollout worker (bundles 0..N-1) and one per trainer rank
    (bundles N..N+R-1, `trainer_cpus` each); ValueError naming the shortfall when the cluster cannot hold it."""
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group  # lazy: optional dependency

    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    bundles = [{"CPU": WORKER_CPUS} for _ in range(num_workers)] + [
        {"CPU": trainer_cpus} for _ in range(trainer_ranks)
    ]
    pg = placement_group(bundles, strategy=strategy, name="glm5-rl")
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(pg)
        need = sum(b["CPU"] for b in bundles)
        have = ray.cluster_resources().get("CPU", 0)
        raise ValueError(
            f"the RL placement group ({num_workers} rollout bundles of {WORKER_CPUS} CPU + {trainer_ranks} "
            f"trainer bundles of {trainer_cpus:g} CPU = {need:g} CPUs, {strategy}) could not be placed within "
            f"{timeout:.0f} s; the Ray cluster has {have:g} CPUs: give it more (ray.init(num_cpus=...)) or use "
            "fewer rollout workers or trainer ranks"
        )
    return pg


def _in_bundle(pg: Any, index: int) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # lazy: optional dependency

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index
        )
    }


class WorkerPool:
    """The driver's handle on N rollout worker actors, with RolloutManager's loop-facing methods."""

    def __init__(self, make_worker: Any, num_workers: int, buffer: Any) -> None:
        self.make_worker, self.buffer = make_worker, buffer
        self.workers = {f"w{i}": make_worker(f"w{i}") for i in range(num_workers)}
        self.version: int | None = None
        self.transport: Any = None
        self.running = False
        self.replaced: list[dict] = []
        self._generation = 0

    def sync_weights(self, transport: Any, version: int) -> None:
        ray = _ray()
        self.transport, self.version = transport, version
        ref = transport.versions[version]
        # ref resolved by Ray
        pending = [w.update_weights.remote(ref, version) for w in self.workers.values()]
        for done in pending:
            try:
                ray.get(done)
            except ray.exceptions.RayActorError:
                pass  # died before or during the update: check() replaces it and loads these weights first

    def start(self) -> None:
        _ray().get([w.start.remote() for w in self.workers.values()])
        self.running = True

    def stop(self) -> None:
        ray = _ray()
        for w in self.workers.values():
            try:
                ray.get(w.stop.remote())
            except ray.exceptions.RayActorError:
                pass
        self.running = False

    def check(self) -> None:
        """Replace dead workers: requeue their leases, create a new actor, load the current weights, start it."""
        ray = _ray()
        for name, w in list(self.workers.items()):
            try:
                ray.get(w.check.remote(), timeout=30)
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            lost = self.buffer.release_worker(name)
            self._generation += 1
            new_name = f"{name.split('-')[0]}-r{self._generation}"
            del self.workers[name]
            fresh = self.make_worker(new_name)
            if self.version is not None:
                ray.get(fresh.update_weights.remote(self.transport.versions[self.version], self.version))
            served_version = ray.get(fresh.ping.remote())
            if self.running:
                ray.get(fresh.start.remote())
            self.workers[new_name] = fresh
            self.replaced.append(
                {
                    "dead": name,
                    "replacement": new_name,
                    "requeued_leases": lost,
                    "version_before_serving": served_version,
                    "trainer_version": self.version,
                }
            )

    def run_until(self, done: Any, timeout: float = 600.0) -> None:
        raise ValueError(
            "over Ray, generation always runs on the workers' threads: use overlap=True "
            "(eta = 0 still gives synchronous RL)"
        )

    def metrics(self) -> dict:
        ray = _ray()
        out: dict[str, float] = {}
        for w in self.workers.values():
            try:
                for k, v in ray.get(w.metrics.remote(), timeout=30).items():
                    out[k] = out.get(k, 0.0) + v if not k.startswith("gen_time") else max(out.get(k, 0.0), v)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
        if "rollout_reward" in out:
            out["rollout_reward"] /= max(1, len(self.workers))
        return out

    def sync_local(self, local_rollout: Any, transport: Any, version: int) -> None:
        local_rollout.sync_weights(transport, version)

    def kill(self, name: str) -> None:
        _ray().kill(self.workers[name])


class TrainerProxy:
    """The trainer actor seen by the loop: `weights()` returns the object-store ref the actor produced (the
    bytes never pass through the driver)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def weights(self) -> Any:
        return self.handle.weights.remote()

    def __getattr__(self, name: str) -> Any:
        ray = _ray()
        method = getattr(self.handle, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


class _TrainerHost:
    def __init__(self, model: Any, config: Any) -> None:
        import torch  # lazy: worker process only

        from glm5.rl.trainer import RLTrainer  # lazy: worker process only

        torch.set_num_threads(1)
        self.trainer = RLTrainer(model, config)

    def weights(self) -> dict:
        return self.trainer.weights()

    def train_step(self, batch: list) -> dict:
        return self.trainer.train_step(batch)

    def save(self, folder: str, buffer_state: dict, extra: dict | None = None) -> str:
        return self.trainer.save(folder, buffer_state, extra)

    def load(self, folder: str) -> dict | None:
        return self.trainer.load(folder)

    def placement_group_id(self) -> str | None:
        return _placement_group_id()


def build_ray(
    recipe: Any,
    task: dict[str, Any],
    local: dict[str, Any],
    num_workers: int = 1,
    placement: str = "PACK",
    trainer_cpus: float = TRAINER_CPUS,
) -> dict[str, Any]:
    """The Ray system of a recipe: buffer, `num_workers` rollout workers and the trainer as actors placed in one
    placement group (`place_actors`, strategy `placement`): with `recipe.trainer_procs` > 1 the trainer is a
    RayTrainerGroup, one FSDP2 rank per bundle of `trainer_cpus`. `local` is the in-process system (its engine
    serves the driver's held-out evaluation)."""
    procs = int(getattr(recipe, "trainer_procs", 1))
    init_local_ray(max(2, math.ceil(num_workers * WORKER_CPUS + procs * trainer_cpus)))  # unless already up
    ray = _ray()
    pg = place_actors(num_workers, placement, trainer_ranks=procs, trainer_cpus=trainer_cpus)
    from glm5.rl.rollout import pareto_delay  # lazy: worker process only
    from glm5.rl.weight_sync import ObjectStoreTransport  # lazy: worker process only

    buffer_cfg, rollout_cfg, trainer_cfg = recipe.configs()
    buffer_handle = ray.remote(num_cpus=0, max_concurrency=16)(_BufferHost).remote(
        task["prompts"], buffer_cfg
    )
    buffer = BufferProxy(buffer_handle)
    model = task["model"]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delay = pareto_delay(**recipe.delay, seed=recipe.seed) if recipe.delay else None
    worker_cls = ray.remote(num_cpus=0.5, max_concurrency=4, max_restarts=0)(RolloutWorker)

    def make_worker(name: str) -> Any:  # "w3" and its replacements "w3-rK" use bundle 3
        bundle = int(name.split("-")[0][1:])
        return worker_cls.options(**_in_bundle(pg, bundle)).remote(
            name,
            model.config,
            state,
            task["tokenizer"],
            buffer_handle,
            task["reward_fn"],
            rollout_cfg,
            task["reply_fn"],
            task["env"],
            delay,
            recipe.seed,
        )

    pool = WorkerPool(make_worker, num_workers, buffer)
    if procs > 1:
        from glm5.rl.trainer_group import RayTrainerGroup  # lazy: worker process only

        trainer: Any = RayTrainerGroup(
            model, trainer_cfg, procs, pg, num_workers, trainer_cpus, reference=True
        )
    else:
        trainer_cls = ray.remote(num_cpus=trainer_cpus)(_TrainerHost)
        trainer = TrainerProxy(trainer_cls.options(**_in_bundle(pg, num_workers)).remote(model, trainer_cfg))

    def shutdown() -> None:
        from ray.util.placement_group import remove_placement_group  # lazy: optional dependency

        for w in pool.workers.values():
            ray.kill(w)
        if procs > 1:
            trainer.shutdown()
        else:
            ray.kill(trainer.handle)
        time.sleep(0.1)
        remove_placement_group(pg)

    return {
        "buffer": buffer,
        "rollout": pool,
        "trainer": trainer,
        "transport": ObjectStoreTransport(use_ray=True),
        "engine": local["engine"],
        "local_rollout": local["rollout"],
        "shutdown": shutdown,
        "placement": {"id": pg.id.hex(), "strategy": placement, "bundles": pg.bundle_specs},
    }
