"""The inference engine: continuous batching over a paged latent cache, chunked prefill, sparse decode, speculative
decoding, abort / pause / weight updates (the offline front end `LLM` is in glm5/engine/llm.py).

Each `LLMEngine.step()`:
1. applies what other threads queued (new requests, aborts);
2. schedules: every running sequence that has its prompt cached decodes one token (or one speculative step);
   prompts are prefilled in chunks within `max_num_batched_tokens`, new requests joining while blocks and
   `max_num_seqs` allow; when blocks run out the newest sequence is preempted (its blocks freed, recomputed
   later -- mostly from the prefix cache);
3. runs one decode forward over all decoding rows ([B, 1], rows of different lengths) and one forward per group
   of prefill chunks, samples, checks stop conditions, frees finished sequences;
4. returns the streamed deltas (`RequestOutput`).

Decode attention is DSA's: the indexer scores the cached indexer keys, the top-k latent entries are gathered,
and MLA runs in the weight-absorbed form over them (cost O(index_topk) per token after the indexer). The one
host sync per step is the `.tolist()` of the sampled ids (plus logprobs when asked for).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from glm5.engine.fused import FusedDecoder
from glm5.engine.kv_cache import PagedLatentCache
from glm5.engine.outputs import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionOutput,
    IncrementalDetokenizer,
    RequestMetrics,
    RequestOutput,
)
from glm5.engine.sampling import (
    BatchSampling,
    PenaltyState,
    SamplingParams,
    draw_uniforms,
    logprob_dicts,
    make_generator,
    sample,
    token_logprobs,
)
from glm5.engine.speculative import MTPDrafter, SpecMetrics, verify

Prompt = str | list[int]
"""Text or token ids. Text is encoded literally (`tokenizer.encode(text)`): a `<|user|>` or `[gMASK]` spelled in it is
plain text, never the special id (vLLM parses them; here text from users, tools or corpora cannot forge control
tokens). A prompt that needs special tokens is given as ids: `apply_chat_template(...)`, or
`tokenizer.encode(text, allow_special=True)` for template text you wrote yourself."""


@dataclass
class EngineConfig:
    """Engine settings that do not change the model."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """Blocks in the cache (None: as many as `kv_cache_memory` holds)."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache (None: 2 GiB on CPU -- touched only as used -- else 80% of free device memory)."""
    max_num_seqs: int = 256
    """Most sequences running at once (the decode batch)."""
    max_num_batched_tokens: int = 2048
    """Prefill tokens per step: longer prompts are prefilled in chunks, interleaved with decode steps."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None = the config's max_position_embeddings (capped by the cache)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    num_speculative_tokens: int = 0
    """MTP draft tokens per step (0 = off, 1-3 = speculative decoding)."""
    seed: int = 0
    """Seeds the generators of requests that bring no seed of their own."""
    attention_impl: str | None = None
    """Override the model's attention path ("sparse" or the dense "mask" reference)."""
    fused_decode: bool | None = None
    """Decode steps (and speculative verification / MTP drafting) through glm5.engine.fused.FusedDecoder: packed
    projections and folded norms, each layer one call into the native C kernel where a C compiler exists.
    None: on for float32 models on a CPU, where dispatch dominates decode; the model's own forward otherwise
    (or when the model is unsupported: FP8 "keep" weights, the "mask" attention). True asks for it anywhere."""
    force_token: Callable[[list[int], list[int]], int | None] | None = None
    """Scripted output: `(prompt ids, output ids so far) -> token id to emit instead of the sampled one, or None`.
    The forced token then goes through the usual logprobs, stop and streaming handling (glm5/serve/scripted.py
    replays given outputs with random weights). Speculative decoding is turned off while it is set: verification
    samples inside the verify kernel, where the hook could not apply."""


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FORK = "fork"
    """An n > 1 completion waiting for the first one's prefill (it then shares its blocks)."""
    FINISHED = "finished"


class Seq:
    """One completion being generated: its tokens, cache rows, sampling state and output so far."""

    def __init__(self, seq_id: int, request: Request, index: int, generator: torch.Generator | None) -> None:
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.tokens: list[int] = list(request.prompt_token_ids)
        self.num_cached = 0
        self.status = Status.WAITING
        self.generator = generator
        self.penalty: PenaltyState | None = None
        self.detok: IncrementalDetokenizer | None = None
        self.logprobs: list[dict[int, float]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.weight_versions: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.pending_hidden: torch.Tensor | None = None
        self.children: list[Seq] = []
        self.sent_tokens = 0
        self.sent_finish = False

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.request.num_prompt :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.request.num_prompt


class Request:
    """A prompt, its sampling parameters and its n sequences."""

    def __init__(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt = len(prompt_token_ids)
        self.params = params
        self.seqs: list[Seq] = []
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_logprobs_sent = False
        self.stop_ids: set[int] = set()

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)


class LLMEngine:
    """Continuous-batching engine over one model (see the module docstring). Thread-safe entry points:
    `add_request`, `abort_request`, `pause`, `resume`, `update_weights`; `step` runs on one thread at a time."""

    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        if cfg.force_token is not None and cfg.num_speculative_tokens:
            warnings.warn("EngineConfig.force_token (scripted output) is set: speculative decoding is turned off, "
                          "since drafts are verified where the hook cannot apply", stacklevel=2)  # fmt: skip
            self.config = cfg = dataclasses.replace(cfg, num_speculative_tokens=0)
        mcfg = model.config
        if cfg.attention_impl is not None:
            model.configure_attention(impl=cfg.attention_impl)
        embed = model.model.embed_tokens.weight  # never quantised: the compute dtype even for FP8 checkpoints
        self.device, self.dtype = embed.device, embed.dtype
        if cfg.max_num_seqs < 1 or cfg.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        k = cfg.num_speculative_tokens
        layers = list(range(mcfg.num_hidden_layers))
        mtp_layers = [mcfg.num_hidden_layers] if k else []
        per_block = PagedLatentCache.block_bytes(mcfg, cfg.block_size, layers + mtp_layers, self.dtype)
        # never more than every sequence at full length needs
        longest = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        most = cfg.max_num_seqs * (-(-(longest + k + 1) // cfg.block_size)) + 1
        num_blocks = cfg.num_blocks or max(2, min(self._default_cache_bytes() // per_block, most))

        def make(cached_layers: list[int]) -> PagedLatentCache:
            return PagedLatentCache(mcfg, num_blocks, cfg.block_size, layers=cached_layers, dtype=self.dtype,
                                    device=self.device, enable_prefix_caching=cfg.enable_prefix_caching)  # fmt: skip

        self.cache = make(layers)
        self.mtp_cache = (
            make(mtp_layers) if k else None
        )  # the MTP layer's entries lag one position: own cache
        self.fused = self._make_fused(cfg.fused_decode)
        self.drafter = MTPDrafter(model, self.mtp_cache, k, self.fused) if k else None
        capacity = (num_blocks - 1) * cfg.block_size - (k + 1)
        self.max_model_len = min(
            cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings, capacity
        )
        if self.max_model_len < 2:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {cfg.block_size}) is too small; give more memory"
            )
        self.eos_ids = list(tokenizer.eos_token_ids if tokenizer is not None else mcfg.eos_token_id or [])
        self.weight_version = 0
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._ids = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(cfg.seed)
        self._inbox: list[tuple[str, Any]] = []
        self._inbox_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._paused = False
        self._touched: dict[str, Request] = {}
        self.num_steps = 0
        self.num_preemptions = 0

    def _make_fused(self, wanted: bool | None) -> FusedDecoder | None:
        if wanted is False or (wanted is None and self.device.type != "cpu"):
            return None
        reason = FusedDecoder.unsupported(self.model)
        if reason is None:
            return FusedDecoder(self.model)
        if wanted:
            raise ValueError(f"EngineConfig(fused_decode=True) cannot run this model: {reason}")
        return None

    def _default_cache_bytes(self) -> int:
        if self.config.kv_cache_memory is not None:
            return int(self.config.kv_cache_memory)
        if self.device.type == "cpu":
            return 2 << 30
        backend = getattr(torch, self.device.type, None)
        if backend is not None and hasattr(backend, "mem_get_info"):
            free, _ = backend.mem_get_info(self.device)
            return int(free * 0.8)
        return 2 << 30

    # --- public API ------------------------------------------------------------------------------
    @property
    def spec_metrics(self) -> SpecMetrics | None:
        return None if self.drafter is None else self.drafter.metrics

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
        return pending or bool(self.waiting) or bool(self.running)

    @torch.no_grad()
    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int | None = None, hf_names: bool = False
    ) -> int:
        """Load new weights between steps (a subset is fine) and tag later tokens with `version` (default: +1).

        Names are the model's own (`model.state_dict()`), or the checkpoint's HF names with hf_names=True. The
        prefix cache is dropped (its latents came from the old weights); running requests continue with the
        cache they have, as RL partial rollouts do, and each token records the version that sampled it.
        """
        with self._step_lock:
            if hf_names:
                self.model.load_hf_state_dict(state_dict, strict=False)
            else:
                own = self.model.state_dict()
                unknown = [k for k in state_dict if k not in own]
                if unknown:
                    raise ValueError(
                        f"update_weights: unknown parameter names {unknown[:5]}; use the model's "
                        "state_dict names, or hf_names=True for checkpoint names"
                    )
                for name, value in state_dict.items():
                    if own[name].dtype == torch.float8_e4m3fn and value.dtype != own[name].dtype:
                        raise ValueError(
                            f"update_weights: {name} is held in FP8 (fp8='keep'); send e4m3 weights "
                            "with their weight_scale_inv, or serve with fp8='dequantize'"
                        )
                    if own[name].shape != value.shape:
                        raise ValueError(
                            f"update_weights: {name} has shape {tuple(value.shape)}, "
                            f"expected {tuple(own[name].shape)}"
                        )
                    own[name].copy_(value)
            self.cache.reset_prefix_cache()
            if self.mtp_cache is not None:
                self.mtp_cache.reset_prefix_cache()
            if self.fused is not None:
                self.fused.invalidate()
            self.weight_version = self.weight_version + 1 if version is None else int(version)
            return self.weight_version

    def reset_prefix_cache(self) -> None:
        with self._step_lock:
            self.cache.reset_prefix_cache()
            if self.mtp_cache is not None:
                self.mtp_cache.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        """Scheduler, cache and speculative-decoding counters."""
        out: dict[str, Any] = {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_steps": self.num_steps,
            "num_preemptions": self.num_preemptions,
            "weight_version": self.weight_version,
            "kv_cache": self.cache.usage(),
        }
        if self.drafter is not None:
            out["speculative"] = self.drafter.metrics.as_dict()
        return out

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """One scheduling + forward round; returns the deltas of every request that changed."""
        with self._step_lock:
            self._apply_inbox()
            if self._paused:
                return self._drain()
            prefill, decode = self._schedule()
            if decode:
                k = self.config.num_speculative_tokens
                with self.fused.step() if self.fused is not None else contextlib.nullcontext():
                    if k and all(len(s.tokens) + k <= self.max_model_len for s in decode):
                        self._speculative_step(decode)
                    else:
                        self._decode_step(decode)
            for group in self._group_chunks(prefill):
                self._prefill_step(group)
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
        vocab = self.model.config.vocab_size
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
            gen = None if params.greedy else make_generator(seed, self.device)
            seq = Seq(next(self._ids), request, j, gen)
            if params.has_penalties:
                seq.penalty = PenaltyState.create(ids, vocab, self.device)
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
                first = item.seqs[0]
                first.children = item.seqs[1:]
                for child in first.children:
                    child.status = Status.FORK
                self.waiting.append(first)
            else:
                request = self.requests.get(item)
                if request is not None:
                    for seq in request.seqs:
                        self._finish(seq, FINISH_ABORT)

    # --- scheduling ------------------------------------------------------------------------------
    def _blocks_for(self, seq: Seq, new_len: int, mtp_len: int | None = None) -> tuple[int, int]:
        main = self.cache.blocks_needed(seq.seq_id if seq.seq_id in self.cache.seqs else None, new_len)
        if self.mtp_cache is None:
            return main, 0
        sid = seq.seq_id if seq.seq_id in self.mtp_cache.seqs else None
        return main, self.mtp_cache.blocks_needed(sid, new_len if mtp_len is None else mtp_len)

    def _fits(self, need: tuple[int, int]) -> bool:
        if need[0] > self.cache.num_free_blocks:
            return False
        return self.mtp_cache is None or need[1] <= self.mtp_cache.num_free_blocks

    def _schedule(self) -> tuple[list[tuple[Seq, int]], list[Seq]]:
        """-> (prefill chunks [(seq, num_tokens)], decoding sequences), with their blocks guaranteed."""
        k = self.config.num_speculative_tokens
        decode = [s for s in self.running if s.status is Status.DECODE]
        # decode first: each row needs room for its next token (k + 1 positions when speculating)
        while True:
            need = [0, 0]
            for s in decode:
                m, t = self._blocks_for(s, len(s.tokens) + k, len(s.tokens) + k)
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
        return chunks, decode

    def _admit(self, seq: Seq, reserved: list[int]) -> int | None:
        """Give a waiting sequence its cache rows (reusing cached prefix blocks); None if it does not fit yet."""
        tokens, bs = seq.tokens, self.config.block_size
        usable = seq.request.params.prompt_logprobs is None or seq.num_output > 0
        max_blocks = (
            (len(tokens) - 1) // bs if usable else 0
        )  # the last token is always recomputed (its logits)
        blocks = self.cache.match_prefix(tokens, max_blocks=max_blocks)
        mtp_blocks: list[int] = []
        if self.mtp_cache is not None:
            mtp_blocks = self.mtp_cache.match_prefix(tokens[1:], hash_seed=tokens[0], max_blocks=len(blocks))
            blocks = blocks[: len(mtp_blocks)]
        cached = len(blocks) * bs
        # the whole prompt and one more token must fit, besides what running sequences reserved; matched blocks
        # nobody references leave the free pool when attached
        total = -(-(len(tokens) + 1) // bs)
        new_main = total - len(blocks) + sum(self.cache.pool.refcount[b] == 0 for b in blocks)
        new_mtp = 0
        if self.mtp_cache is not None:
            kept = mtp_blocks[: len(blocks)]
            new_mtp = total - len(kept) + sum(self.mtp_cache.pool.refcount[b] == 0 for b in kept)
        need = (reserved[0] + new_main, reserved[1] + new_mtp)
        if not self._fits(need) and self.running:
            return None
        if not self._fits(need):  # alone and still too big: the cache cannot hold this prompt
            self._finish(seq, FINISH_LENGTH)
            for child in seq.children:
                self._finish(child, FINISH_LENGTH)
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

    def _preempt(self, seq: Seq) -> None:
        """Free a running sequence's blocks and queue it to be recomputed (prompt + output so far)."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        if self.mtp_cache is not None:
            self.mtp_cache.free(seq.seq_id)
        seq.num_cached = 0
        seq.pending_hidden = None
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _group_chunks(self, chunks: list[tuple[Seq, int]]) -> list[list[tuple[Seq, int]]]:
        """Batch prefill chunks whose lengths are close (padding waste <= 1/3 of a group's tokens)."""
        groups: list[list[tuple[Seq, int]]] = []
        for item in sorted(chunks, key=lambda c: -c[1]):
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * g[0][1] * 3 <= 4 * (sum(n for _, n in g) + item[1]):
                g.append(item)
            else:
                groups.append([item])
        return groups

    # --- forwards --------------------------------------------------------------------------------
    def _prefill_step(self, group: list[tuple[Seq, int]]) -> None:
        seqs = [s for s, _ in group]
        counts = [n for _, n in group]
        starts = [s.num_cached for s in seqs]
        rows = [s.tokens[st : st + n] for s, st, n in zip(seqs, starts, counts)]
        self.cache.prepare([s.seq_id for s in seqs], rows)
        T = max(counts)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)
        out = self.model(ids, self.cache, return_hidden=True, num_logits_to_keep=1)
        hidden = out.hidden_states
        for s, n in zip(seqs, counts):
            s.num_cached += n
        if self.drafter is not None:
            self.drafter.prefill(seqs, hidden, starts, counts)
        self._prompt_logprobs(seqs, hidden, starts, counts)
        done = [b for b, s in enumerate(seqs) if s.num_cached == len(s.tokens)]
        if not done:
            return
        last = hidden[
            torch.tensor(done, device=self.device),
            torch.tensor([counts[b] - 1 for b in done], device=self.device),
        ]
        logits = self.model.lm_head(last)
        sample_rows: list[tuple[Seq, int]] = []
        for i, b in enumerate(done):
            seq = seqs[b]
            seq.status = Status.DECODE
            sample_rows.append((seq, i))
            for child in seq.children:  # n > 1: the other completions share the prompt's blocks
                self._fork(seq, child)
                sample_rows.append((child, i))
            seq.children = []
        row_idx = torch.tensor([i for _, i in sample_rows], device=self.device)
        self._sample_and_append([s for s, _ in sample_rows], logits[row_idx])

    def _fork(self, parent: Seq, child: Seq) -> None:
        self.cache.fork(parent.seq_id, child.seq_id)
        if self.mtp_cache is not None:
            self.mtp_cache.fork(parent.seq_id, child.seq_id)
        child.tokens = list(parent.tokens)
        child.num_cached = parent.num_cached
        child.pending_hidden = parent.pending_hidden
        child.status = Status.DECODE
        self.running.append(child)

    def _prompt_logprobs(
        self, seqs: list[Seq], hidden: torch.Tensor, starts: list[int], counts: list[int]
    ) -> None:
        for b, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
            req = seq.request
            # computed once, in order (a recomputed prefix after preemption is skipped)
            if (
                req.prompt_logprobs is None
                or len(req.prompt_logprobs) != start + 1
                or start >= req.num_prompt
            ):
                continue
            upto = min(start + n, req.num_prompt - 1)  # positions whose next token is a prompt token
            if upto <= start:
                continue
            logits = self.model.lm_head(hidden[b, : upto - start])
            targets = torch.tensor(req.prompt_token_ids[start + 1 : upto + 1], device=self.device)
            k = req.params.prompt_logprobs
            chosen, top_v, top_i = token_logprobs(logits, targets, k)
            req.prompt_logprobs += logprob_dicts(
                targets.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist(), [k] * len(targets)
            )

    def _decode_step(self, seqs: list[Seq]) -> None:
        rows = [[s.tokens[-1]] for s in seqs]
        self.cache.prepare([s.seq_id for s in seqs], rows)
        ids = torch.tensor(rows, device=self.device)
        if self._fused_now():
            logits, hidden = self.fused(ids[:, 0], self.cache)
        else:
            out = self.model(ids, self.cache, return_hidden=self.drafter is not None)
            logits, hidden = out.logits[:, -1], out.hidden_states
            hidden = None if hidden is None else hidden[:, -1]
        for b, s in enumerate(seqs):
            s.num_cached += 1
            if (
                self.drafter is not None
            ):  # a plain step while speculating (near max_model_len): MTP catches up
                h = hidden[b : b + 1]
                s.pending_hidden = h if s.pending_hidden is None else torch.cat([s.pending_hidden, h])
        self._sample_and_append(seqs, logits)

    def _speculative_step(self, seqs: list[Seq]) -> None:
        k = self.config.num_speculative_tokens
        batch = self._batch_sampling(seqs, k + 1)
        u = draw_uniforms([s.generator for s in seqs], 2 * k + 1, self.device)
        drafts, draft_probs = self.drafter.propose(seqs, batch, u[:, :k])
        draft_list = drafts.tolist()
        rows = [[s.tokens[-1]] + d for s, d in zip(seqs, draft_list)]
        self.cache.prepare([s.seq_id for s in seqs], rows)
        ids = torch.tensor(rows, device=self.device)
        if self._fused_now() and self.fused.lib is not None:  # the kernel verifies k + 1 tokens per row too
            logits, hidden = self.fused(ids, self.cache)
        else:
            out = self.model(ids, self.cache, return_hidden=True)
            logits, hidden = out.logits, out.hidden_states
        accepted, tokens = verify(drafts, draft_probs, logits, batch, u[:, k : 2 * k], u[:, 2 * k])
        accepted_list, token_list = accepted.tolist(), tokens.tolist()
        lp = self._logprobs(seqs, logits, tokens, k + 1)
        self.drafter.metrics.record(k, accepted_list)
        for b, (seq, a) in enumerate(zip(seqs, accepted_list)):
            seq.request.metrics.num_draft_tokens += k
            seq.request.metrics.num_accepted_tokens += a
            self.cache.truncate(seq.seq_id, seq.num_cached + a + 1)
            seq.num_cached += a + 1
            seq.pending_hidden = hidden[b, : a + 1].clone()
            for j in range(a + 1):
                if seq.status is Status.FINISHED:
                    break
                self._append(seq, token_list[b][j], None if lp is None else lp[b][j])

    # --- sampling and bookkeeping ----------------------------------------------------------------
    def _fused_now(self) -> bool:
        """The fused step applies (it is the sparse attention path; the "mask" reference runs the model)."""
        return self.fused is not None and self.model.attention.impl == "sparse"

    def _batch_sampling(self, seqs: list[Seq], positions: int) -> BatchSampling:
        bans = []
        for s in seqs:
            p = s.request.params
            left = p.min_tokens - s.num_output
            bans.append((sorted(s.request.stop_ids), min(left, positions)) if left > 0 else ([], 0))
        return BatchSampling.build(
            [s.request.params for s in seqs],
            self.model.config.vocab_size,
            self.device,
            [s.penalty for s in seqs],
            bans,
        )

    def _logprobs(
        self, seqs: list[Seq], logits: torch.Tensor, ids: torch.Tensor, positions: int
    ) -> list[list[dict[int, float]]] | None:
        """Per row and position: {token: logprob} (raw distribution), for the rows that asked; None if none did."""
        wanted = [s.request.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return None
        num_top = max(w or 0 for w in wanted)
        B = len(seqs)
        flat_logits = logits.reshape(B * positions, -1)
        chosen, top_v, top_i = token_logprobs(flat_logits, ids.reshape(-1), num_top)
        tops = [w or 0 for w in wanted for _ in range(positions)]
        dicts = logprob_dicts(ids.reshape(-1).tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist(), tops)
        return [dicts[b * positions : (b + 1) * positions] for b in range(B)]

    def _sample_and_append(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        batch = self._batch_sampling(seqs, 1)
        u = None if batch.all_greedy else draw_uniforms([s.generator for s in seqs], 1, self.device)[:, 0]
        ids = sample(logits, batch, u)
        force = self.config.force_token
        if force is not None:  # scripted output: the hook may replace each row's sampled token
            forced = [force(s.request.prompt_token_ids, s.output_ids) for s in seqs]
            ids = torch.tensor([t if f is None else f for f, t in zip(forced, ids.tolist())], device=ids.device)
        lp = self._logprobs(seqs, logits[:, None], ids[:, None], 1)
        for b, (seq, tok) in enumerate(zip(seqs, ids.tolist())):
            self._append(seq, tok, None if lp is None else lp[b][0])

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
        if seq.penalty is not None:
            seq.penalty.add([token])
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
        if seq.status in (Status.PREFILL, Status.DECODE):
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.seq_id)
        if self.mtp_cache is not None:
            self.mtp_cache.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.pending_hidden = None
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
