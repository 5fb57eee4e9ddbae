"""Data-parallel attention: d schedulers in the front rank's engine, one per data-parallel rank.

Layout (`--data-parallel-size d --tensor-parallel-size t --expert-parallel-size d*t`): W = d x t processes,
DP rank g = ranks [g*t, (g+1)*t) (a TP group). Each DP rank has its own scheduler (request queue, admission,
preemption, block accounting) and its own KV cache; attention weights are replicated over the DP ranks (split
by heads within a TP group), the routed experts divided over all W ranks, and the MoE layers exchange tokens
(glm5.engine.sharding.MoEDispatcher). The schedulers live in the front rank's process (rank 0, which also runs
DP rank 0): `DPScheduler` looks like one `Scheduler` to `LLMEngine` and routes each new request to one member:

- prefix-cache aware, load balanced: among the members whose load (unfinished sequences) is within
  `max(1, max_num_seqs // 4)` of the least loaded one, the one whose cache holds the longest prefix of the
  prompt (in whole blocks; a hash-chain lookup, no copies), then the least loaded, then the lowest rank.

Each step every member schedules; the executor (glm5.engine.multiproc.MultiProcExecutor, data_parallel) sends
all d `SchedulerOutput`s to every rank in one broadcast, each rank runs its DP rank's output, and ranks with no
forward left answer the others' MoE calls with no tokens (the dummy step) until every rank is done. Greedy
output per request is the one-process output: attention of a sequence only reads its own cache, and the experts
compute each token's rows independently of the batch (sums in another order: equal within float rounding).
"""

from __future__ import annotations

from collections import ChainMap, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from glm5.engine.config import EngineConfig
from glm5.engine.request import Request, Seq
from glm5.engine.scheduler import Scheduler, SchedulerOutput
from glm5.engine.sharding import LayoutError

if TYPE_CHECKING:
    from glm5.engine.kv_cache import BlockManager
    from glm5.engine.runner import ModelRunnerOutput


def resolve_layout(tp: int, ep: int, dp: int) -> tuple[int, int, bool]:
    """(tp_size, number of TP groups, data_parallel) for the launch flags, or ValueError naming the fix.
    With dp > 1 the routed experts are divided over all dp x tp ranks, so ep must be dp x tp."""
    for name, v in (("tensor", tp), ("expert", ep), ("data", dp)):
        if v < 1:
            raise LayoutError(f"--{name}-parallel-size {v}: must be at least 1")
    if dp == 1:
        return tp, ep, False
    if ep != dp * tp:
        raise LayoutError(
            f"--data-parallel-size {dp} with --tensor-parallel-size {tp} divides the routed experts over all "
            f"{dp * tp} ranks: pass --expert-parallel-size {dp * tp} (got {ep})"
        )
    return tp, dp, True


@dataclass
class DPSchedulerOutput:
    """One step of every data-parallel rank: parts[g] is DP rank g's `SchedulerOutput`."""

    parts: list[SchedulerOutput]

    @property
    def is_empty(self) -> bool:
        return all(p.is_empty for p in self.parts)


@dataclass
class DPRunnerOutput:
    """What every DP rank sampled: parts[g] is DP rank g's `ModelRunnerOutput` (from its first TP rank)."""

    parts: list[ModelRunnerOutput]
    counters: dict[int, dict[str, int]] = field(default_factory=dict)
    """Per global rank, its MoE dispatcher's totals so far: calls, dummy_calls, idle_steps."""


class DPScheduler:
    """d member `Scheduler`s behind the one-scheduler interface `LLMEngine` uses (module docstring)."""

    def __init__(
        self,
        size: int,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        *,
        bytes_per_block: int = 0,
        mtp_bytes_per_block: int = 0,
        on_finish: Callable[[Seq, str], None] | None = None,
    ) -> None:
        self.members = [
            Scheduler(
                config,
                num_blocks,
                max_model_len,
                bytes_per_block=bytes_per_block,
                mtp_bytes_per_block=mtp_bytes_per_block,
                on_finish=on_finish,
            )
            for _ in range(size)
        ]
        self.config = config
        self.owner: dict[int, int] = {}
        """seq id -> the DP rank serving it."""
        self.routed = [0] * size
        """Requests routed to each DP rank so far."""
        self.slack = max(1, config.max_num_seqs // 4)

    # --- routing -----------------------------------------------------------------------------------
    @staticmethod
    def load(member: Scheduler) -> int:
        return sum(1 + len(s.children) for s in member.running) + sum(
            1 + len(s.children) for s in member.waiting
        )

    def route(self, request: Request) -> int:
        loads = [self.load(m) for m in self.members]
        least = min(loads)
        tokens = request.prompt_token_ids
        best = None
        for g, m in enumerate(self.members):
            if loads[g] > least + self.slack:
                continue
            hit = len(m.cache.match_prefix(tokens, max_blocks=(len(tokens) - 1) // m.block_size))
            key = (-hit, loads[g], g)
            best = key if best is None or key < best else best
        return best[2]

    def add_request(self, request: Request) -> None:
        g = self.route(request)
        for seq in request.seqs:
            self.owner[seq.seq_id] = g
        self.routed[g] += 1
        self.members[g].add_request(request)

    def finish_seq(self, seq: Seq) -> None:
        g = self.owner.pop(seq.seq_id, None)
        if g is not None:
            self.members[g].finish_seq(seq)

    # --- the step ----------------------------------------------------------------------------------
    def schedule(self) -> DPSchedulerOutput:
        return DPSchedulerOutput([m.schedule() for m in self.members])

    def update_from_output(self, out: DPSchedulerOutput, result: DPRunnerOutput) -> None:
        for m, part, res in zip(self.members, out.parts, result.parts, strict=True):
            if not part.is_empty:
                m.update_from_output(part, res)

    # --- what the engine reads ------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return any(m.has_unfinished() for m in self.members)

    def reset_prefix_cache(self) -> None:
        for m in self.members:
            m.reset_prefix_cache()

    @property
    def seqs(self) -> ChainMap:
        return ChainMap(*(m.seqs for m in self.members))

    @property
    def running(self) -> list[Seq]:
        return [s for m in self.members for s in m.running]

    @property
    def waiting(self) -> deque[Seq]:
        return deque(s for m in self.members for s in m.waiting)

    @property
    def num_preemptions(self) -> int:
        return sum(m.num_preemptions for m in self.members)

    @property
    def cache(self) -> BlockManager:
        """DP rank 0's block accounting (each rank has its own: `members[g].cache`)."""
        return self.members[0].cache

    @property
    def mtp_cache(self) -> BlockManager | None:
        return self.members[0].mtp_cache

    def cache_usage(self) -> dict[str, int | float]:
        """The main caches' usage summed over the DP ranks (block size and bytes per block: one rank's)."""
        usages = [m.cache.usage() for m in self.members]
        total = dict(usages[0])
        for key in ("num_blocks", "used_blocks", "free_blocks", "cached_blocks", "used_bytes", "total_bytes"):
            total[key] = sum(u[key] for u in usages)
        return total

    def stats(self) -> dict[str, Any]:
        return {
            "size": len(self.members),
            "routed": list(self.routed),
            "num_running": [len(m.running) for m in self.members],
            "num_waiting": [len(m.waiting) for m in self.members],
            "kv_cache": [m.cache.usage() for m in self.members],
        }


def step_parts(scheduled: Any, result: Any) -> list[tuple[SchedulerOutput, ModelRunnerOutput]]:
    """(SchedulerOutput, ModelRunnerOutput) pairs of a step: one, or one per DP rank that ran something."""
    if isinstance(scheduled, DPSchedulerOutput):
        return [(p, r) for p, r in zip(scheduled.parts, result.parts, strict=True) if not p.is_empty]
    return [(scheduled, result)]
