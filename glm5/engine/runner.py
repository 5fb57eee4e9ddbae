"""The model runner: executes a `SchedulerOutput` on one model -- prefill chunks, decode rows (through the fused
step where it applies), MTP drafting and verification, sampling, logprobs -- and returns what it sampled as a
`ModelRunnerOutput`.

It owns the cache *data* (`RunnerLatentCache`: latents and indexer keys; the block tables arrive in the
SchedulerOutputs, the accounting is the scheduler's) and one `SeqState` per sequence: tokens, random
generator, penalty counts, the MTP layer's pending hidden states, prompt-logprob progress. Everything it needs
comes in the SchedulerOutputs, so a copy of the model in another process, fed the same outputs, samples the
same tokens (tests/test_engine_split.py).

Decode attention is DSA's: the indexer scores the cached indexer keys, the top-k latent entries are gathered,
and MLA runs in the weight-absorbed form over them (cost O(index_topk) per token after the indexer). The one
host sync per step is the `.tolist()` of the sampled ids (plus logprobs when asked for).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from glm5.engine.compiled import CompiledDecode, compile_wanted
from glm5.engine.config import EngineConfig
from glm5.engine.fused import FusedDecoder
from glm5.engine.kv_cache import PagedLatentCache, RunnerLatentCache
from glm5.engine.sampling import (
    BatchSampling,
    PenaltyState,
    draw_uniforms,
    logprob_dicts,
    make_generator,
    sample,
    token_logprobs,
)
from glm5.engine.scheduler import NewSeq, PrefillChunk, SchedulerOutput
from glm5.engine.speculative import MTPDrafter, verify

Logprobs = dict[int, float]


@dataclass
class ModelRunnerOutput:
    """What one step sampled: plain data (a worker process returns it to the engine)."""

    seq_ids: list[int] = field(default_factory=list)
    """Sequences that sampled this step, in the order they did (decode rows, then each prefill group's)."""
    token_ids: list[list[int]] = field(default_factory=list)
    """Per row: the sampled token; when speculating, the accepted drafts and one more token."""
    logprobs: list[list[Logprobs] | None] = field(default_factory=list)
    """Per row and token: {token id: logprob} of the sampled token and the top alternatives (None: not asked)."""
    draft_token_ids: dict[int, list[int]] = field(default_factory=dict)
    """Speculative rows: the k drafts verified (their main-cache entries are written, then rolled back)."""
    prompt_logprobs: dict[int, list[Logprobs]] = field(default_factory=dict)
    """seq id -> logprobs of the prompt positions this step's prefill chunk covered, in order."""

    def add(self, seq_id: int, tokens: list[int], logprobs: list[Logprobs] | None) -> None:
        self.seq_ids.append(seq_id)
        self.token_ids.append(tokens)
        self.logprobs.append(logprobs)


class SeqState:
    """The runner's view of one sequence (built from its `NewSeq`, then kept up to date by the runner itself)."""

    def __init__(self, new: NewSeq, vocab_size: int, device: torch.device) -> None:
        self.seq_id = new.seq_id
        self.prompt_token_ids = new.prompt_token_ids
        self.num_prompt = len(new.prompt_token_ids)
        self.tokens = list(new.prompt_token_ids)
        self.params = new.params
        self.stop_ids = new.stop_token_ids
        self.generator = None if new.seed is None else make_generator(new.seed, device)
        self.penalty = (
            PenaltyState.create(new.prompt_token_ids, vocab_size, device)
            if new.params.has_penalties
            else None
        )
        self.pending_hidden: torch.Tensor | None = None
        """The main model's final-norm hidden states [t, D] of the last t positions the MTP layer has not been
        fed yet (their next tokens are the sequence's last t tokens)."""
        self.num_prompt_logprobs = None if new.params.prompt_logprobs is None else 1
        """Prompt positions whose logprobs were computed, plus one (the first token has none)."""

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    def append(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        if self.penalty is not None:
            self.penalty.add(tokens)


class ModelRunner:
    """Runs `SchedulerOutput`s on one model (see the module docstring). num_blocks: the cache size the scheduler
    plans with (None: sized from `EngineConfig`, as `num_blocks` then reports)."""

    def __init__(self, model: Any, config: EngineConfig, num_blocks: int | None = None) -> None:
        self.model = model.eval()
        self.config = cfg = config
        mcfg = model.config
        if cfg.attention_impl is not None:
            model.configure_attention(impl=cfg.attention_impl)
        embed = model.model.embed_tokens.weight  # never quantised: the compute dtype even for FP8 checkpoints
        self.device, self.dtype = embed.device, embed.dtype
        k = cfg.num_speculative_tokens
        layers = list(range(mcfg.num_hidden_layers))
        mtp_layers = [mcfg.num_hidden_layers] if k else []
        self.num_blocks = num_blocks or self._default_num_blocks(layers + mtp_layers)

        def make(cached_layers: list[int]) -> RunnerLatentCache:
            return RunnerLatentCache(
                mcfg,
                self.num_blocks,
                cfg.block_size,
                layers=cached_layers,
                dtype=self.dtype,
                device=self.device,
            )

        self.cache = make(layers)
        # the MTP layer's entries lag one position behind the main cache's: a cache of its own
        self.mtp_cache = make(mtp_layers) if k else None
        self.fused = self._make_fused(cfg.fused_decode)
        # accelerators' fast decode: the model's decode forward compiled (CUDA graphs where available)
        wanted = compile_wanted(cfg.compile, self.device)
        self.compiled = CompiledDecode(model, cfg.compile_backend, device=self.device) if wanted else None
        self.drafter = MTPDrafter(model, self.mtp_cache, k, self.fused) if k else None
        self.seqs: dict[int, SeqState] = {}

    def _default_num_blocks(self, layers: list[int]) -> int:
        cfg, mcfg = self.config, self.model.config
        per_block = PagedLatentCache.block_bytes(mcfg, cfg.block_size, layers, self.dtype)
        # never more than every sequence at full length needs
        longest = min(cfg.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        most = cfg.max_num_seqs * (-(-(longest + cfg.num_speculative_tokens + 1) // cfg.block_size)) + 1
        return cfg.num_blocks or max(2, min(self._default_cache_bytes() // per_block, most))

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

    def _make_fused(self, wanted: bool | None) -> FusedDecoder | None:
        if wanted is False or (wanted is None and self.device.type != "cpu"):
            return None
        reason = FusedDecoder.unsupported(self.model)
        if reason is None:
            return FusedDecoder(self.model)
        if wanted:
            raise ValueError(f"EngineConfig(fused_decode=True) cannot run this model: {reason}")
        return None

    # --- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, torch.Tensor], hf_names: bool = False) -> None:
        """Load new weights (a subset is fine): the model's own names, or the checkpoint's with hf_names=True.
        Every name, dtype and shape is checked before anything is copied."""
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
        if self.fused is not None:
            self.fused.invalidate()

    # --- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the output's changes, run its decode rows then its prefill groups, and return what was sampled."""
        self._apply(out)
        result = ModelRunnerOutput()
        if out.decode:
            seqs = [self.seqs[i] for i in out.decode]
            with self.fused.step() if self.fused is not None else contextlib.nullcontext():
                if out.num_speculative_tokens:
                    self._speculative_step(seqs, out.num_speculative_tokens, result)
                elif out.num_decode_steps > 1:
                    self._greedy_steps(seqs, out.num_decode_steps, result)
                else:
                    self._decode_step(seqs, result)
        children: dict[int, list[int]] = {}
        for parent, child in out.forks:
            children.setdefault(parent, []).append(child)
        for group in out.prefill:
            self._prefill_step(group, children, result)
        return result

    def _apply(self, out: SchedulerOutput) -> None:
        caches = [(self.cache, out.kv)]
        if self.mtp_cache is not None:
            assert out.mtp_kv is not None, "a speculating runner needs the MTP cache's updates"
            caches.append((self.mtp_cache, out.mtp_kv))
        for sid in out.finished:
            self.seqs.pop(sid, None)
            for cache, _ in caches:
                cache.free(sid)
        for sid in out.preempted:  # recomputed later from its tokens; its generator and penalties stay
            self.seqs[sid].pending_hidden = None
            for cache, _ in caches:
                cache.free(sid)
        vocab = self.model.config.vocab_size
        for new in out.new_seqs:
            self.seqs[new.seq_id] = SeqState(new, vocab, self.device)
        for cache, update in caches:
            for sid, (start, blocks) in update.tables.items():
                cache.set_block_table(sid, start, blocks)
            cache.copy_blocks(update.copies)
        for group in out.prefill:
            for chunk in group:
                for cache, _ in caches:
                    cache.set_length(chunk.seq_id, chunk.start)

    def _prefill_step(
        self, group: list[PrefillChunk], children: dict[int, list[int]], result: ModelRunnerOutput
    ) -> None:
        seqs = [self.seqs[c.seq_id] for c in group]
        counts = [c.num_tokens for c in group]
        starts = [c.start for c in group]
        rows = [s.tokens[st : st + n] for s, st, n in zip(seqs, starts, counts)]
        self.cache.prepare([s.seq_id for s in seqs], rows)
        T = max(counts)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)
        out = self.model(ids, self.cache, return_hidden=True, num_logits_to_keep=1)
        hidden = out.hidden_states
        if self.drafter is not None:
            self.drafter.prefill(seqs, hidden, starts, counts)
        self._prompt_logprobs(seqs, hidden, starts, counts, result)
        done = [b for b, (s, st, n) in enumerate(zip(seqs, starts, counts)) if st + n == len(s.tokens)]
        if not done:
            return
        last = hidden[
            torch.tensor(done, device=self.device),
            torch.tensor([counts[b] - 1 for b in done], device=self.device),
        ]
        logits = self.model.lm_head(last)
        sample_rows: list[tuple[SeqState, int]] = []
        for i, b in enumerate(done):
            seq = seqs[b]
            sample_rows.append((seq, i))
            for child in children.get(
                seq.seq_id, ()
            ):  # n > 1: the other completions share the prompt's blocks
                sample_rows.append((self._fork(seq, child), i))
        row_idx = torch.tensor([i for _, i in sample_rows], device=self.device)
        self._sample([s for s, _ in sample_rows], logits[row_idx], result)

    def _fork(self, parent: SeqState, child_id: int) -> SeqState:
        child = self.seqs[child_id]
        self.cache.fork(parent.seq_id, child_id)
        if self.mtp_cache is not None:
            self.mtp_cache.fork(parent.seq_id, child_id)
        child.tokens = list(parent.tokens)
        child.pending_hidden = parent.pending_hidden
        child.num_prompt_logprobs = parent.num_prompt_logprobs
        return child

    def _prompt_logprobs(
        self,
        seqs: list[SeqState],
        hidden: torch.Tensor,
        starts: list[int],
        counts: list[int],
        result: ModelRunnerOutput,
    ) -> None:
        for b, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
            # computed once, in order (a recomputed prefix after preemption is skipped)
            if seq.num_prompt_logprobs != start + 1 or start >= seq.num_prompt:
                continue
            upto = min(start + n, seq.num_prompt - 1)  # positions whose next token is a prompt token
            if upto <= start:
                continue
            logits = self.model.lm_head(hidden[b, : upto - start])
            targets = torch.tensor(seq.prompt_token_ids[start + 1 : upto + 1], device=self.device)
            k = seq.params.prompt_logprobs
            chosen, top_v, top_i = token_logprobs(logits, targets, k)
            entries = logprob_dicts(
                targets.tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist(), [k] * len(targets)
            )
            seq.num_prompt_logprobs += len(entries)
            result.prompt_logprobs[seq.seq_id] = entries

    def _decode_step(self, seqs: list[SeqState], result: ModelRunnerOutput) -> None:
        rows = [[s.tokens[-1]] for s in seqs]
        self.cache.prepare([s.seq_id for s in seqs], rows)
        ids = torch.tensor(rows, device=self.device)
        if self._fused_now():
            logits, hidden = self.fused(ids[:, 0], self.cache)
        elif self.compiled is not None:
            logits, hidden = self.compiled(ids, self.cache, return_hidden=self.drafter is not None)
            logits, hidden = logits[:, -1], None if hidden is None else hidden[:, -1]
        else:
            out = self.model(ids, self.cache, return_hidden=self.drafter is not None)
            logits, hidden = out.logits[:, -1], out.hidden_states
            hidden = None if hidden is None else hidden[:, -1]
        if (
            self.drafter is not None
        ):  # a plain step while speculating (near max_model_len): MTP catches up later
            for b, s in enumerate(seqs):
                h = hidden[b : b + 1]
                s.pending_hidden = h if s.pending_hidden is None else torch.cat([s.pending_hidden, h])
        self._sample(seqs, logits, result)

    def _greedy_steps(self, seqs: list[SeqState], steps: int, result: ModelRunnerOutput) -> None:
        """`steps` plain-argmax decode steps (the scheduler checked every row takes the argmax): in one kernel call
        where the fused step's native kernel applies, else one `_decode_step` after another."""
        if not (self._fused_now() and self.fused.greedy_in_kernel(self.cache)):
            for _ in range(steps):  # each step appends its token to the rows
                self._decode_step(seqs, ModelRunnerOutput())
            for seq in seqs:
                result.add(seq.seq_id, seq.tokens[-steps:], None)
            return
        rows = [[s.tokens[-1]] + [-1] * (steps - 1) for s in seqs]  # placeholders for the tokens it makes
        self.cache.prepare([s.seq_id for s in seqs], rows, register=False)
        ids = self.fused.decode_greedy(torch.tensor([r[0] for r in rows]), self.cache, steps)
        for seq, tokens in zip(seqs, ids.tolist()):
            seq.append(tokens)
            result.add(seq.seq_id, tokens, None)

    def _speculative_step(self, seqs: list[SeqState], k: int, result: ModelRunnerOutput) -> None:
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
            self.cache.truncate(seq.seq_id, len(seq.tokens) + a)  # the fed token and the a accepted drafts
            seq.pending_hidden = hidden[b, : a + 1].clone()
            new = token_list[b][: a + 1]
            seq.append(new)
            result.add(seq.seq_id, new, None if lp is None else lp[b][: a + 1])
            result.draft_token_ids[seq.seq_id] = draft_list[b]

    # --- sampling --------------------------------------------------------------------------------
    def _fused_now(self) -> bool:
        """The fused step applies (it is the sparse attention path; the "mask" reference runs the model)."""
        return self.fused is not None and self.model.attention.impl == "sparse"

    def _batch_sampling(self, seqs: list[SeqState], positions: int) -> BatchSampling:
        bans = []
        for s in seqs:
            left = s.params.min_tokens - s.num_output
            bans.append((s.stop_ids, min(left, positions)) if left > 0 else ([], 0))
        return BatchSampling.build(
            [s.params for s in seqs],
            self.model.config.vocab_size,
            self.device,
            [s.penalty for s in seqs],
            bans,
        )

    def _logprobs(
        self, seqs: list[SeqState], logits: torch.Tensor, ids: torch.Tensor, positions: int
    ) -> list[list[Logprobs]] | None:
        """Per row and position: {token: logprob} (raw distribution), for the rows that asked; None if none did."""
        wanted = [s.params.logprobs for s in seqs]
        if all(w is None for w in wanted):
            return None
        num_top = max(w or 0 for w in wanted)
        B = len(seqs)
        flat_logits = logits.reshape(B * positions, -1)
        chosen, top_v, top_i = token_logprobs(flat_logits, ids.reshape(-1), num_top)
        tops = [w or 0 for w in wanted for _ in range(positions)]
        dicts = logprob_dicts(ids.reshape(-1).tolist(), chosen.tolist(), top_v.tolist(), top_i.tolist(), tops)
        return [dicts[b * positions : (b + 1) * positions] for b in range(B)]

    def _sample(self, seqs: list[SeqState], logits: torch.Tensor, result: ModelRunnerOutput) -> None:
        if self.config.force_token is None and all(s.params.argmax_only(s.num_output) for s in seqs):
            for seq, tok in zip(seqs, logits.argmax(-1).tolist()):
                seq.append([tok])
                result.add(seq.seq_id, [tok], None)
            return
        batch = self._batch_sampling(seqs, 1)
        u = None if batch.all_greedy else draw_uniforms([s.generator for s in seqs], 1, self.device)[:, 0]
        ids = sample(logits, batch, u)
        force = self.config.force_token
        if force is not None:  # scripted output: the hook may replace each row's sampled token
            forced = [force(s.prompt_token_ids, s.tokens[s.num_prompt :]) for s in seqs]
            ids = torch.tensor(
                [t if f is None else f for f, t in zip(forced, ids.tolist())], device=ids.device
            )
        lp = self._logprobs(seqs, logits[:, None], ids[:, None], 1)
        for b, (seq, tok) in enumerate(zip(seqs, ids.tolist())):
            seq.append([tok])
            result.add(seq.seq_id, [tok], None if lp is None else [lp[b][0]])
