"""The RL trainer as a group of processes: FSDP2 (+ expert parallel) over N ranks (`glm5 rl --trainer-procs N`).

The rollout engine's front rank owns the one default process group the controller process may have, so the
sharded trainer runs in its own processes (spawned, like the engine's MultiProcExecutor): gloo on CPU, NCCL on
CUDA. Every rank holds the policy under glm5/train/parallel.py (`parallelize`: expert parallel over all ranks
when the experts divide evenly, then `fully_shard`) and an `RLTrainer` around it, which computes the loss on its
contiguous share of each batch (advantages and the loss normaliser are global, gradients are summed by FSDP), so
N ranks take the step one process takes on the whole batch.

The controller talks to every rank through a pipe: one command at a time (train_step, weights, save, load,
logprobs, stop), each rank answers; rank 0's answer is the result. `weights()` gathers the full state dict on
rank 0 (`full_state_dict`), which the controller publishes through the usual transports. A rank that dies or
fails turns the next (or current) call into `TrainerDeadError` naming the rank; the others are stopped, nothing
waits on a collective that cannot finish. Checkpoints are DCP (glm5/train/state.py): every rank writes its shards,
and a checkpoint of N ranks loads into any other number of ranks or a one-process `RLTrainer`.
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing as mp
import os
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any

import torch

from glm5.engine.multiproc import _free_port
from glm5.model import GLM5ForCausalLM
from glm5.rl.trainer import RLTrainer, TrainerConfig, load_rl_checkpoint, save_rl_checkpoint
from glm5.rl.types import Sample
from glm5.train.optim import is_indexer_param
from glm5.train.parallel import full_state_dict, init_distributed, parallelize, shutdown

STARTUP_TIMEOUT_S = 300.0
"""Seconds the ranks may take to join the process group and shard the model."""


class TrainerDeadError(RuntimeError):
    """A rank of the trainer group died or failed: the run cannot continue (resume from the last checkpoint)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


@dataclasses.dataclass
class _Spec:
    """What every rank needs (picklable; the initial weights follow over the pipe)."""

    model_config: Any
    trainer: TrainerConfig
    world_size: int
    ep_size: int
    port: int
    reference: bool
    threads: int = 1


_SAMPLE_KEY = "__glm5_sample__"


def _encode(obj: Any) -> Any:
    """Samples as their plain dicts, so the pipe carries only what `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, Sample):
        return {_SAMPLE_KEY: obj.to_dict()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_SAMPLE_KEY}:
            return Sample.from_dict(obj[_SAMPLE_KEY])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(x) for x in obj)
    return obj


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(_encode(obj), buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    """Never unpickles arbitrary objects: tensors, containers and plain values only (Samples travel as dicts)."""
    raw = io.BytesIO(data)
    return _decode(torch.load(raw, weights_only=True))


def expert_parallel_size(model_config: Any, procs: int) -> int:
    """All ranks when the routed experts split evenly over them, else 1 (FSDP only)."""
    experts = int(getattr(model_config, "n_routed_experts", 0) or 0)
    return procs if experts and experts % procs == 0 else 1


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


class TrainerRank:
    """One rank of a trainer group: joins the process group (env:// from `spec`), shards the policy and runs the
    controller's commands. Lives in a spawned process (`_rank_main`) or in a Ray actor (`RayTrainerGroup`)."""

    def __init__(
        self, spec: _Spec, rank: int, state: dict[str, torch.Tensor], master_addr: str = "127.0.0.1"
    ):

        torch.set_num_threads(spec.threads)
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(spec.world_size),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(spec.port),
        )
        self.rank = rank
        self.ctx = ctx = init_distributed(spec.ep_size)
        model = GLM5ForCausalLM(spec.model_config)
        model.load_state_dict(state)
        ref = None
        if spec.reference:  # the frozen starting policy of a KL term: a whole copy per rank, no collectives
            ref = GLM5ForCausalLM(spec.model_config)
            ref.load_state_dict(state)
            ref = ref.to(ctx.device).requires_grad_(False).eval()
        for name, p in model.named_parameters():
            if is_indexer_param(name):  # frozen before sharding, as RLTrainer freezes it
                p.requires_grad_(False)
        self.model = parallelize(model.to(ctx.device), ctx, activation_checkpointing=False)
        self.trainer = RLTrainer(self.model, spec.trainer, ref_model=ref)
        self.trainer.dist = ctx

    def ready(self) -> int:
        return os.getpid()

    def call(self, cmd: str, args: tuple) -> Any:
        """Run one command (every rank runs the same one: they meet in FSDP's collectives)."""
        trainer = self.trainer
        if cmd == "train_step":
            return trainer.train_step(*args)
        if cmd == "weights":
            full = full_state_dict(self.model, self.ctx)
            return full if self.rank == 0 else None
        if cmd == "logprobs":
            return trainer.logprobs(*args)
        if cmd == "save":
            return str(save_rl_checkpoint(args[0], trainer, args[1], args[2]))
        if cmd == "load":
            return load_rl_checkpoint(args[0], trainer)
        if cmd == "fail":  # tests: a rank that raises mid-run
            raise RuntimeError(f"failure injected on rank {self.rank}")
        raise ValueError(f"unknown trainer command {cmd!r}")

    def placement_group_id(self) -> str | None:
        import ray  # lazy: optional dependency

        pg = ray.util.get_current_placement_group()
        return pg.id.hex() if pg is not None else None

    def close(self) -> None:

        shutdown(self.ctx)


def _rank_main(spec: _Spec, rank: int, conn: Any, parent: int) -> None:
    """One trainer rank in a spawned process: the initial weights, then the controller's commands over `conn`."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        worker = TrainerRank(spec, rank, _loads(conn.recv_bytes()))
        conn.send_bytes(_dumps(("ok", None)))
        while True:
            cmd, args = _loads(conn.recv_bytes())
            if cmd == "stop":
                break
            conn.send_bytes(_dumps(("ok", worker.call(cmd, args))))
        conn.send_bytes(_dumps(("ok", None)))
        worker.close()
    except BaseException as exc:  # the controller raises TrainerDeadError naming this rank
        try:
            conn.send_bytes(_dumps(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")))
        except Exception:  # noqa: BLE001 - the controller is gone
            pass
        os._exit(1)  # no atexit: a half-finished collective must not keep this process alive


class _TrainerCommands:
    """What the RL loop calls on a trainer (the `LoopTrainer` protocol), as commands every rank runs; the group
    classes below differ only in how `_call` reaches the ranks (pipes to spawned processes, or Ray actors)."""

    world_size: int
    version: int

    def _call(self, cmd: str, *args: Any) -> Any:
        raise NotImplementedError

    def train_step(self, groups: list[list[Sample]]) -> dict[str, Any]:
        """One optimizer step on a batch of groups, split over the ranks; the metrics of the whole batch."""
        metrics = self._call("train_step", groups)
        self.version += 1
        return {**metrics, "trainer_procs": self.world_size}

    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        return self._call("logprobs", samples)

    def save(self, folder: str, buffer_state: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        """A DCP checkpoint written by every rank (see save_rl_checkpoint)."""
        return self._call("save", folder, buffer_state, extra)

    def load(self, folder: str) -> dict[str, Any] | None:
        state = self._call("load", folder)
        if state is not None:
            self.version = int(state["version"])
        return state


class TrainerGroup(_TrainerCommands):
    """N trainer processes behind the `LoopTrainer` interface of `RLTrainer` (train_step, weights, version,
    save/load, logprobs). `model` is the starting policy (its weights are copied to every rank)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig | None = None,
        procs: int = 2,
        *,
        reference: bool = False,
        threads: int = 1,
    ) -> None:

        if procs < 2:
            raise ValueError(
                f"a trainer group needs at least 2 processes, got {procs}; use RLTrainer for one"
            )
        if torch.cuda.is_available() and torch.cuda.device_count() < procs:
            raise ValueError(
                f"--trainer-procs {procs}: each rank needs its own GPU and this machine has "
                f"{torch.cuda.device_count()}; use at most that many trainer processes"
            )
        self.cfg = config or TrainerConfig()
        self.loss_cfg = self.cfg.loss_config()
        self.world_size = procs
        self.ep_size = expert_parallel_size(model.config, procs)
        self.version = 0
        self.ref_model = None
        """Always None here: a KL reference lives on every rank (`reference=True`), built from `model`."""
        self.dead: TrainerDeadError | None = None
        self._closed = False
        spec = _Spec(
            model.config,
            self.cfg,
            procs,
            self.ep_size,
            _free_port(),
            bool(reference and self.loss_cfg.kl_coef > 0),
            threads,
        )
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        for rank in range(procs):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(
                target=_rank_main,
                args=(spec, rank, theirs, os.getpid()),
                name=f"glm5-trainer{rank}",
                daemon=True,
            )
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(mine)
        state = _dumps({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
        try:
            for conn in self.conns:
                conn.send_bytes(state)
            self._gather("start-up", STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    # --- the command channel -----------------------------------------------------------------------
    def _fail(self, message: str, rank: int | None) -> TrainerDeadError:
        self.dead = TrainerDeadError(message, rank)
        self._kill()
        return self.dead

    def _gather(self, what: str, timeout: float | None = None) -> list[Any]:
        """Every rank's answer to the last command; TrainerDeadError when one dies or fails meanwhile."""
        answers: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(answers) < self.world_size:
            pending = {self.conns[r]: r for r in range(self.world_size) if r not in answers}
            for conn in wait(list(pending), timeout=0.5):
                rank = pending[conn]
                try:
                    status, value = _loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._died(rank, what) from None
                if status == "error":
                    first = value.strip().splitlines()[0]
                    raise self._fail(
                        f"trainer rank {rank} of {self.world_size} failed during {what}: {first}; the run "
                        "cannot continue (resume from the last checkpoint)",
                        rank,
                    )
                answers[rank] = value
            self._check_procs(what, answered=answers)
            if deadline is not None and time.monotonic() > deadline:
                raise self._fail(f"the trainer group's {what} took more than {timeout:.0f} s", None)
        return [answers[r] for r in range(self.world_size)]

    def _check_procs(self, what: str, answered: dict[int, Any] | None = None) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode is not None and not (answered is not None and rank in answered and what == "stop"):
                if self.conns[rank].poll():  # its last words (an error message) are still in the pipe
                    continue
                raise self._died(rank, what)

    def _died(self, rank: int, what: str) -> TrainerDeadError:
        p = self.procs[rank]
        p.join(5)  # its channel closed: the exit code follows
        return self._fail(
            f"trainer rank {rank} of {self.world_size} (pid {p.pid}) died with exit code {p.exitcode} during "
            f"{what}; the run cannot continue (resume from the last checkpoint)",
            rank,
        )

    def _call(self, cmd: str, *args: Any) -> Any:
        if self.dead is not None:
            raise self.dead
        if self._closed:
            raise RuntimeError("the trainer group was shut down")
        self._check_procs(cmd)
        message = _dumps((cmd, args))
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(message)
            except OSError:
                raise self._died(rank, cmd) from None
        return self._gather(cmd)[0]

    # --- the LoopTrainer interface -------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The full policy state dict (the model's own names), gathered on rank 0, CPU tensors."""
        return self._call("weights")

    def pids(self) -> dict[int, int]:
        return {r: p.pid for r, p in enumerate(self.procs)}

    # --- shutdown ----------------------------------------------------------------------------------
    def _kill(self) -> None:
        self._closed = True
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)

    def shutdown(self) -> None:
        """Stop every rank (leaving the process group in order when all are alive)."""
        if self._closed:
            return
        if self.dead is None:
            try:
                message = _dumps(("stop", ()))
                for conn in self.conns:
                    conn.send_bytes(message)
                self._gather("stop", timeout=60)
            except Exception:  # noqa: BLE001 - killed below
                pass
            for p in self.procs:
                p.join(10)
        self._kill()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class RayTrainerGroup(_TrainerCommands):
    """The trainer group as N Ray actors (`TrainerRank`), one per bundle of a placement group (bundles
    `first_bundle` .. `first_bundle + procs - 1`, glm5.rl.actors.place_actors), with TrainerGroup's interface.
    `weights()` returns rank 0's object-store reference: the full state dict never passes through the driver."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig | None,
        procs: int,
        pg: Any,
        first_bundle: int,
        cpus_per_rank: float,
        *,
        reference: bool = False,
    ) -> None:
        import ray  # lazy: optional dependency
        from ray.util.scheduling_strategies import (  # lazy: optional dependency
            PlacementGroupSchedulingStrategy,
        )

        if procs < 2:
            raise ValueError(f"a trainer group needs at least 2 processes, got {procs}")
        self.cfg = config or TrainerConfig()
        self.loss_cfg = self.cfg.loss_config()
        self.world_size, self.ep_size = procs, expert_parallel_size(model.config, procs)
        self.version = 0
        self.ref_model = None
        self.dead: TrainerDeadError | None = None
        spec = _Spec(
            model.config,
            self.cfg,
            procs,
            self.ep_size,
            _free_port(),  # one node (the placement group packs the ranks); rank 0 listens on it
            bool(reference and self.loss_cfg.kl_coef > 0),
        )
        state = ray.put({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
        cls = ray.remote(num_cpus=cpus_per_rank, max_restarts=0)(TrainerRank)
        self.ranks = [
            cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=first_bundle + r
                )
            ).remote(spec, r, state)
            for r in range(procs)
        ]
        self._gather([a.ready.remote() for a in self.ranks], "start-up", STARTUP_TIMEOUT_S)

    def _gather(self, refs: list[Any], what: str, timeout: float | None = None) -> list[Any]:
        import ray  # lazy: optional dependency

        if self.dead is not None:
            raise self.dead
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            errors = []
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as exc:  # a rank died (RayActorError) or raised (RayTaskError)
                    errors.append((not isinstance(exc, ray.exceptions.RayActorError), refs.index(ref), exc))
            if errors:  # a dead rank first: its peers' failed collectives are the consequence
                _, rank, exc = min(errors, key=lambda e: (e[0], e[1]))
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.dead = TrainerDeadError(
                    f"trainer rank {rank} of {self.world_size} (a Ray actor) failed during {what}: "
                    f"{type(exc).__name__}: {first}; the run cannot continue (resume from the last checkpoint)",
                    rank,
                )
                self.shutdown()
                raise self.dead from None
            if deadline is not None and time.monotonic() > deadline:
                self.dead = TrainerDeadError(f"the trainer group's {what} took more than {timeout:.0f} s")
                self.shutdown()
                raise self.dead
        return refs

    def _call(self, cmd: str, *args: Any) -> Any:
        import ray  # lazy: optional dependency

        return ray.get(self._gather([a.call.remote(cmd, args) for a in self.ranks], cmd)[0])

    def weights(self) -> Any:
        """An object-store reference to the full state dict (rank 0's gather)."""
        return self._gather([a.call.remote("weights", ()) for a in self.ranks], "weights")[0]

    def shutdown(self) -> None:
        import ray  # lazy: optional dependency

        for a in self.ranks:
            ray.kill(a)
