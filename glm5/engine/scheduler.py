"""The scheduler: which sequences run in a step and in which cache blocks, written down as a `SchedulerOutput` --
the only thing the model runner is told (glm5/engine/runner.py; docs/engine.md).

Each `schedule()`:
1. decode first: every running sequence whose prompt is cached decodes one token (k + 1 positions when
   speculating); while the blocks for that do not fit, the newest running sequence is preempted (its blocks
   freed, recomputed later -- mostly from the prefix cache);
2. prompts being prefilled continue in chunks within `max_num_batched_tokens`;
3. waiting sequences are admitted while the token budget, the blocks and `max_num_seqs` allow (a request with
   n > 1 completions counts its n - 1 siblings, which fork from it once its prompt is cached); prefix-cache
   hits give them cached blocks;
4. every write of the step is reserved in the block managers (main cache, and the MTP layer's when
   speculating), and the output carries the block-table changes and copy-on-write copies with the chunks,
   decode rows, forks, preemptions and finished sequences.

`update_from_output` then applies the runner's result to the accounting: lengths and prefix hashes of what was
written, the rollback of rejected drafts, forks. Stop checks and outputs are the engine's (glm5/engine/engine.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glm5.engine.config import EngineConfig
from glm5.engine.kv_cache import BlockManager
from glm5.engine.outputs import FINISH_LENGTH
from glm5.engine.request import Request, Seq, Status
from glm5.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from glm5.engine.runner import ModelRunnerOutput


# ------------------------------------------------------------------------------------------- the contract
@dataclass
class NewSeq:
    """A sequence the runner has not seen, sent once: the first time it is scheduled (or forked)."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    """Its request's sampling settings (without `extra`, which stays with the engine)."""
    seed: int | None
    """Seed of its random generator (None: greedy, no generator)."""
    stop_token_ids: list[int]
    """Ids that may end it: banned while `min_tokens` is not reached."""


@dataclass
class PrefillChunk:
    """Prompt positions [start, start + num_tokens) of a sequence, fed in one forward."""

    seq_id: int
    start: int
    """Positions before it are cached (earlier chunks or prefix-cache hits)."""
    num_tokens: int


@dataclass
class CacheUpdate:
    """What changed in one paged cache's block tables (the main cache, or the MTP layer's)."""

    tables: dict[int, tuple[int, list[int]]] = field(default_factory=dict)
    """seq id -> (start, block ids): the sequence's table from index `start` on (earlier entries are unchanged);
    for every sequence scheduled this step whose table changed since it was last sent."""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """Copy-on-write (source block, destination block), applied in order before the step writes anything."""


@dataclass
class SchedulerOutput:
    """One step for the model runner: plain, picklable data, so that it can be broadcast to worker processes.

    A sequence's prompt and sampling settings come once (`new_seqs`); afterwards only what changes. The runner
    keeps each sequence's tokens (appending what it samples), generator and penalty state, so a decode row is
    just its id. Apply in order: `finished`, `preempted`, `new_seqs`, cache updates, then run `decode` and the
    `prefill` groups (forks happen inside the prefill of their parent).
    """

    step: int
    new_seqs: list[NewSeq] = field(default_factory=list)
    prefill: list[list[PrefillChunk]] = field(default_factory=list)
    """Prefill chunks, grouped into forwards (chunks of similar length batch together), run after decode."""
    decode: list[int] = field(default_factory=list)
    """Sequences that feed their last token (and, when speculating, verify their drafts) in one forward."""
    num_speculative_tokens: int = 0
    """MTP drafts per decode row this step (0: plain decode)."""
    num_decode_steps: int = 1
    """Plain decode: tokens each decode row makes this step, one after another (EngineConfig.decode_steps; every
    row then takes the argmax)."""
    forks: list[tuple[int, int]] = field(default_factory=list)
    """(parent, child): the parent's prompt is cached by this step's prefill; the child then shares its blocks
    and samples its own first token from the same logits (n > 1 completions)."""
    preempted: list[int] = field(default_factory=list)
    """Sequences whose cache rows were dropped since the last output; they come back later as prefill chunks
    (prompt and output so far) and the runner keeps their sampling state meanwhile."""
    finished: list[int] = field(default_factory=list)
    """Sequences that ended since the last output (stop, length, abort): the runner forgets them."""
    kv: CacheUpdate = field(default_factory=CacheUpdate)
    mtp_kv: CacheUpdate | None = None
    """The MTP layer's cache (speculative decoding only)."""

    @property
    def is_empty(self) -> bool:
        """Nothing to run and nothing to forget."""
        return not (self.decode or self.prefill or self.preempted or self.finished)


# ------------------------------------------------------------------------------------------- the scheduler
class Scheduler:
    """Admission, chunked prefill, decode batches, preemption and block accounting (see the module docstring).

    on_finish(seq, reason) is called when the scheduler itself must end a sequence (a prompt the whole cache
    cannot hold); it is expected to call `finish_seq`.
    """

    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        *,
        bytes_per_block: int = 0,
        mtp_bytes_per_block: int = 0,
        on_finish: Callable[[Seq, str], None] | None = None,
    ) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.block_size = config.block_size
        self.max_model_len = max_model_len

        def manager(size: int) -> BlockManager:
            return BlockManager(
                num_blocks,
                config.block_size,
                enable_prefix_caching=config.enable_prefix_caching,
                bytes_per_block=size,
            )

        self.cache = manager(bytes_per_block)
        self.mtp_cache = manager(mtp_bytes_per_block) if self.k else None
        """The MTP layer's entries lag one position behind the main cache's: blocks of their own."""
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.seqs: dict[int, Seq] = {}
        """Every unfinished sequence, by id."""
        self.num_preemptions = 0
        self.on_finish = on_finish
        self._step = 0
        self._known: set[int] = set()  # sequences the runner holds state for
        self._preempted: list[int] = []
        self._finished: list[int] = []

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request: its first sequence waits; the others fork from it once its prompt is cached."""
        first = request.seqs[0]
        first.children = request.seqs[1:]
        for child in first.children:
            child.status = Status.FORK
        for seq in request.seqs:
            self.seqs[seq.seq_id] = seq
        self.waiting.append(first)

    def finish_seq(self, seq: Seq) -> None:
        """Take a sequence out of the queues and free its blocks (the engine records why it ended)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status in (Status.PREFILL, Status.DECODE):
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = Status.FINISHED
        self.seqs.pop(seq.seq_id, None)
        if seq.seq_id in self._known:
            self._known.discard(seq.seq_id)
            self._finished.append(seq.seq_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or bool(self.running)

    def reset_prefix_cache(self) -> None:
        self.cache.reset_prefix_cache()
        if self.mtp_cache is not None:
            self.mtp_cache.reset_prefix_cache()

    # --- scheduling ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide this step (see the module docstring) and reserve its blocks."""
        k = self.k
        decode = [s for s in self.running if s.status is Status.DECODE]
        steps = self._decode_steps(decode)
        # decode first: each row needs room for its next token (k + 1 positions when speculating, `steps` when
        # decoding several tokens)
        while True:
            need = [0, 0]
            for s in decode:
                m, t = self._blocks_for(s, len(s.tokens) + k + steps - 1, len(s.tokens) + k)
                need[0] += m
                need[1] += t
            if self._fits((need[0], need[1])) or not self.running:
                break
            victim = self.running[-1]
            self._preempt(victim)
            decode = [s for s in decode if s is not victim]
        budget = self.config.max_num_batched_tokens
        reserved = list(need)
        chunks: list[tuple[Seq, int]] = []
        for seq in [s for s in self.running if s.status is Status.PREFILL]:
            if budget <= 0:
                break
            n = min(len(seq.tokens) - seq.num_cached, budget)
            blocks = self._blocks_for(seq, seq.num_cached + n)
            if not self._fits((reserved[0] + blocks[0], reserved[1] + blocks[1])):
                break
            reserved = [reserved[0] + blocks[0], reserved[1] + blocks[1]]
            chunks.append((seq, n))
            budget -= n
        # a waiting sequence with n > 1 forks its n - 1 siblings after prefill: admission counts all of them
        occupied = sum(1 + len(s.children) for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if occupied + 1 + len(seq.children) > self.config.max_num_seqs:
                break
            cached = self._admit(seq, reserved)
            if cached is None:
                break
            self.waiting.popleft()
            occupied += 1 + len(seq.children)
            n = min(len(seq.tokens) - cached, budget)
            blocks = self._blocks_for(seq, seq.num_cached + n)
            reserved = [reserved[0] + blocks[0], reserved[1] + blocks[1]]
            chunks.append((seq, n))
            budget -= n
        speculate = bool(k and decode and all(len(s.tokens) + k <= self.max_model_len for s in decode))
        return self._output(decode, self._group_chunks(chunks), k if speculate else 0, steps)

    def _decode_steps(self, decode: list[Seq]) -> int:
        """Tokens per decode row this step: EngineConfig.decode_steps when nothing speculates and every row takes
        the plain argmax, capped by the rows' room (max_model_len) and the tokens they still want; else 1."""
        steps = self.config.decode_steps
        if steps <= 1 or self.k or not decode or self.config.force_token is not None:
            return 1
        for s in decode:
            params = s.request.params
            if not params.argmax_only(s.num_output):
                return 1
            left = params.max_tokens - s.num_output if params.max_tokens is not None else steps
            steps = min(steps, left, self.max_model_len - len(s.tokens) + 1)
        return max(steps, 1)

    def _output(
        self, decode: list[Seq], groups: list[list[tuple[Seq, int]]], k: int, steps: int = 1
    ) -> SchedulerOutput:
        """Reserve every write of the step, in the order the runner makes them, and write the step down."""
        out = SchedulerOutput(
            self._step,
            decode=[s.seq_id for s in decode],
            num_speculative_tokens=k,
            num_decode_steps=steps,
            preempted=self._preempted,
            finished=self._finished,
        )
        self._step += 1
        self._preempted, self._finished = [], []
        mtp = self.mtp_cache
        # positions L-1 .. L-1+k of the main cache (L-2+steps with several decode steps); the MTP catch-up and
        # k - 1 drafts
        for s in decode:
            self.cache.reserve(s.seq_id, len(s.tokens) + k + steps - 1)
            if k and mtp is not None and len(s.tokens) + k - 2 > mtp.length(s.seq_id):
                mtp.reserve(s.seq_id, len(s.tokens) + k - 2)
        scheduled = [s for s in decode]
        for group in groups:
            chunks = []
            for seq, n in group:
                chunks.append(PrefillChunk(seq.seq_id, seq.num_cached, n))
                scheduled.append(seq)
                if seq.seq_id not in self._known:
                    out.new_seqs.append(self._new_seq(seq))
                self.cache.reserve(seq.seq_id, seq.num_cached + n)
                upto = min(seq.num_cached + n, len(seq.tokens) - 1)  # the MTP entry of p needs token p + 1
                if mtp is not None and upto > seq.num_cached:
                    mtp.reserve(seq.seq_id, upto)
                if seq.num_cached + n == len(seq.tokens):
                    for child in seq.children:
                        out.forks.append((seq.seq_id, child.seq_id))
                        out.new_seqs.append(self._new_seq(child))
            out.prefill.append(chunks)
        out.kv = self._cache_update(self.cache, scheduled)
        if mtp is not None:
            out.mtp_kv = self._cache_update(mtp, scheduled)
        return out

    def _new_seq(self, seq: Seq) -> NewSeq:
        self._known.add(seq.seq_id)
        req = seq.request
        # `extra` is the caller's metadata (any object): it stays here instead of travelling to workers
        params = dataclasses.replace(req.params, extra={}) if req.params.extra else req.params
        return NewSeq(seq.seq_id, req.prompt_token_ids, params, seq.seed, sorted(req.stop_ids))

    @staticmethod
    def _cache_update(cache: BlockManager, seqs: list[Seq]) -> CacheUpdate:
        update = CacheUpdate(copies=cache.take_copies())
        for s in seqs:
            change = cache.take_table_update(s.seq_id)
            if change is not None:
                update.tables[s.seq_id] = change
        return update

    def _blocks_for(self, seq: Seq, new_len: int, mtp_len: int | None = None) -> tuple[int, int]:
        main = self.cache.blocks_needed(seq.seq_id if seq.seq_id in self.cache.seqs else None, new_len)
        if self.mtp_cache is None:
            return main, 0
        sid = seq.seq_id if seq.seq_id in self.mtp_cache.seqs else None
        return main, self.mtp_cache.blocks_needed(sid, new_len if mtp_len is None else mtp_len)

    def _fits(self, need: tuple[int, int]) -> bool:
        if not self.cache.can_allocate(need[0]):
            return False
        return self.mtp_cache is None or self.mtp_cache.can_allocate(need[1])

    def _admit(self, seq: Seq, reserved: list[int]) -> int | None:
        """Give a waiting sequence its cache rows (reusing cached prefix blocks); None if it does not fit yet."""
        tokens, bs = seq.tokens, self.block_size
        usable = seq.request.params.prompt_logprobs is None or seq.num_output > 0
        # the last token is always recomputed (its logits)
        max_blocks = (len(tokens) - 1) // bs if usable else 0
        blocks = self.cache.match_prefix(tokens, max_blocks=max_blocks)
        mtp_blocks: list[int] = []
        if self.mtp_cache is not None:
            mtp_blocks = self.mtp_cache.match_prefix(tokens[1:], hash_seed=tokens[0], max_blocks=len(blocks))
            blocks = blocks[: len(mtp_blocks)]
        cached = len(blocks) * bs
        # the whole prompt and one more token must fit, besides what running sequences reserved; matched blocks
        # nobody references leave the free pool when attached
        total = -(-(len(tokens) + 1) // bs)
        new_main = total - len(blocks) + self.cache.num_unreferenced(blocks)
        new_mtp = 0
        if self.mtp_cache is not None:
            kept = mtp_blocks[: len(blocks)]
            new_mtp = total - len(kept) + self.mtp_cache.num_unreferenced(kept)
        need = (reserved[0] + new_main, reserved[1] + new_mtp)
        if not self._fits(need) and self.running:
            return None
        if not self._fits(need):  # alone and still too big: the cache cannot hold this prompt
            for s in [seq, *seq.children]:
                self._end(s, FINISH_LENGTH)
            return None
        self.cache.add_sequence(seq.seq_id)
        self.cache.attach_prefix(seq.seq_id, tokens, blocks)
        if self.mtp_cache is not None:
            self.mtp_cache.add_sequence(seq.seq_id, hash_seed=tokens[0])
            self.mtp_cache.attach_prefix(seq.seq_id, tokens[1:], mtp_blocks[: len(blocks)])
        seq.num_cached = cached
        seq.status = Status.PREFILL
        self.running.append(seq)
        m = seq.request.metrics
        if m.first_scheduled_time is None:
            m.first_scheduled_time = time.monotonic()
            m.num_cached_tokens = cached
        return cached

    def _end(self, seq: Seq, reason: str) -> None:
        if self.on_finish is not None:
            self.on_finish(seq, reason)
        else:
            self.finish_seq(seq)
            seq.finish_reason = reason

    def _preempt(self, seq: Seq) -> None:
        """Free a running sequence's blocks and queue it to be recomputed (prompt + output so far)."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        if seq.seq_id in self._known:
            self._preempted.append(seq.seq_id)

    def _free_blocks(self, seq: Seq) -> None:
        self.cache.free(seq.seq_id)
        if self.mtp_cache is not None:
            self.mtp_cache.free(seq.seq_id)

    @staticmethod
    def _group_chunks(chunks: list[tuple[Seq, int]]) -> list[list[tuple[Seq, int]]]:
        """Batch prefill chunks whose lengths are close (padding waste <= 1/3 of a group's tokens)."""
        groups: list[list[tuple[Seq, int]]] = []
        for item in sorted(chunks, key=lambda c: -c[1]):
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * g[0][1] * 3 <= 4 * (sum(n for _, n in g) + item[1]):
                g.append(item)
            else:
                groups.append([item])
        return groups

    # --- the step's outcome ----------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """What the runner wrote becomes cache content: lengths and prefix hashes, the rollback of rejected
        drafts, the forks of completed prompts. (The sampled tokens are appended by the engine, which checks
        stop conditions; this runs before that, while each sequence's last token is the one it fed.)"""
        k, mtp = out.num_speculative_tokens, self.mtp_cache
        several = k or out.num_decode_steps > 1
        sampled = dict(zip(result.seq_ids, result.token_ids)) if several else {}
        for sid in out.decode:
            seq = self.seqs[sid]
            L = len(seq.tokens)
            if not k:  # the fed token, and with several steps every token made but the last
                fed = seq.tokens[-1:] + (sampled[sid][:-1] if several else [])
                self.cache.commit(sid, fed)
                seq.num_cached += len(fed)
                continue
            if mtp is not None:  # the catch-up entries are exact; the drafts' were rolled back
                mtp.commit(sid, seq.tokens[mtp.length(sid) + 1 : L])
                mtp.release_unused(sid)
            accepted = len(sampled[sid]) - 1
            self.cache.commit(sid, [seq.tokens[-1], *result.draft_token_ids[sid]])
            self.cache.truncate(sid, L + accepted)
            seq.num_cached += accepted + 1
        for group in out.prefill:
            for chunk in group:
                seq = self.seqs[chunk.seq_id]
                start, n = chunk.start, chunk.num_tokens
                self.cache.commit(seq.seq_id, seq.tokens[start : start + n])
                upto = min(start + n, len(seq.tokens) - 1)
                if mtp is not None and upto > start:
                    mtp.commit(seq.seq_id, seq.tokens[start + 1 : upto + 1])
                seq.num_cached += n
                if seq.num_cached == len(seq.tokens):
                    seq.status = Status.DECODE
                    for child in seq.children:  # n > 1: the other completions share the prompt's blocks
                        self._fork(seq, child)
                    seq.children = []

    def _fork(self, parent: Seq, child: Seq) -> None:
        self.cache.fork(parent.seq_id, child.seq_id)
        if self.mtp_cache is not None:
            self.mtp_cache.fork(parent.seq_id, child.seq_id)
        child.tokens = list(parent.tokens)
        child.num_cached = parent.num_cached
        child.status = Status.DECODE
        self.running.append(child)
