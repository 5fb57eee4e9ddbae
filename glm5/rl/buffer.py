"""`DataBuffer`: the prompt cursor, leases, the completed-group queue, staleness admission and consumption,
and a checkpointable state (docs/rl.md § The data buffer).

Every prompt group (one prompt, one epoch) is *leased* to a rollout worker and ends in exactly one terminal
state: trained or filtered (with a reason). A lease that does not finish is requeued (its partial samples
kept when the rollout was aborted by a weight update and partial rollouts are on) and leased again later.

Admission (AReaL): a worker may start new groups while
    running < C   and   accepted + running < (eta + v + 1) * B + over_sample
where v is the trainer version, B the groups per optimizer step, eta the max staleness and `accepted` counts
every completed group not dropped (trained ones included). Filtered and dropped groups do not count, so their
slots are reused.

Consumption (`get_batch`), chosen explicitly:
- pace: the oldest completed groups first, never dropped (staleness is bounded in mean, reported, corrected
  by importance weights);
- drop_and_requeue: groups whose oldest trained token is more than eta versions old are dropped and their
  prompt requeued (a hard bound on staleness; the drop rate is logged);
- abort_at_update: the rollout side aborts in-flight groups at each weight update (partial rollouts); here,
  groups whose newest trained token is more than eta versions old are dropped and requeued.

All methods are thread-safe (one lock); `get_batch(timeout=...)` blocks on a condition, so a trainer waiting
for data sleeps instead of spinning.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

from glm5.rl.types import Sample

POLICIES = ("pace", "drop_and_requeue", "abort_at_update")


@dataclass
class BufferConfig:
    """Batching, staleness and data-order settings of a `DataBuffer`."""

    batch_size: int = 4
    """B: prompt groups per optimizer step."""
    max_staleness: int = 0
    """eta: how many versions generation may run ahead of training (0 = synchronous)."""
    max_concurrent: int = 64
    """C: most groups leased at once."""
    policy: str = "pace"
    """Consumption policy: pace | drop_and_requeue | abort_at_update (see the module docstring)."""
    over_sample: int = 0
    """Extra groups allowed in flight beyond admission (APRIL over-sampling; their slots are reused when
    the dynamic filter drops groups)."""
    num_epochs: int | None = None
    """Passes over the prompts (None = endless)."""
    shuffle: bool = True
    """Visit the prompts of each epoch in a seeded random order."""
    seed: int = 0
    """Seed of the prompt order."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"buffer policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.batch_size < 1 or self.max_concurrent < 1 or self.max_staleness < 0 or self.over_sample < 0:
            raise ValueError(
                "buffer needs batch_size >= 1, max_concurrent >= 1, max_staleness >= 0, over_sample >= 0"
            )


@dataclass
class Lease:
    """A prompt group handed to a rollout worker."""

    lease_id: int
    prompt_id: int
    epoch: int
    worker: str
    version: int
    """Trainer version when leased."""
    prompt: list[int]
    metadata: dict[str, Any]
    samples: list[Sample] | None = None
    """Partial samples to continue (an aborted rollout requeued with partial rollouts on), else None."""

    @property
    def key(self) -> str:
        return f"{self.prompt_id}.{self.epoch}"


class DataBuffer:
    """See the module docstring. `prompts`: [{"tokens": [ids], "metadata": {...}}] (metadata goes to samples)."""

    def __init__(self, prompts: list[dict[str, Any]], config: BufferConfig | None = None) -> None:
        if not prompts:
            raise ValueError("the RL data source is empty: give at least one prompt")
        self.prompts = prompts
        self.cfg = cfg = config or BufferConfig()
        self.version = 0
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)
        self.queue: deque[tuple[int, int, list[Sample] | None]] = deque()  # requeued (prompt, epoch, partial)
        self.leases: dict[int, Lease] = {}
        self.completed: dict[int, tuple[Lease, list[Sample]]] = {}  # lease id -> group, in lease order
        self.accepted = 0
        self.terminal: dict[str, str] = {}  # "prompt.epoch" -> "trained" | "filtered:<reason>"
        self.stats: Counter[str] = Counter()
        self._next_lease = 0
        self._cond = threading.Condition(threading.RLock())
        assert cfg.batch_size >= 1

    # --- the data cursor -------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.cfg.shuffle:
            random.Random(self.cfg.seed * 100_003 + epoch).shuffle(order)
        return order

    def _next_prompt(self) -> tuple[int, int, list[Sample] | None] | None:
        if self.queue:
            return self.queue.popleft()
        if self.pos == len(self._order):
            if self.cfg.num_epochs is not None and self.epoch + 1 >= self.cfg.num_epochs:
                return None
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        self.pos += 1
        return self._order[self.pos - 1], self.epoch, None

    # --- admission -------------------------------------------------------------------------------
    def capacity(self) -> int:
        """How many more groups may start now (docs/rl.md § Admission and staleness)."""
        with self._cond:
            c = self.cfg
            running = len(self.leases)
            limit = (c.max_staleness + self.version + 1) * c.batch_size + c.over_sample
            return max(0, min(c.max_concurrent - running, limit - (self.accepted + running)))

    def lease(self, worker: str = "local", max_groups: int | None = None) -> list[Lease]:
        """Lease up to `max_groups` prompt groups (fewer when admission or the data say so)."""
        with self._cond:
            n = self.capacity() if max_groups is None else min(max_groups, self.capacity())
            out = []
            for _ in range(n):
                item = self._next_prompt()
                if item is None:
                    break
                pid, epoch, partial = item
                lease = Lease(
                    self._next_lease,
                    pid,
                    epoch,
                    worker,
                    self.version,
                    list(self.prompts[pid]["tokens"]),
                    dict(self.prompts[pid].get("metadata", {})),
                    partial,
                )
                self._next_lease += 1
                self.leases[lease.lease_id] = lease
                self.stats["leased"] += 1
                out.append(lease)
            return out

    # --- lease outcomes --------------------------------------------------------------------------
    def _end_lease(self, lease_id: int) -> Lease | None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            self.stats["late_results"] += 1  # e.g. a worker presumed dead reported after all: dedupe
        return lease

    def complete(self, lease_id: int, samples: list[Sample]) -> bool:
        """A finished, scored group joins the completed queue; False if the lease is no longer held."""
        with self._cond:
            lease = self._end_lease(lease_id)
            if lease is None:
                return False
            for s in samples:
                s.check()
            self.completed[lease_id] = (lease, samples)
            self.accepted += 1
            self._cond.notify_all()
            return True

    def filter(self, lease_id: int, reason: str) -> bool:
        """A group the dynamic filter dropped (e.g. "zero_variance"): terminal, its slot reused."""
        with self._cond:
            lease = self._end_lease(lease_id)
            if lease is None:
                return False
            self._terminal(lease.key, f"filtered:{reason}")
            self.stats[f"filtered:{reason}"] += 1
            self._cond.notify_all()
            return True

    def requeue(self, lease_id: int, partial: list[Sample] | None = None) -> bool:
        """Give a group back (aborted, failed, worker lost); `partial` samples are continued at the next lease."""
        with self._cond:
            lease = self._end_lease(lease_id)
            if lease is None:
                return False
            self.queue.append((lease.prompt_id, lease.epoch, partial))
            self.stats["requeued"] += 1
            self._cond.notify_all()
            return True

    def release_worker(self, worker: str) -> int:
        """Requeue every lease of a worker that died (its partial work is lost); returns how many."""
        with self._cond:
            ids = [i for i, lease in self.leases.items() if lease.worker == worker]
            for i in ids:
                self.requeue(i, self.leases[i].samples)
            return len(ids)

    def _terminal(self, key: str, state: str) -> None:
        assert key not in self.terminal, f"prompt group {key} reached a second terminal state ({state})"
        self.terminal[key] = state

    # --- consumption -----------------------------------------------------------------------------
    def _stale(self, samples: list[Sample]) -> bool:
        c, v = self.cfg, self.version
        if c.policy == "pace":
            return False
        versions = [s.head_version() if c.policy == "drop_and_requeue" else s.tail_version() for s in samples]
        return any(x is not None and v - x > c.max_staleness for x in versions)

    def _apply_policy(self) -> None:
        for lease_id in [i for i, (_, group) in self.completed.items() if self._stale(group)]:
            lease, _ = self.completed.pop(lease_id)
            self.accepted -= 1
            self.queue.append((lease.prompt_id, lease.epoch, None))
            self.stats["dropped_stale"] += 1

    def get_batch(self, num_groups: int | None = None, timeout: float = 0.0) -> list[list[Sample]] | None:
        """The next training batch (the `num_groups` earliest-leased completed groups, default B), consumed
        (trained) by this call; None if not enough are ready within `timeout` seconds."""
        num_groups = num_groups or self.cfg.batch_size
        with self._cond:
            self._apply_policy()
            if len(self.completed) < num_groups and timeout > 0:
                self._cond.wait_for(lambda: self._ready(num_groups), timeout)
                self._apply_policy()
            if len(self.completed) < num_groups:
                return None
            taken = sorted(self.completed)[:num_groups]
            batch = []
            for lease_id in taken:
                lease, group = self.completed.pop(lease_id)
                self._terminal(lease.key, "trained")
                batch.append(group)
            self.stats["trained"] += len(batch)
            return batch

    def _ready(self, n: int) -> bool:
        self._apply_policy()
        return len(self.completed) >= n

    def set_version(self, version: int) -> None:
        """The trainer's (and the engines') weight version: opens admission for the next groups."""
        with self._cond:
            self.version = int(version)
            self._cond.notify_all()

    # --- introspection ---------------------------------------------------------------------------
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def num_ready(self) -> int:
        with self._cond:
            return len(self.completed)

    def exhausted(self) -> bool:
        """No more prompts to lease, nothing running, nothing waiting to be trained."""
        with self._cond:
            out_of_data = (
                self.cfg.num_epochs is not None
                and self.epoch + 1 >= self.cfg.num_epochs
                and self.pos == len(self._order)
            )
            return out_of_data and not self.queue and not self.leases and not self.completed

    def held_leases(self, worker: str | None = None) -> dict[int, str]:
        """{lease id: prompt group key "prompt.epoch"} of the leases held now, by `worker` or by any worker."""
        with self._cond:
            return {
                i: lease.key for i, lease in self.leases.items() if worker is None or lease.worker == worker
            }

    def counts(self) -> dict[str, int]:
        """trained / filtered / requeued-pending / running / ready / dropped: the work accounting."""
        with self._cond:
            filtered = sum(1 for s in self.terminal.values() if s.startswith("filtered"))
            return {
                "trained": self.stats["trained"],
                "filtered": filtered,
                "pending_requeued": len(self.queue),
                "running": len(self.leases),
                "ready": len(self.completed),
                "accepted": self.accepted,
                "dropped_stale": self.stats["dropped_stale"],
                "requeued": self.stats["requeued"],
                "leased": self.stats["leased"],
                "late_results": self.stats["late_results"],
            }

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state. Outstanding leases are saved as requeued groups (with their partial samples):
        generation in flight at save time is redone after a restore, never lost and never double-counted."""
        with self._cond:

            def group(samples: list[Sample] | None) -> list[dict] | None:
                return None if samples is None else [s.to_dict() for s in samples]

            in_flight = [
                (lease.prompt_id, lease.epoch, group(lease.samples))
                for lease in sorted(self.leases.values(), key=lambda x: x.lease_id)
            ]
            return {
                "config": asdict(self.cfg),
                "num_prompts": len(self.prompts),
                "version": self.version,
                "epoch": self.epoch,
                "pos": self.pos,
                "next_lease": self._next_lease,
                "queue": in_flight + [(p, e, group(s)) for p, e, s in self.queue],
                "completed": [
                    [lid, asdict(lease) | {"samples": None}, group(samples)]
                    for lid, (lease, samples) in self.completed.items()
                ],
                "accepted": self.accepted,
                "terminal": dict(self.terminal),
                "stats": dict(self.stats),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._cond:
            if state["num_prompts"] != len(self.prompts):
                raise ValueError(
                    f"the checkpoint's buffer has {state['num_prompts']} prompts but this run has "
                    f"{len(self.prompts)}: resume with the same recipe and data"
                )

            def group(raw: list[dict] | None) -> list[Sample] | None:
                return None if raw is None else [Sample.from_dict(d) for d in raw]

            self.version, self.epoch, self.pos = state["version"], state["epoch"], state["pos"]
            self._order = self._epoch_order(self.epoch)
            self._next_lease = state["next_lease"]
            self.queue = deque((p, e, group(s)) for p, e, s in state["queue"])
            self.leases = {}
            self.completed = {}
            for lid, lease, samples in state["completed"]:
                self.completed[int(lid)] = (Lease(**lease), group(samples))
            self.accepted = state["accepted"]
            self.terminal = dict(state["terminal"])
            self.stats = Counter(state["stats"])
            self._cond.notify_all()


def staleness_histogram(groups: list[list[Sample]], version: int) -> dict[int, int]:
    """{staleness: number of samples} with staleness = trainer version - version of the oldest trained token."""
    hist: Counter[int] = Counter()
    for group in groups:
        for s in group:
            head = s.head_version()
            if head is not None:
                hist[version - head] += 1
    return dict(sorted(hist.items()))
