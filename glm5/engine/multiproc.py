"""`MultiProcExecutor`: one model sharded over W = tp_size x ep_size processes (glm5.engine.sharding).

Process model. The engine's process is rank 0: it holds its own `ModelRunner` over its shard and runs the
front end (LLM, `glm5 generate/chat`, `glm5 serve`). Locally it spawns the W - 1 other ranks itself (spawn
context, one torch thread each on CPU, a free MASTER_PORT on 127.0.0.1); under torchrun (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set, WORLD_SIZE > 1) every rank runs the same command, rank 0 runs the front end and
ranks > 0 enter the worker loop when the front end builds its executor, and exit when rank 0 stops.

Every rank: the process group (nccl / hccl / xccl / gloo per device: `glm5.device.dist_backend`) plus a gloo
control group, `load_sharded` of its slices of the checkpoint, a `ModelRunner` (fused_decode off: the fused
step bypasses the shards' all-reduces), the smallest cache size of all ranks. Per step rank 0 broadcasts
`("step", SchedulerOutput, previous tokens)` on the control group; every rank executes it (identical inputs,
identical logits, the seeds the output carries), and only rank 0's `ModelRunnerOutput` is returned. Workers
compare rank 0's previous tokens with their own and fail loudly on a difference.

Data-parallel attention (`data_parallel=True`, glm5/engine/dp.py): the ep_size TP groups are DP ranks. The
engine's `DPScheduler` hands `execute` a `DPSchedulerOutput` (one SchedulerOutput per DP rank); rank 0 broadcasts
`("dpstep", parts)`, every rank runs its DP rank's part, then `MoEDispatcher.finish_step` (the dummy step: it
answers the other ranks' MoE calls with no tokens until all are done), and rank 0 gathers every rank's output
and dispatcher counters: each DP rank's first TP rank's output is returned, its TP peers' must be equal.

Faults: a thread watches the worker processes; a dead worker (or a collective that fails) raises
`EngineDeadError` naming the rank, and every later call raises it too. Rank 0's work runs in a daemon thread
that the caller waits on while watching the workers, so a collective stuck on a dead peer never hangs the
engine. `shutdown` sends a stop message, joins the workers (killing stragglers) and destroys the groups.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

from glm5.checkpoint.hf import from_hf_state_dict
from glm5.device import _backend, dist_backend
from glm5.engine.config import EngineConfig
from glm5.engine.dp import DPRunnerOutput, DPSchedulerOutput
from glm5.engine.executor import Executor
from glm5.engine.runner import ModelRunner, ModelRunnerOutput
from glm5.engine.scheduler import SchedulerOutput
from glm5.engine.sharding import ShardLayout, _take, load_sharded
from glm5.rl.weight_sync import state_hash

log = logging.getLogger("glm5.engine.multiproc")

STARTUP_TIMEOUT_S = float(os.environ.get("GLM5_DIST_STARTUP_TIMEOUT", "900"))
"""Seconds for the process group to form and every rank to load its shard."""
COLLECTIVE_TIMEOUT_S = float(os.environ.get("GLM5_DIST_TIMEOUT", "600"))


_OWNS_DEFAULT_GROUP = False


def owns_default_group() -> bool:
    """Whether this process's default torch.distributed group is a multi-process engine's (rank 0's, or a
    worker's): code of another distributed job in the same process (an RL trainer's checkpointing) must then
    not run its collectives on it (glm5/train/state.py checks this)."""
    return _OWNS_DEFAULT_GROUP and dist_initialized()


def _disown() -> None:
    global _OWNS_DEFAULT_GROUP
    _OWNS_DEFAULT_GROUP = False


def dist_initialized() -> bool:

    return dist.is_available() and dist.is_initialized()


class EngineDeadError(RuntimeError):
    """A rank of a multi-process engine died (or its collectives failed): the engine cannot continue."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with WORLD_SIZE > 1, else None."""
    env = os.environ
    if (
        all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        and int(env["WORLD_SIZE"]) > 1
    ):
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: Any, local_rank: int) -> torch.device:
    dev = torch.device(device if device is not None else "cpu")
    if dev.type in ("cpu", "mps"):
        return dev

    backend = _backend(dev.type)
    index = local_rank % max(1, int(backend.device_count()))
    backend.set_device(index)
    return torch.device(dev.type, index)


@dataclasses.dataclass
class _Spec:
    """What every rank needs to build its runner (picklable)."""

    path: str
    config: EngineConfig
    tp_size: int
    ep_size: int
    dtype: Any = None
    device: Any = None
    fp8: str | None = None
    topk_sync: str = "off"
    threads: int | None = 1
    data_parallel: bool = False
    dispatch: str = "alltoall"


def _init_rank(spec: _Spec, rank: int, local_rank: int, init_method: str) -> tuple[Any, ModelRunner]:
    """Join the process group, load this rank's shard, build its runner with the cache size all ranks agree on."""
    world = spec.tp_size * spec.ep_size
    device = _rank_device(spec.device, local_rank)
    backend = dist_backend(device.type)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    global _OWNS_DEFAULT_GROUP
    _OWNS_DEFAULT_GROUP = True
    control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    lay = ShardLayout.from_rank(rank, spec.tp_size, spec.ep_size)
    model = load_sharded(
        spec.path,
        lay.tp_rank,
        spec.tp_size,
        lay.ep_rank,
        spec.ep_size,
        dtype=spec.dtype,
        device=device,
        fp8=spec.fp8 or "dequantize",
        topk_sync=spec.topk_sync,
        data_parallel=spec.data_parallel,
        dispatch=spec.dispatch,
    )
    runner = ModelRunner(model, spec.config)
    blocks = torch.tensor([runner.num_blocks], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    if int(blocks) != runner.num_blocks:  # plan with the smallest cache of all ranks
        del runner
        runner = ModelRunner(model, spec.config, int(blocks))
    return control, runner


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def worker_loop(runner: ModelRunner, control: Any, rank: int) -> None:
    """Ranks > 0: execute every broadcast step until rank 0 says stop."""
    last: ModelRunnerOutput | None = None
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        kind, *payload = box[0]
        if kind == "stop":
            break
        if kind == "step":
            out, prev = payload
            if prev is not None and last is not None and prev != (last.seq_ids, last.token_ids):
                raise RuntimeError(
                    f"rank {rank} sampled {last.seq_ids} -> {last.token_ids} but rank 0 sampled "
                    f"{prev[0]} -> {prev[1]}: the ranks' logits or sampling state differ"
                )
            last = runner.execute(out)
        elif kind == "dpstep":
            _dp_step(runner, control, rank, payload[0])
        elif kind == "update":
            fingerprint = _update_local(runner, payload[0])
            dist.gather_object(fingerprint, None, dst=0, group=control)


def _dp_step(runner: ModelRunner, control: Any, rank: int, parts: list[SchedulerOutput]) -> Any:
    """Run this rank's DP part, answer the other ranks' MoE calls until all are done, and gather every rank's
    (output, dispatcher counters) on rank 0 (returned there; None elsewhere)."""
    plan = runner.model.shard_plan
    result = runner.execute(parts[plan.layout.ep_rank])
    d = plan.dispatcher
    d.finish_step()
    mine = (result, {"calls": d.calls, "dummy_calls": d.dummy_calls, "idle_steps": d.idle_steps})
    box = [None] * dist.get_world_size(control) if rank == 0 else None
    dist.gather_object(mine, box, dst=0, group=control)
    return box


def _own_names(model: Any, state_dict: dict[str, torch.Tensor], hf_names: bool) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the model's own (the global, unsharded tensors)."""
    if not hf_names:
        return state_dict

    return from_hf_state_dict(state_dict, model.config, strict=False)


def _update_local(runner: ModelRunner, state_dict: dict[str, torch.Tensor]) -> str:
    """Load this rank's slices of whole (unsharded) tensors named as the model's own state dict. Returns the
    hash of the tensors it received (`glm5.rl.weight_sync.state_hash`), or a line saying which loaded slice does
    not hold the received bytes."""
    slices = runner.model.shard_plan.slices
    local = {}
    for name, value in state_dict.items():
        spec = slices.get(name)
        local[name] = value if spec is None else _take(value, spec.dim, spec.start, spec.stop)
    own = runner.model.state_dict()
    for name, value in local.items():  # every shape checked before anything is copied (no rank half-updated)
        if name in own and own[name].shape != value.shape:
            raise ValueError(
                f"update_weights: {name} has shape {tuple(state_dict[name].shape)}; this model's "
                "unsharded tensor has another shape"
            )
    runner.update_weights(local)
    own = runner.model.state_dict()
    for name, value in local.items():
        if not torch.equal(own[name], value.to(own[name].dtype)):
            return f"{name} does not hold the received values after the update"

    return state_hash(state_dict)


def _worker_main(spec: _Spec, rank: int, init_method: str, errors: Any, parent: int) -> None:
    """Entry point of a locally spawned rank > 0."""
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        control, runner = _init_rank(spec, rank, rank, init_method)
        worker_loop(runner, control, rank)
    except BaseException as exc:  # reported to rank 0, which raises EngineDeadError naming this rank
        errors.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    _destroy(control)


def _destroy(control: Any) -> None:

    if not dist.is_initialized():
        return
    try:
        dist.barrier(group=control)
    except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
        pass
    dist.destroy_process_group()
    _disown()


def _destroy_quietly() -> None:

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
            _disown()
        except Exception as exc:  # noqa: BLE001 - best effort after a rank died
            log.warning("multi-process shutdown: destroying the process group: %s", exc)


class _Caller:
    """A daemon thread that runs rank 0's work, so the caller can watch the workers while it waits."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="glm5-rank0", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def submit(self, fn: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut


class MultiProcExecutor(Executor):
    """Rank 0 of W = tp_size x ep_size ranks (see the module docstring). Built from a checkpoint folder.
    `data_parallel_size`: the number of DP ranks (ep_size with data_parallel, else 1)."""

    def __init__(
        self,
        path: str,
        config: EngineConfig,
        tp_size: int = 1,
        ep_size: int = 1,
        *,
        dtype: Any = None,
        device: Any = None,
        fp8: str | None = None,
        topk_sync: str = "off",
        threads: int | None = 1,
        data_parallel: bool = False,
        dispatch: str = "alltoall",
    ) -> None:
        """data_parallel: the ep_size TP groups are data-parallel ranks (glm5/engine/dp.py), whose MoE layers
        exchange tokens by `dispatch` ("alltoall" or "allgather", glm5.engine.sharding.MoEDispatcher)."""
        if config.fused_decode:
            log.warning(
                "fused_decode=True is turned off for a sharded model: the fused step bypasses the "
                "tensor/expert-parallel all-reduces"
            )
        if config.fused_decode is not False:
            log.info("multi-process executor: fused_decode off (the fused step is not shard-aware)")
        config = dataclasses.replace(config, fused_decode=False)
        if config.force_token is not None:
            try:
                pickle.dumps(config.force_token)
            except Exception as exc:  # noqa: BLE001 - reported with the fix
                raise ValueError(
                    f"EngineConfig.force_token must be picklable for a multi-process engine (it runs on "
                    f"every rank): {exc}"
                ) from None
        self.world_size = W = tp_size * ep_size
        dp = bool(data_parallel) and ep_size > 1
        self.spec = _Spec(
            os.fspath(path), config, tp_size, ep_size, dtype, device, fp8, topk_sync, threads, dp, dispatch
        )
        self.data_parallel_size = ep_size if dp else 1
        self.counters: dict[int, dict[str, int]] = {}
        """Data-parallel attention: every rank's MoE dispatcher totals (calls, dummy_calls, idle_steps)."""
        self.weight_hashes: dict[int, str] = {}
        """Per rank, the hash of the weights the last `update_weights` delivered (equal on every rank)."""
        self.procs: dict[int, Any] = {}
        self.dead: EngineDeadError | None = None
        self._closed = False
        self._last: tuple[list[int], list[list[int]]] | None = None
        self._caller = _Caller()
        self._lock = threading.Lock()
        external = torchrun_env()
        if external is not None:
            rank, world = external
            if world != W:
                raise ValueError(
                    f"torchrun started WORLD_SIZE={world} processes; the layout has {W} (tensor_parallel_size "
                    f"{tp_size} x {'data' if data_parallel else 'expert'}_parallel_size {ep_size})"
                )
            local = int(os.environ.get("LOCAL_RANK", rank))
            if rank > 0:  # this process is a worker: serve rank 0's steps, then exit with it
                if threads and torch.device(device or "cpu").type == "cpu":
                    torch.set_num_threads(threads)
                control, runner = _init_rank(self.spec, rank, local, "env://")
                worker_loop(runner, control, rank)
                _destroy(control)
                sys.exit(0)
            init = "env://"
        else:
            ctx = mp.get_context("spawn")
            port = _free_port()
            init = f"tcp://127.0.0.1:{port}"
            self._errors = ctx.Queue()
            env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # the children inherit them
            try:
                for r in range(1, W):
                    p = ctx.Process(
                        target=_worker_main,
                        args=(self.spec, r, init, self._errors, os.getpid()),
                        name=f"glm5-rank{r}",
                        daemon=True,
                    )
                    p.start()
                    self.procs[r] = p
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            threading.Thread(target=self._monitor, name="glm5-rank-monitor", daemon=True).start()
        try:
            self._control, runner = self._wait(
                lambda: _init_rank(self.spec, 0, 0, init), STARTUP_TIMEOUT_S, "start-up"
            )
        except BaseException:
            self._closed = True
            for p in self.procs.values():
                p.kill()
                p.join(5)
            raise
        self._adopt(runner)

    # --- fault handling ---------------------------------------------------------------------------
    def _worker_error(self, rank: int) -> str:
        try:
            while True:
                r, msg = self._errors.get_nowait()
                if r == rank:
                    return msg.strip().splitlines()[0] if msg else ""
        except Exception:  # noqa: BLE001 - empty
            return ""

    def _check_procs(self) -> None:
        if self.dead is not None or self._closed:
            return
        for rank, p in self.procs.items():
            if p.exitcode is not None:
                why = self._worker_error(rank)
                msg = (
                    f"rank {rank} of {self.world_size} (pid {p.pid}) died with exit code {p.exitcode}"
                    + (f": {why}" if why else "")
                    + "; the engine cannot continue"
                )
                log.error(msg)
                self.dead = EngineDeadError(msg, rank)
                return

    def _monitor(self) -> None:

        while not self._closed and self.dead is None:
            alive = [p.sentinel for p in self.procs.values() if p.exitcode is None]
            if not alive:
                break
            wait(alive, timeout=1.0)
            self._check_procs()

    def check_alive(self) -> None:
        """Raise EngineDeadError when a rank has died."""
        self._check_procs()
        if self.dead is not None:
            raise self.dead

    def _wait(self, fn: Any, timeout: float | None, what: str, passthrough: tuple = ()) -> Any:
        """Run fn on rank 0's thread and wait, watching the workers. Errors in `passthrough` (raised before any
        collective) propagate as they are; any other error kills the engine."""
        self.check_alive()
        fut = self._caller.submit(fn)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return fut.result(timeout=0.2)
            except TimeoutError:
                pass
            except (EngineDeadError, *passthrough):
                raise
            except Exception as exc:
                time.sleep(0.5)  # a collective that failed because a peer died: name the peer
                self._check_procs()
                if self.dead is not None:
                    raise self.dead from exc
                self.dead = EngineDeadError(
                    f"rank 0's {what} failed ({type(exc).__name__}: {exc}); the "
                    "multi-process engine cannot continue",
                    0,
                )
                raise self.dead from exc
            self._check_procs()
            if self.dead is not None:
                raise self.dead
            if deadline is not None and time.monotonic() > deadline:
                self.dead = EngineDeadError(
                    f"the multi-process engine's {what} took more than {timeout:.0f} s"
                )
                raise self.dead

    # --- the Executor interface --------------------------------------------------------------------
    def _broadcast(self, message: tuple) -> None:

        dist.broadcast_object_list([message], src=0, group=self._control)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.data_parallel_size > 1:
            return self._execute_dp(scheduler_output)
        with self._lock:
            prev = self._last

            def step() -> ModelRunnerOutput:
                self._broadcast(("step", scheduler_output, prev))
                return self._runner.execute(scheduler_output)

            result = self._wait(step, None, "step")
            self._last = (result.seq_ids, result.token_ids)
            return result

    def _execute_dp(self, scheduled: Any) -> Any:

        if not isinstance(scheduled, DPSchedulerOutput):
            raise TypeError("a data-parallel executor runs DPSchedulerOutputs (one part per DP rank)")
        t = self.spec.tp_size
        with self._lock:

            def step() -> list:
                self._broadcast(("dpstep", scheduled.parts))
                return _dp_step(self._runner, self._control, 0, scheduled.parts)

            gathered = self._wait(step, None, "step")
        results = [r for r, _ in gathered]
        for rank, res in enumerate(results):
            lead = results[rank - rank % t]
            if (res.seq_ids, res.token_ids) != (lead.seq_ids, lead.token_ids):
                self.dead = EngineDeadError(
                    f"rank {rank} sampled {res.seq_ids} -> {res.token_ids} but its DP rank's first rank "
                    f"{rank - rank % t} sampled {lead.seq_ids} -> {lead.token_ids}: the ranks' logits differ",
                    rank,
                )
                raise self.dead
        self.counters = {rank: c for rank, (_, c) in enumerate(gathered)}
        return DPRunnerOutput([results[g * t] for g in range(self.data_parallel_size)], self.counters)

    def update_weights(self, state_dict: dict[str, torch.Tensor], hf_names: bool = False) -> None:
        """Whole (unsharded) tensors, by the model's names or the checkpoint's (hf_names): rank 0 converts the
        names, loads its slices first (so a bad name, shape or dtype raises before any rank changes), then
        broadcasts the tensors on the gloo control group; every worker keeps its slices. Every rank then hashes
        what it received (and checks its slices hold it): `weight_hashes` {rank: hash}, all equal, or this
        raises. (For a whole new checkpoint of a large model, restarting on it loads only each rank's byte ranges
        instead.)"""
        with self._lock:
            sd = _own_names(self._runner.model, state_dict, hf_names)
            sd = {k: v.detach().to("cpu") for k, v in sd.items()}

            mine = self._wait(lambda: _update_local(self._runner, sd), None, "weight update", (ValueError,))

            def send_and_gather() -> list:
                self._broadcast(("update", sd))
                box: list = [None] * self.world_size
                dist.gather_object(mine, box, dst=0, group=self._control)
                return box

            got = self._wait(send_and_gather, None, "weight update")
            self.weight_hashes = dict(enumerate(got))
            bad = {r: h for r, h in self.weight_hashes.items() if h != got[0]}
            if bad or len(got[0]) != 64:  # a sha256 hex digest, else a rank's line about a failed load
                raise RuntimeError(
                    f"weight update: the ranks disagree after loading (rank 0: {got[0]}; others: {bad}); the "
                    "transport or a rank's load is broken"
                )

    def shutdown(self) -> None:
        if self._closed:
            return
        with self._lock:
            alive = self.dead is None
            self._closed = True
            if alive:
                try:
                    self._caller.submit(lambda: (self._broadcast(("stop",)), _destroy(self._control))).result(
                        30
                    )
                except Exception as exc:  # noqa: BLE001 - the workers are killed below
                    log.warning("multi-process shutdown: %s", exc)
            else:  # a rank is gone: no barrier to wait for, but leave no dead process group behind in this process
                _destroy_quietly()
            for p in self.procs.values():
                p.join(10 if alive else 0.5)
            for p in self.procs.values():
                if p.is_alive():
                    p.kill()
                    p.join(5)

    def pids(self) -> dict[int, int]:
        """The local worker processes' ids by rank."""
        return {r: p.pid for r, p in self.procs.items()}
