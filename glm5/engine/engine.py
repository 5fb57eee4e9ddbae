"""The inference engine: continuous batching over a paged latent cache, chunked prefill, sparse decode, speculative
decoding, abort / pause / weight updates (the offline front end `LLM` is in glm5/engine/llm.py).

The engine keeps the requests and runs the step; the work is split along three seams (docs/engine.md):
- `Scheduler` (glm5/engine/scheduler.py): admission, chunked prefill, decode batches, preemption, block
  accounting and prefix-cache hits; each step it writes a `SchedulerOutput`, the only contract with execution;
- `ModelRunner` (glm5/engine/runner.py): executes a SchedulerOutput on the model -- prefill, decode (the fused
  step where it applies), MTP drafting and verification, sampling, logprobs -- over the cache data it owns;
- an `Executor` (glm5/engine/executor.py) holds the runner(s): `UniProcExecutor` calls one in this process.

Each `LLMEngine.step()`:
1. applies what other threads queued (new requests, aborts);
2. `scheduler.schedule()`: every running sequence that has its prompt cached decodes one token (or one
   speculative step); prompts are prefilled in chunks within `max_num_batched_tokens`, new requests joining
   while blocks and `max_num_seqs` allow; when blocks run out the newest sequence is preempted (its blocks
   freed, recomputed later -- mostly from the prefix cache);
3. `executor.execute(output)`: one decode forward over all decoding rows ([B, 1], rows of different lengths)
   and one forward per group of prefill chunks, then sampling;
4. `scheduler.update_from_output(...)` commits what was written to the block accounting; the engine appends
   the sampled tokens, checks stop conditions (freeing finished sequences) and detokenizes;
5. returns the streamed deltas (`RequestOutput`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from glm5.engine.config import EngineConfig
from glm5.engine.dp import DPScheduler, step_parts
from glm5.engine.executor import Executor, make_executor
from glm5.engine.fused import FusedDecoder
from glm5.engine.kv_cache import BlockManager
from glm5.engine.outputs import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionOutput,
    IncrementalDetokenizer,
    RequestOutput,
)
from glm5.engine.request import Request, Seq, Status
from glm5.engine.runner import ModelRunnerOutput
from glm5.engine.sampling import SamplingParams
from glm5.engine.scheduler import Scheduler, SchedulerOutput
from glm5.engine.speculative import MTPDrafter, SpecMetrics

__all__ = ["EngineConfig", "LLMEngine", "Prompt", "Request", "Seq", "Status"]

Prompt = str | list[int]
"""Text or token ids. Text is encoded literally (`tokenizer.encode(text)`): a `<|user|>` or `[gMASK]` spelled in it is
plain text, never the special id (vLLM parses them; here text from users, tools or corpora cannot forge control
tokens). A prompt that needs special tokens is given as ids: `apply_chat_template(...)`, or
`tokenizer.encode(text, allow_special=True)` for template text you wrote yourself."""


class LLMEngine:
    """Continuous-batching engine over one model (see the module docstring). Thread-safe entry points:
    `add_request`, `abort_request`, `pause`, `resume`, `update_weights`; `step` runs on one thread at a time."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        executor: Executor | None = None,
    ) -> None:
        """executor: where the model runs (default: `make_executor`, one runner in this process); a
        `glm5.engine.multiproc.MultiProcExecutor` for a model sharded over processes (model: rank 0's shard)."""
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        if cfg.force_token is not None and cfg.num_speculative_tokens:
            warnings.warn(
                "EngineConfig.force_token (scripted output) is set: speculative decoding is turned off, "
                "since drafts are verified where the hook cannot apply",
                stacklevel=2,
            )
            self.config = cfg = dataclasses.replace(cfg, num_speculative_tokens=0)
        if cfg.max_num_seqs < 1 or cfg.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not isinstance(cfg.decode_steps, int) or not 1 <= cfg.decode_steps <= 64:
            raise ValueError(f"decode_steps={cfg.decode_steps!r}: give an integer from 1 to 64")
        if executor is not None and executor.model is not None:
            model = executor.model
        self.model_config = mcfg = model.config
        self.executor: Executor = executor if executor is not None else make_executor(model, cfg)
        num_blocks, k = self.executor.num_blocks, cfg.num_speculative_tokens
        capacity = (num_blocks - 1) * cfg.block_size - (k + 1)
        self.max_model_len = min(
            cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings, capacity
        )
        if self.max_model_len < 2:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {cfg.block_size}) is too small; give more memory"
            )
        dp = getattr(self.executor, "data_parallel_size", 1)
        if dp > 1:  # data-parallel attention: one scheduler per DP rank (glm5/engine/dp.py)
            make_scheduler: Any = functools.partial(DPScheduler, dp)
        else:
            make_scheduler = Scheduler
        self.scheduler = make_scheduler(
            cfg,
            num_blocks,
            self.max_model_len,
            bytes_per_block=self.executor.bytes_per_block,
            mtp_bytes_per_block=self.executor.mtp_bytes_per_block,
            on_finish=self._finish,
        )
        self.eos_ids = list(tokenizer.eos_token_ids if tokenizer is not None else mcfg.eos_token_id or [])
        self.weight_version = 0
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(cfg.seed)
        self._inbox: list[tuple[str, Any]] = []
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._paused = False
        self._touched: dict[str, Request] = {}
        self.num_steps = 0

    # --- the parts, and what the front ends and tests read through the engine ----------------------
    @property
    def model(self) -> Any:
        """The model, when the runner is in this process."""
        return self.executor.model

    @property
    def device(self) -> torch.device | None:
        runner = self.executor.runner
        return None if runner is None else runner.device

    @property
    def dtype(self) -> torch.dtype | None:
        runner = self.executor.runner
        return None if runner is None else runner.dtype

    @property
    def cache(self) -> BlockManager:
        """The main cache's block accounting (the scheduler's)."""
        return self.scheduler.cache

    @property
    def mtp_cache(self) -> BlockManager | None:
        return self.scheduler.mtp_cache

    @property
    def running(self) -> list[Seq]:
        return self.scheduler.running

    @property
    def waiting(self) -> deque[Seq]:
        return self.scheduler.waiting

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    @property
    def fused(self) -> FusedDecoder | None:
        runner = self.executor.runner
        return None if runner is None else runner.fused

    @property
    def drafter(self) -> MTPDrafter | None:
        runner = self.executor.runner
        return None if runner is None else runner.drafter

    @property
    def spec_metrics(self) -> SpecMetrics | None:
        return None if self.drafter is None else self.drafter.metrics

    # --- public API ------------------------------------------------------------------------------
    def add_request(
        self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None
    ) -> str:
        """Queue a prompt (text, encoded literally, or token ids: see `Prompt`); returns its request id. Safe to
        call from any thread."""
        request = self.make_request(request_id, prompt, params)
        self.submit(request)
        return request.request_id

    def make_request(
        self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None
    ) -> Request:
        """Validate and tokenize a prompt into a `Request` (not queued yet: see `submit`)."""
        params = params or SamplingParams()
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        return self._make_request(request_id, prompt, params)

    def submit(self, request: Request) -> None:
        """Queue a request made by `make_request`; it joins the batch at the next step. Safe from any thread."""
        with self._inbox_lock:
            queued = any(
                kind == "add" and item.request_id == request.request_id for kind, item in self._inbox
            )
            if queued or request.request_id in self.requests:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            self._inbox.append(("add", request))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests; their blocks are freed at the start of the next step. Safe from any thread."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        with self._inbox_lock:
            self._inbox.extend(("abort", r) for r in ids)

    def pause(self) -> None:
        """Stop scheduling: running requests keep their KV cache and continue after `resume`."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def has_queued_work(self) -> bool:
        """Adds or aborts queued for the next step."""
        with self._inbox_lock:
            return bool(self._inbox)

    def has_unfinished_requests(self) -> bool:
        with self._inbox_lock:
            pending = bool(self._inbox)
        return pending or self.scheduler.has_unfinished()

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int | None = None, hf_names: bool = False
    ) -> int:
        """Load new weights between steps (a subset is fine) and tag later tokens with `version` (default: +1).

        Names are the model's own (`model.state_dict()`), or the checkpoint's HF names with hf_names=True. The
        prefix cache is dropped (its latents came from the old weights); running requests continue with the
        cache they have, as RL partial rollouts do, and each token records the version that sampled it.
        """
        with self._step_lock:
            self.executor.update_weights(state_dict, hf_names)
            self.scheduler.reset_prefix_cache()
            self.weight_version = self.weight_version + 1 if version is None else int(version)
            return self.weight_version

    def reset_prefix_cache(self) -> None:
        with self._step_lock:
            self.scheduler.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        """Scheduler, cache and speculative-decoding counters."""
        dp = hasattr(self.scheduler, "members")  # data-parallel attention: every DP rank's caches
        out: dict[str, Any] = {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "weight_version": self.weight_version,
            "kv_cache": self.scheduler.cache_usage() if dp else self.cache.usage(),
        }
        if self.spec_metrics is not None:
            out["speculative"] = self.spec_metrics.as_dict()
        if dp:
            out["data_parallel"] = self.scheduler.stats()
        return out

    def shutdown(self) -> None:
        """Release the executor's runners (worker processes, when there are any)."""
        self.executor.shutdown()

    def step(self) -> list[RequestOutput]:  # (tensor work is the runner's, under its own no_grad)
        """One scheduling + forward round; returns the deltas of every request that changed."""
        with self._step_lock:
            self._apply_inbox()
            if self._paused:
                return self._drain()
            scheduled = self.scheduler.schedule()
            if not scheduled.is_empty:
                result = self.executor.execute(scheduled)
                self.scheduler.update_from_output(scheduled, result)
                for part, part_result in step_parts(scheduled, result):  # one, or one per DP rank
                    self._record(part, part_result)
            self.num_steps += 1
            return self._drain()

    # --- requests --------------------------------------------------------------------------------
    def _make_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(
                f"prompt token ids must be in [0, {vocab}); got {[t for t in ids if not 0 <= t < vocab][:5]}"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this engine holds at most {self.max_model_len} "
                "per sequence (prompt + output). Shorten it or raise max_model_len / the cache size"
            )
        if params.n > self.config.max_num_seqs:
            raise ValueError(
                f"n={params.n} completions exceed this engine's max_num_seqs={self.config.max_num_seqs} (all n run "
                "together); lower n or raise max_num_seqs"
            )
        if (params.stop and params.detokenize) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        request = Request(request_id, text, ids, params)
        request.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        for j in range(params.n):
            if params.seed is None:
                seed = int(torch.randint(0, 2**62, (), generator=self._seed_gen))
            else:  # completion j of a seeded request: its own stream, derived from (seed, j)
                seed = params.seed if j == 0 else hash((params.seed, j)) & ((1 << 62) - 1)
            seq = Seq(next(self._ids), request, j, None if params.greedy else seed)
            if self.tokenizer is not None and params.detokenize:
                seq.detok = IncrementalDetokenizer(
                    self.tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
                )
            request.seqs.append(seq)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        return request

    def _apply_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                if item.request_id in self.requests:  # lost a race with another submit: refuse it, quietly
                    for seq in item.seqs:
                        seq.status, seq.finish_reason = Status.FINISHED, FINISH_ABORT
                    continue
                self.requests[item.request_id] = item
                self.scheduler.add_request(item)
            else:
                request = self.requests.get(item)
                if request is not None:
                    for seq in request.seqs:
                        self._finish(seq, FINISH_ABORT)

    # --- the step's outcome -----------------------------------------------------------------------
    def _record(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """Append what the runner sampled, in its order (stop checks may end sequences part-way)."""
        seqs = self.scheduler.seqs
        for new in scheduled.new_seqs:
            seqs[new.seq_id].runner_state = self.executor.seq_state(new.seq_id)
        for sid, entries in result.prompt_logprobs.items():
            seqs[sid].request.prompt_logprobs += entries
        k = scheduled.num_speculative_tokens
        rows = [
            (seqs[sid], tokens, lps)
            for sid, tokens, lps in zip(result.seq_ids, result.token_ids, result.logprobs)
        ]
        for seq, tokens, lps in rows:
            if k:
                seq.request.metrics.num_draft_tokens += k
                seq.request.metrics.num_accepted_tokens += len(tokens) - 1
            for j, token in enumerate(tokens):
                if seq.status is Status.FINISHED:
                    break
                self._append(seq, token, None if lps is None else lps[j])

    def _append(self, seq: Seq, token: int, logprob: dict[int, float] | None) -> None:
        """Record one generated token and end the sequence if it stops here."""
        req, params = seq.request, seq.request.params
        seq.tokens.append(token)
        seq.weight_versions.append(self.weight_version)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token]
        self._touched[req.request_id] = req
        if token in req.stop_ids and seq.num_output > params.min_tokens - 1:
            return self._finish(seq, FINISH_STOP, token)
        if seq.detok is not None:
            matched = seq.detok.add([token])
            if matched is not None:
                return self._finish(seq, FINISH_STOP, matched)
        out_of_room = len(seq.tokens) >= self.max_model_len
        if (params.max_tokens is not None and seq.num_output >= params.max_tokens) or out_of_room:
            return self._finish(seq, FINISH_LENGTH)

    def _finish(self, seq: Seq, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        self.scheduler.finish_seq(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        req = seq.request
        self._touched[req.request_id] = req
        if req.finished:
            req.metrics.finished_time = time.monotonic()

    # --- outputs ---------------------------------------------------------------------------------
    def _drain(self) -> list[RequestOutput]:
        touched, self._touched = self._touched, {}
        outs = []
        for req in touched.values():
            outs.append(self._delta(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outs

    def _delta(self, req: Request) -> RequestOutput:
        completions = []
        for seq in req.seqs:
            done = seq.status is Status.FINISHED
            new = seq.output_ids[seq.sent_tokens :]
            lps = None if seq.logprobs is None else seq.logprobs[seq.sent_tokens :]
            versions = seq.weight_versions[seq.sent_tokens :]
            seq.sent_tokens = seq.num_output
            text = seq.detok.take(final=done) if seq.detok is not None else ""
            reason = seq.finish_reason if done and not seq.sent_finish else None
            seq.sent_finish = done
            completions.append(
                CompletionOutput(
                    seq.index, text, new, lps, None, reason, seq.stop_reason if reason else None, versions
                )
            )
        prompt_lps = None
        complete = req.prompt_logprobs is not None and len(req.prompt_logprobs) == req.num_prompt
        if complete and not req.prompt_logprobs_sent:
            prompt_lps, req.prompt_logprobs_sent = req.prompt_logprobs, True
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            completions,
            req.finished,
            prompt_lps,
            self.weight_version,
            req.metrics,
            dict(req.params.extra),
        )

    def final_output(self, req: Request) -> RequestOutput:
        """The whole result of a request (what `LLM.generate` returns)."""
        completions = [
            CompletionOutput(
                s.index,
                s.detok.text if s.detok is not None else "",
                s.output_ids,
                s.logprobs,
                s.cumulative_logprob if s.logprobs is not None else None,
                s.finish_reason,
                s.stop_reason,
                s.weight_versions,
            )
            for s in req.seqs
        ]
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            completions,
            req.finished,
            req.prompt_logprobs,
            self.weight_version,
            req.metrics,
            dict(req.params.extra),
        )
