"""`RolloutManager`: leases prompt groups from the `DataBuffer`, generates n samples per prompt on an
`LLMEngine`, runs tool environments between turns, scores, filters zero-variance groups, and hands groups back;
on weight updates it drains, aborts (partial rollouts) or updates in place (docs/rl.md § Rollouts).

Token ids, the engine's per-token logprobs and per-token weight versions go straight into `Sample`s; text is
decoded only for the reward and the environment. One manager drives one engine, either inline (`run_until`,
the synchronous loop) or from a background thread (`start`/`stop`, the asynchronous one); weight updates
take the same lock as a scheduling round, so they land between engine steps.

The zero-variance filter is bounded (`max_filtered_per_step`): past the cap, such groups are trained with zero
advantage instead, so a policy turned deterministic cannot starve the trainer. Rewards are scored inline or, with
`reward_workers`, on a thread pool whose pending judges an abort cancels (the group is requeued and judged again).

A rollout engine can span several processes (`make_rollout_engine` with a TP / EP / DP layout: the policy is
saved once to a folder every rank loads its slices of, glm5/engine/multiproc.py). Weight updates then reach every
rank through the executor, which checks that all ranks hold the same bytes (`sync_log` keeps each version's
per-rank hashes). If a rank dies (`EngineDeadError`), the manager builds a new engine with `engine_factory`,
loads the newest weights it was given, and requeues the in-flight groups with their visible prefix, exactly as
an abort does: the buffer's exactly-once accounting holds (`replaced` records each replacement).

Long tails are emulated with `delay_fn(sample) -> seconds per token`: a request's k-th token becomes visible
`(k+1) * delay` after submission (the engine itself runs at full speed), so a slow request holds its group
back exactly as a long generation would, and an abort keeps only the tokens visible so far.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from glm5.engine import LLM
from glm5.engine.engine import LLMEngine
from glm5.engine.multiproc import EngineDeadError
from glm5.engine.sampling import SamplingParams
from glm5.eval.metrics import outcome_rates
from glm5.rl.buffer import BufferConfig, DataBuffer, Lease
from glm5.rl.types import Sample, SampleStatus, new_group
from glm5.tokenizer import parse_output

UPDATE_MODES = ("drain", "abort", "in_place")
PARALLEL_KEYS = ("tensor_parallel_size", "expert_parallel_size", "data_parallel_size")
"""The `LLM` layout options a rollout engine may take (RLRecipe.rollout_parallel)."""
FINISH_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED}
"""A finished request's finish_reason -> the sample's status (anything else: FAILED)."""


@dataclass
class RolloutConfig:
    """How groups are generated and what happens to them at a weight update."""

    n_samples: int = 4
    """Rollouts per prompt (the GRPO group)."""
    max_new_tokens: int = 16
    """Policy tokens per sample, over all turns."""
    temperature: float = 1.0
    """Sampling temperature (the behavior policy mu)."""
    top_p: float = 1.0
    """Nucleus sampling (1 = off: the reported logprobs are then exactly mu's)."""
    filter_zero_variance: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal (they carry no GRPO signal)."""
    max_filtered_per_step: int | None = 64
    """Most zero-variance groups the filter drops per weight version; past it they are kept (zero advantage, so
    no policy gradient) and counted as `zero_variance_kept`, so a policy turned deterministic cannot starve the
    trainer by having every group filtered forever. None = no cap."""
    partial_rollout: bool = True
    """Aborted samples keep their prefix (tokens, logprobs, versions) and continue; False = restart from scratch."""
    update_mode: str = "abort"
    """At a weight update: drain (finish in-flight first), abort (requeue partial groups) or in_place."""
    max_groups_per_round: int = 64
    """Most groups leased per scheduling round."""
    reward_workers: int = 0
    """Threads that score finished groups (0 = inline, in the scheduling round). With workers, generation goes on
    while a slow judge (a reward model, a sandbox) scores, and `abort_all` cancels the pending scoring: the group
    goes back to the buffer at once (a judge already running finishes in the background, its result ignored).
    A weight update does not wait for judges, nor throw their work away."""
    seed: int = 0
    """Base seed: every request's generator is derived from (seed, sample uid, position)."""

    def __post_init__(self) -> None:
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"rollout update_mode must be one of {UPDATE_MODES}, got {self.update_mode!r}")
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout n_samples and max_new_tokens must be >= 1")
        if self.reward_workers < 0:
            raise ValueError(f"rollout reward_workers must be >= 0, got {self.reward_workers}")
        if self.max_filtered_per_step is not None and self.max_filtered_per_step < 0:
            raise ValueError(
                f"rollout max_filtered_per_step must be >= 0 or None, got {self.max_filtered_per_step}"
            )


class _Request:
    """An engine request for one turn of one sample, and the tokens it produced so far."""

    def __init__(self, lease_id: int, sample: Sample, delay: float) -> None:
        self.lease_id, self.sample, self.delay = lease_id, sample, delay
        self.submitted = time.monotonic()
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.finish_reason: str | None = None

    def visible(self, now: float) -> int:
        """Tokens the emulated slow engine has 'produced' by now."""
        if self.delay <= 0:
            return len(self.ids)
        return min(len(self.ids), int((now - self.submitted) / self.delay))

    def ready(self, now: float) -> bool:
        return self.finish_reason is not None and self.visible(now) == len(self.ids)


def pareto_delay(
    alpha: float = 1.5, scale: float = 0.002, cap: float = 0.2, seed: int = 0
) -> Callable[[Sample], float]:
    """Per-token delay drawn from a Pareto(alpha) with minimum `scale` seconds, capped (a long tail of slow
    requests, deterministic per sample and position)."""

    def delay(sample: Sample) -> float:
        rng = random.Random(zlib.crc32(f"{seed}/{sample.uid}/{len(sample.tokens)}".encode()))
        return min(cap, scale * rng.paretovariate(alpha))

    return delay


def plain_reply(text: str, metadata: dict[str, Any]) -> str:
    """The reply is the whole decoded response (token-level toy tasks)."""
    return text


def chat_reply(text: str, metadata: dict[str, Any]) -> str:
    """The final content of a GLM-5 chat response: reasoning and tool calls stripped."""
    return parse_output(text, metadata.get("tools")).get("content") or ""


class RolloutManager:
    """See the module docstring. `engine`: an `LLMEngine`; `buffer`: a `DataBuffer` (or a proxy to one);
    `reward_fn(reply_text, metadata) -> float`; `env`: an optional multi-turn environment with
    `observe(response_text, turn) -> ids | None` and `final_reply(text)`."""

    def __init__(
        self,
        engine: Any,
        buffer: Any,
        reward_fn: Callable[[str, dict], float],
        config: RolloutConfig | None = None,
        *,
        tokenizer: Any = None,
        reply_fn: Callable[[str, dict], str] = plain_reply,
        env: Any = None,
        delay_fn: Callable[[Sample], float] | None = None,
        worker: str = "local",
        engine_factory: Callable[[], Any] | None = None,
    ) -> None:
        """engine_factory: builds a replacement engine when a rank of a multi-process engine dies (None: the
        error propagates)."""
        self.engine, self.buffer, self.reward_fn = engine, buffer, reward_fn
        self.cfg = config or RolloutConfig()
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.reply_fn, self.env, self.delay_fn, self.worker = reply_fn, env, delay_fn, worker
        self.stop_ids = set(getattr(self.tokenizer, "eos_token_ids", None) or engine.eos_ids)
        self.groups: dict[int, tuple[Lease, list[Sample]]] = {}
        self.requests: dict[str, _Request] = {}
        self.scoring: dict[
            int, tuple[Future, Lease, list[Sample], list[str | None]]
        ] = {}  # groups being judged
        self._judges = (
            ThreadPoolExecutor(self.cfg.reward_workers, thread_name_prefix=f"reward-{worker}")
            if self.cfg.reward_workers
            else None
        )
        self.stats: Counter[str] = Counter()
        self.gen_seconds: list[float] = []
        self._rewards: list[float] = []
        self._filtered_at = (-1, 0)  # (weight version, zero-variance groups filtered at it)
        self._ids = 0
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._leasing = True
        self.error: BaseException | None = None
        self.engine_factory = engine_factory
        self._weights: tuple[dict, int] | None = (
            None  # the newest weights loaded (a reference): for a replacement
        )
        self.sync_log: list[dict[str, Any]] = []
        """Per weight update of a multi-process engine: {"version", "hashes": {rank: hash}} (all equal)."""
        self.replaced: list[dict[str, Any]] = []
        """Per engine replacement: the dead rank, the error, groups requeued, the version loaded before serving."""

    # --- one scheduling round --------------------------------------------------------------------
    def step(self) -> bool:
        """Lease what admission allows, advance the engine one step, finish what is done. Returns whether any
        work is in flight."""
        with self._lock:
            if self._leasing:
                for lease in self.buffer.lease(self.worker, self.cfg.max_groups_per_round):
                    self._start_group(lease)
            if self.engine.has_unfinished_requests():
                try:
                    outs = self.engine.step()
                except Exception as exc:
                    if not self._replace_engine(exc):
                        raise
                    outs = []
                for out in outs:
                    self._collect(out)
            self._finish_ready(time.monotonic())
            self._collect_scores()
            return bool(self.groups or self.scoring)

    def run_until(self, done: Callable[[], bool], timeout: float = 600.0) -> None:
        """Drive the engine inline (the synchronous loop) until `done()`; idle rounds sleep briefly."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout did not finish within {timeout:.0f} s (buffer: {self.buffer.counts()})"
                )
            if not self.step() or not self.engine.has_unfinished_requests():
                time.sleep(0.001)

    def _start_group(self, lease: Lease) -> None:
        samples = lease.samples
        if samples is None:
            samples = new_group(
                lease.prompt_id, lease.epoch, lease.prompt, self.cfg.n_samples, lease.metadata
            )
        elif not self.cfg.partial_rollout:
            for s in samples:
                if not s.done:
                    s.reset_response()
        self.groups[lease.lease_id] = (lease, samples)
        for s in samples:
            if not s.done:
                self._submit(lease.lease_id, s)

    def _submit(self, lease_id: int, sample: Sample) -> None:
        budget = self.cfg.max_new_tokens - sum(sample.loss_mask)
        room = self.engine.max_model_len - len(sample.tokens)
        if budget <= 0 or room <= 0:
            sample.status = SampleStatus.TRUNCATED
            return
        sample.status = SampleStatus.PENDING
        self._ids += 1
        rid = f"{self.worker}:{sample.uid}:{self._ids}"
        seed = zlib.crc32(f"{self.cfg.seed}/{sample.uid}/{len(sample.tokens)}".encode())
        params = SamplingParams(
            max_tokens=min(budget, room),
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            logprobs=0,
            seed=seed,
            detokenize=False,
        )
        delay = self.delay_fn(sample) if self.delay_fn is not None else 0.0
        self.requests[rid] = _Request(lease_id, sample, delay)
        self.engine.add_request(rid, list(sample.tokens), params)

    def _collect(self, out: Any) -> None:
        req = self.requests.get(out.request_id)
        if req is None:
            return
        c = out.outputs[0]
        req.ids += c.token_ids
        req.logprobs += [d[t] for d, t in zip(c.logprobs or [], c.token_ids)]
        req.versions += c.weight_versions
        if c.finish_reason is not None:
            req.finish_reason = c.finish_reason

    def _finish_ready(self, now: float) -> None:
        for rid in [r for r, req in self.requests.items() if req.ready(now)]:
            req = self.requests.pop(rid)
            s = req.sample
            s.append(req.ids, req.logprobs, req.versions, trainable=True)
            self.stats["tokens"] += len(req.ids)
            self.gen_seconds.append(now - req.submitted)
            if req.finish_reason == "stop" and self.env is not None:
                turn = s.metadata.get("turn", 0)
                # the whole turn, stop token kept (the env reads it): a resumed partial rollout's request holds
                # only the continuation, the turn may have started (even its tool call) before the abort
                obs = self.env.observe(self.tokenizer.decode(self._last_turn(s)), turn)
                if obs:
                    s.metadata["turn"] = turn + 1
                    s.append(
                        list(obs), [0.0] * len(obs), [self.engine.weight_version] * len(obs), trainable=False
                    )
                    self._submit(req.lease_id, s)
                    continue
            s.status = FINISH_STATUS.get(req.finish_reason, SampleStatus.FAILED)
        for lease_id in [i for i, (_, group) in self.groups.items() if all(s.done for s in group)]:
            lease, group = self.groups.pop(lease_id)
            replies = self._replies(group)
            if self._judges is None:
                self._score_group(lease, group, replies, self._judge(group, replies))
            else:
                self.scoring[lease_id] = (
                    self._judges.submit(self._judge, group, replies),
                    lease,
                    group,
                    replies,
                )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stop_ids])

    def _last_turn(self, s: Sample) -> list[int]:
        mask = s.loss_mask
        start = len(mask)
        while start > 0 and mask[start - 1]:
            start -= 1
        return s.response_ids[start:]

    def _replies(self, group: list[Sample]) -> list[str | None]:
        """The final reply of each sample still to be scored (None: already scored)."""
        replies: list[str | None] = []
        for s in group:
            if s.reward is not None:
                replies.append(None)
                continue
            text = self._decode(self._last_turn(s))
            replies.append(
                self.env.final_reply(text) if self.env is not None else self.reply_fn(text, s.metadata)
            )
        return replies

    def _judge(self, group: list[Sample], replies: list[str | None]) -> list[float | None]:
        """The rewards of the replies (on a reward worker when there are any: it reads the samples, never writes)."""
        rewards: list[float | None] = []
        for s, reply in zip(group, replies):
            if reply is None:
                rewards.append(None)  # scored before
            else:
                rewards.append(
                    float(self.reward_fn(reply, s.metadata)) if s.status != SampleStatus.FAILED else 0.0
                )
        return rewards

    def _collect_scores(self) -> None:
        for lease_id in [i for i, (future, *_) in self.scoring.items() if future.done()]:
            future, lease, group, replies = self.scoring.pop(lease_id)
            rewards = future.result()  # a judge's exception surfaces here, like an inline one
            self._score_group(lease, group, replies, rewards)

    def _score_group(
        self, lease: Lease, group: list[Sample], replies: list[str | None], rewards: list[float | None]
    ) -> None:
        lease_id = lease.lease_id
        for s, reply, reward in zip(group, replies, rewards):
            if reward is not None:
                s.reward, s.metadata["reply"] = reward, reply
        self.stats["groups"] += 1
        self.stats["samples"] += len(group)
        self._rewards += [float(s.reward) for s in group]
        if self.cfg.filter_zero_variance and len({s.reward for s in group}) == 1:
            if self._may_filter():
                self.stats["filtered"] += 1
                self.buffer.filter(lease_id, "zero_variance")
                return
            self.stats["zero_variance_kept"] += 1
            for s in group:
                s.metadata["zero_variance_kept"] = True
        self.buffer.complete(lease_id, group)

    def _may_filter(self) -> bool:
        """Whether the filter may drop one more group at the engine's weight version (and count it if so)."""
        cap, version = self.cfg.max_filtered_per_step, self.engine.weight_version
        seen, count = self._filtered_at
        count = count if seen == version else 0
        if cap is not None and count >= cap:
            return False
        self._filtered_at = (version, count + 1)
        return True

    # --- weight updates --------------------------------------------------------------------------
    def abort_all(self) -> int:
        """Abort every in-flight request; groups go back to the buffer with their partial samples (prefix
        tokens, logprobs and versions) when partial rollouts are on, else to restart. Returns groups requeued."""
        with self._lock:
            now = time.monotonic()
            # a request whose end is already visible finished: it is not cut (and resumed)
            self._finish_ready(now)
            if self.requests:
                self.engine.abort_request(list(self.requests))
                try:
                    self.engine.step()  # applies the aborts; their last deltas are dropped: only visible tokens count
                except Exception as exc:  # a dead rank: the replacement aborts (requeues) everything itself
                    if not self._replace_engine(exc):
                        raise
                    return self.replaced[-1]["requeued_groups"]
            for req in self.requests.values():
                keep = req.visible(now)
                req.sample.append(req.ids[:keep], req.logprobs[:keep], req.versions[:keep], trainable=True)
                req.sample.status = SampleStatus.ABORTED
            self.requests.clear()
            n = 0
            for lease_id, (future, _, group, _) in list(self.scoring.items()):
                future.cancel()  # a judge not started never runs; a running one is ignored
                del self.scoring[lease_id]
                self.buffer.requeue(lease_id, group if self.cfg.partial_rollout else None)
                self.stats["scoring_cancelled"] += 1
                n += 1
            for lease_id, (_, group) in list(self.groups.items()):
                if all(s.done for s in group):
                    continue
                del self.groups[lease_id]
                self.buffer.requeue(lease_id, group if self.cfg.partial_rollout else None)
                self.stats["aborted_groups"] += 1
                n += 1
            self._finish_ready(now)
            return n

    def update_weights(self, state_dict: dict, version: int) -> None:
        """Load new weights by the configured mode; requests issued afterwards carry `version`."""
        mode = self.cfg.update_mode
        if mode == "drain":
            self._leasing = False
            try:
                while True:
                    with self._lock:
                        if not self.requests:
                            self._load(state_dict, version)
                            break
                        self.step()
            finally:
                self._leasing = True
            return
        with self._lock:
            if mode == "abort":
                self.abort_all()
            self._load(state_dict, version)

    def _load(self, state_dict: dict, version: int) -> None:
        """engine.update_weights, recording a multi-process engine's per-rank hashes; a dead rank here replaces
        the engine (which then loads these weights)."""
        self._weights = (state_dict, version)
        try:
            self.engine.update_weights(state_dict, version)
        except Exception as exc:
            if not self._replace_engine(exc):
                raise
            return
        hashes = getattr(self.engine.executor, "weight_hashes", None)
        if hashes:
            self.sync_log.append({"version": version, "hashes": dict(hashes)})

    def _replace_engine(self, exc: BaseException) -> bool:
        """A rank of the engine died: build a new engine, load the newest weights, requeue the in-flight groups
        (their visible prefix kept, as an abort does). False when this is not a dead engine or there is no
        factory."""
        if not isinstance(exc, EngineDeadError) or self.engine_factory is None:
            return False
        with self._lock:
            try:  # first: its process group must be gone before the new engine forms one in this process
                self.engine.shutdown()
            except Exception:  # noqa: BLE001 - the dead engine's processes are gone or killed here
                pass
            engine = self.engine_factory()
            if self._weights is not None:
                state, version = self._weights
                engine.update_weights(state, version)
                hashes = getattr(engine.executor, "weight_hashes", None)
                if hashes:
                    self.sync_log.append({"version": version, "hashes": dict(hashes)})
            self.engine = engine
            in_flight = len(self.groups)
            # the in-flight request ids are unknown to the new engine: only the books change
            requeued = self.abort_all()
            self.stats["engine_replacements"] += 1
            self.replaced.append(
                {
                    "dead_rank": getattr(exc, "rank", None),
                    "error": str(exc),
                    "groups_in_flight": in_flight,
                    "requeued_groups": requeued,
                    "version_before_serving": engine.weight_version,
                }
            )
        return True

    def sync_weights(self, transport: Any, version: int) -> None:
        """Fetch `version` from a WeightTransport and load it (see update_weights)."""
        state, got = transport.fetch(version)
        self.update_weights(state, got)

    @property
    def version(self) -> int:
        return self.engine.weight_version

    # --- background mode -------------------------------------------------------------------------
    def start(self) -> None:
        """Generate continuously on a background thread (the asynchronous mode)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{self.worker}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.step()
                time.sleep(0 if busy and self.engine.has_unfinished_requests() else 0.001)
        except BaseException as exc:  # surfaced to the controller by check()
            self.error = exc

    def check(self) -> None:
        """Raise the background thread's error, if any."""
        if self.error is not None:
            raise RuntimeError(f"rollout worker {self.worker} failed: {self.error!r}") from self.error

    def stop(self, requeue: bool = True) -> None:
        """Stop the background thread; in-flight groups are requeued (partial) so none is lost."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if requeue:
            self.abort_all()

    def metrics(self) -> dict[str, float]:
        times, rewards = sorted(self.gen_seconds), self._rewards
        self.gen_seconds, self._rewards = [], []
        out = {f"rollout_{k}": float(v) for k, v in self.stats.items()}
        if rewards:  # every scored sample since the last call, before the dynamic filter (unbiased)
            out["rollout_reward"] = sum(rewards) / len(rewards)
        if times:
            out["gen_time_p50"] = times[len(times) // 2]
            out["gen_time_max"] = times[-1]
        return out


def make_rollout_engine(
    policy: Any,
    tokenizer: Any,
    config: Any,
    parallel: dict[str, int] | None = None,
    folder: str | None = None,
) -> tuple[Any, Callable[[], Any]]:
    """(engine, factory) for a policy: an in-process `LLMEngine` over a copy of it, or, with a layout in
    `parallel` (PARALLEL_KEYS, as `LLM` takes them), a multi-process engine loaded from the policy saved once to
    `folder`/rollout-init (default: a new temporary folder; every rank reads its slices, later weights arrive by
    `update_weights`). `factory()` builds another such engine (the replacement for a dead one)."""
    layout = {k: int(v) for k, v in (parallel or {}).items() if int(v) != 1}
    unknown = sorted(set(layout) - set(PARALLEL_KEYS))
    if unknown:
        raise ValueError(f"rollout_parallel: unknown keys {unknown}; use {list(PARALLEL_KEYS)}")
    if not layout:

        def local() -> Any:
            model = type(policy)(policy.config)  # the engine holds its own copy, synced through the transport
            model.load_state_dict(policy.state_dict())
            return LLMEngine(model, tokenizer, config)

        return local(), local

    if folder is None:
        folder = tempfile.mkdtemp(prefix="glm5-rollout-")
    path = os.path.join(folder, "rollout-init")
    policy.save_pretrained(path)
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

    def sharded() -> Any:
        return LLM(path, tokenizer, **layout, **options).engine

    return sharded(), sharded


def evaluate_policy(
    engine: Any,
    prompts: list[dict[str, Any]],
    reward_fn: Callable[[str, dict], float],
    *,
    max_new_tokens: int,
    tokenizer: Any = None,
    reply_fn: Callable[[str, dict], str] = plain_reply,
    env: Any = None,
) -> dict[str, Any]:
    """Greedy answers to held-out prompts on `engine` (at its current weight version): mean reward, and the
    accuracy, abstention and hallucination rates of `glm5.eval.metrics.outcome_rates`."""
    buffer = DataBuffer(
        prompts,
        BufferConfig(batch_size=len(prompts), max_concurrent=len(prompts), num_epochs=1, shuffle=False),
    )
    cfg = RolloutConfig(
        n_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, filter_zero_variance=False
    )
    manager = RolloutManager(
        engine, buffer, reward_fn, cfg, tokenizer=tokenizer, reply_fn=reply_fn, env=env, worker="eval"
    )
    manager.run_until(lambda: buffer.num_ready() == len(prompts))
    samples = [g[0] for g in buffer.get_batch(len(prompts))]
    replies = [str(s.metadata.get("reply", "")) for s in samples]
    return {
        "reward": sum(float(s.reward) for s in samples) / len(samples),
        **outcome_rates(samples),
        "num_prompts": len(samples),
        "version": engine.weight_version,
        "examples": [
            {"prompt_id": s.prompt_id, "reply": r, "answer": s.metadata.get("answer"), "reward": s.reward}
            for s, r in zip(samples[:6], replies[:6])
        ],
    }
