"""MTP speculative decoding: the checkpoint's multi-token-prediction layer drafts 1-3 tokens, the main model checks
them in one forward, and exact accept/reject keeps the output distribution that of plain decoding.

Drafting (EAGLE-style, as vLLM and SGLang run DeepSeek/GLM MTP): the MTP layer keeps its own paged latent
cache. Its entry at position t comes from (h_t, token t+1), h_t being the main model's final-norm hidden
state. Each step first feeds the positions whose hidden states the last verification produced (the
"catch-up": exact entries, registered for prefix caching), whose last output gives draft 1; drafts 2..k
apply the MTP module again to its own previous output and draft (approximate entries, rolled back after the
step). Verification feeds [last token, draft_1..draft_k] to the main model (T = k + 1, absorbed sparse MLA),
accepts a prefix of the drafts and samples one more token, so every step yields 1..k+1 tokens.

Accept/reject (Leviathan et al. 2023, Chen et al. 2023): draft d_i ~ q_i is kept with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from norm(max(0, p_i - q_i)); when all
k are kept a bonus token comes from p_{k+1}. p is the target distribution after the request's own sampling
settings (penalties counting the drafts before each position, temperature, top-k/p, min-p), so the output
has exactly the distribution of plain sampling. Greedy rows use one-hot p and q: a draft is kept iff it is
the target's argmax, so greedy speculative output equals greedy output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from glm5.engine.kv_cache import PagedLatentCache
from glm5.engine.sampling import BatchSampling, apply_penalties, processed_probs, sample_from_probs

MAX_DRAFT_TOKENS = 3


@dataclass
class SpecMetrics:
    """Acceptance statistics over every (sequence, speculative step) pair."""

    num_steps: int = 0
    """Row-steps: one sequence verified once."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    """How often draft i (0-based) was accepted."""

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / max(self.num_draft_tokens, 1)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verification forward and sequence (accepted drafts + the one sampled token)."""
        return (self.num_accepted_tokens + self.num_steps) / max(self.num_steps, 1)

    def record(self, num_drafts: int, accepted: Sequence[int]) -> None:
        if len(self.accepted_per_position) < num_drafts:
            self.accepted_per_position += [0] * (num_drafts - len(self.accepted_per_position))
        for a in accepted:
            self.num_steps += 1
            self.num_draft_tokens += num_drafts
            self.num_accepted_tokens += a
            for i in range(a):
                self.accepted_per_position[i] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "accepted_per_position": list(self.accepted_per_position),
        }


# ------------------------------------------------------------------------------------- accept / reject
def accept_greedy(drafts: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, k], target argmax ids [B, k+1] -> (accepted counts [B], tokens [B, k+1]).

    Row b's output is tokens[b, : accepted[b] + 1]: the kept drafts (equal to the target's choices) and the
    target's choice at the first mismatch (or the bonus position).
    """
    k = drafts.shape[1]
    accepted = (drafts == target_ids[:, :k]).long().cumprod(-1).sum(-1)
    return accepted, target_ids


def accept_sampled(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard speculative sampling.

    drafts [B, k] drawn from draft_probs [B, k, V]; target_probs [B, k+1, V]; u_accept [B, k] and u_final [B]
    uniforms in [0, 1). Returns (accepted counts [B], tokens [B, k+1]); row b's output is
    tokens[b, : accepted[b] + 1].
    """
    B, k = drafts.shape
    V = target_probs.shape[-1]
    p_d = target_probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_d = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    keep = u_accept * q_d < p_d  # probability min(1, p/q); q_d > 0 because d was drawn from q
    accepted = keep.long().cumprod(-1).sum(-1)
    residual = torch.cat([(target_probs[:, :k] - draft_probs).clamp_min(0.0), target_probs[:, k:]], dim=1)
    at = accepted.view(B, 1, 1).expand(B, 1, V)
    res = residual.gather(1, at).squeeze(1)
    # p == q to the last bit leaves no residual mass; rejection then had probability 0 up to rounding
    res = torch.where(res.sum(-1, keepdim=True) > 0, res, target_probs.gather(1, at).squeeze(1))
    final = sample_from_probs(res, u_final)
    tokens = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1).scatter(1, accepted[:, None], final[:, None])
    return accepted, tokens


def verify(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    batch: BatchSampling,
    u_accept: torch.Tensor,
    u_final: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [B, k+1, V] (raw) -> (accepted [B], tokens [B, k+1]) under each row's sampling settings."""
    B, k = drafts.shape
    extra = None
    if any(s is not None for s in batch.penalties):  # position i also counts drafts 1..i as generated
        onehot = torch.zeros(B, k, target_logits.shape[-1], device=drafts.device).scatter_(
            -1, drafts[..., None], 1.0
        )
        extra = torch.cat([onehot.new_zeros(B, 1, onehot.shape[-1]), onehot.cumsum(1)], dim=1)
    logits = apply_penalties(target_logits, batch, extra)
    if batch.all_greedy:
        return accept_greedy(drafts, logits.argmax(-1))
    assert draft_probs is not None, "sampled rows need the draft distribution"
    return accept_sampled(drafts, draft_probs, processed_probs(logits, batch), u_accept, u_final)


# ------------------------------------------------------------------------------------- the drafter
class MTPDrafter:
    """Runs the MTP layer over its own paged cache: prompt positions during prefill, drafts during decode.

    Works on the engine's sequences, which carry `seq_id`, `tokens` (prompt + output) and `pending_hidden`:
    the main model's hidden states [t, D] of the last t positions not yet fed to the MTP layer (their next
    tokens are the sequence's last t tokens).
    """

    def __init__(self, model: Any, cache: PagedLatentCache, num_tokens: int, fused: Any = None) -> None:
        if not 1 <= num_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"speculative tokens must be 1..{MAX_DRAFT_TOKENS}, got {num_tokens}")
        if not len(getattr(model, "mtp", ())):
            raise ValueError(
                "speculative decoding needs the checkpoint's MTP layer (num_nextn_predict_layers >= 1)"
            )
        self.model = model
        self.cache = cache
        self.k = num_tokens
        self.fused = fused
        """A glm5.engine.fused.FusedDecoder: runs the MTP layer in the native kernel when rows are even."""
        self.metrics = SpecMetrics()

    def prefill(
        self, seqs: Sequence[Any], hidden: torch.Tensor, starts: Sequence[int], counts: Sequence[int]
    ) -> None:
        """After a main prefill forward over positions [start, start + count) of each row: feed the MTP layer
        every position whose next token is known; the last prompt position waits for the first sampled token."""
        rows, h_rows, next_rows = [], [], []
        for b, (seq, start, n) in enumerate(zip(seqs, starts, counts)):
            total = len(seq.tokens)
            upto = min(start + n, total - 1)
            if upto > start:
                rows.append(seq)
                h_rows.append(hidden[b, : upto - start])
                next_rows.append(seq.tokens[start + 1 : upto + 1])
            seq.pending_hidden = hidden[b, n - 1 : n].clone() if start + n == total else None
        if rows:
            self._feed(rows, h_rows, next_rows, register=True)

    def _feed(
        self,
        seqs: Sequence[Any],
        h_rows: list[torch.Tensor],
        next_rows: list[list[int]],
        register: bool,
        depth: int = 0,
        logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One MTP forward over ragged rows; returns (MTP output, logits) at each row's last position (logits
        None with logits=False: only the cache entries are wanted, the kernel skips the head)."""
        self.cache.prepare([s.seq_id for s in seqs], next_rows, register=register)
        even = len({len(r) for r in next_rows}) == 1
        if even:  # one row length: no padding
            hidden = torch.stack(h_rows)
            dev = hidden.device
            ids = torch.tensor(next_rows, device=dev)
        else:
            hidden = pad_sequence(h_rows, batch_first=True)
            dev = hidden.device
            ids = pad_sequence([torch.tensor(r, device=dev) for r in next_rows], batch_first=True)
        h, out = self._mtp(hidden, ids, depth, even=even, head=logits)
        if even:
            return h[:, -1], None if out is None else out[:, -1]
        last = torch.tensor([len(r) - 1 for r in next_rows], device=dev)
        rows = torch.arange(len(seqs), device=dev)
        return h[rows, last], None if out is None else out[rows, last]

    def _propose_in_kernel(
        self, seqs: Sequence[Any], h_rows: list[torch.Tensor], next_rows: list[list[int]]
    ) -> torch.Tensor:
        """Greedy drafts with the catch-up folded into the drafting kernel call. Rows that all catch up the same
        number of positions, in a cache that registers no prefix blocks (the runner's): one `mtp_draft` call
        feeds every catch-up position (their exact entries, kept), drafts 1 from the last and the k - 1 drafts
        after it. Otherwise the catch-up positions but each row's last one go through the MTP layer first
        (their exact entries, registered; their logits are not needed), then one `mtp_draft` call runs the last
        catch-up position (whose argmax is draft 1) and the k - 1 drafts after it. The last position's entry is
        exact too: it is kept (it is hashed with its real token when its block is registered by the next
        catch-up); the drafts' entries are rolled back."""
        T0 = h_rows[0].shape[0]
        if getattr(self.cache, "enable_prefix_caching", True) or any(h.shape[0] != T0 for h in h_rows):
            lead = [b for b, h in enumerate(h_rows) if h.shape[0] > 1]
            if lead:
                self._feed(
                    [seqs[b] for b in lead],
                    [h_rows[b][:-1] for b in lead],
                    [next_rows[b][:-1] for b in lead],
                    register=True,
                    logits=False,
                )
            h_rows, next_rows = [h[-1:] for h in h_rows], [r[-1:] for r in next_rows]
        exact_len = [self.cache.length(s.seq_id) + h_rows[0].shape[0] for s in seqs]
        self.cache.prepare(
            [s.seq_id for s in seqs], [r + [-1] * (self.k - 1) for r in next_rows], register=False
        )
        hidden = torch.stack(h_rows)
        drafts = self.fused.mtp_draft(
            hidden, torch.tensor(next_rows, device=hidden.device), self.cache, self.k
        )
        for s, n in zip(seqs, exact_len):
            self.cache.truncate(s.seq_id, n)
        return drafts

    def _mtp(
        self, hidden: torch.Tensor, ids: torch.Tensor, depth: int, even: bool, head: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = None
        if self.fused is not None and even:  # the kernel takes the same number of new tokens in every row
            out = self.fused.mtp_forward(hidden, ids, self.cache, depth=depth, head=head)
        return out if out is not None else self.model.mtp_forward(hidden, ids, self.cache, depth=depth)

    def propose(
        self, seqs: Sequence[Any], batch: BatchSampling, uniforms: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafts per sequence: (ids [B, k], their distributions [B, k, V] or None when every row is greedy).

        uniforms [B, k] draw the sampled rows' drafts. The MTP cache keeps only the exact (catch-up) entries.
        """
        h_rows = [s.pending_hidden for s in seqs]
        next_rows = [s.tokens[len(s.tokens) - h.shape[0] :] for s, h in zip(seqs, h_rows)]
        for s in seqs:
            s.pending_hidden = None
        if batch.all_greedy and self.fused is not None and self.fused.drafts_in_kernel(self.cache):
            return self._propose_in_kernel(seqs, h_rows, next_rows), None
        h, logits = self._feed(seqs, h_rows, next_rows, register=True)
        exact_len = [self.cache.length(s.seq_id) for s in seqs]
        drafts, probs = [], []
        for i in range(self.k):
            if batch.all_greedy:
                d = logits.argmax(-1)
            else:
                q = processed_probs(logits, batch)
                d = sample_from_probs(q, uniforms[:, i])
                probs.append(q)
            drafts.append(d)
            if i + 1 < self.k:  # placeholder ids: these entries are never hashed and are rolled back below
                self.cache.prepare([s.seq_id for s in seqs], [[-1]] * len(seqs), register=False)
                h, logits = self._mtp(h[:, None], d[:, None], i + 1, even=True)
                h, logits = h[:, -1], logits[:, -1]
        for s, n in zip(seqs, exact_len):
            self.cache.truncate(s.seq_id, n)
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs else None)
