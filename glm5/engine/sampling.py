"""Sampling: the validated `SamplingParams` of a request, and batched logits -> token ids with per-row settings.

One batch mixes requests with different settings (greedy next to top-p, penalties on some rows only), so
every knob is a per-row tensor and the work is skipped when no row needs it (no sort unless some row uses
top-k/top-p; no penalty pass unless some row has one). Randomness comes from per-request `torch.Generator`s:
each sampled row draws its uniforms from its own generator, so a seeded request produces the same tokens
whatever else shares the batch. A row is sampled by inverse CDF (one uniform per token), which also serves
the speculative decoder's accept/reject and residual draws.

Order of operations (vLLM's): penalties on the raw logits -> temperature -> top-k -> top-p -> min-p ->
softmax. Greedy rows (temperature 0) take the argmax of the penalised logits. Logprobs are those of the raw
model distribution (log-softmax of the unprocessed logits), as vLLM reports them by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-5
"""Temperatures below this are greedy."""


@dataclass
class SamplingParams:
    """How to continue one prompt (the vLLM fields and defaults). Invalid values raise ValueError naming the field."""

    n: int = 1
    """Completions per prompt; they share the prompt's KV blocks."""
    max_tokens: int | None = 16
    """Most tokens to generate per completion (None: up to the model's context length)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 or -1 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's (0 = off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style: divide positive logits, multiply
    negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI semantics), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every generated token (OpenAI semantics), in [-2, 2]."""
    seed: int | None = None
    """Seed of this request's own random generator (same seed -> same output, whatever the batch)."""
    stop: str | list[str] | None = None
    """Strings that end generation; the text is cut before them (unless include_stop_str_in_output)."""
    stop_token_ids: list[int] | None = None
    """Ids that end generation, in addition to the eos ids."""
    ignore_eos: bool = False
    """Keep going past the eos ids (the config's / tokenizer's), e.g. for benchmarks."""
    min_tokens: int = 0
    """Generate at least this many tokens before an eos / stop id may end the output."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top alternatives per step (None = no logprobs)."""
    prompt_logprobs: int | None = None
    """Return logprobs of the prompt tokens plus this many alternatives (None = no; disables prefix-cache reuse)."""
    skip_special_tokens: bool = True
    """Drop special tokens from the output text (chat front-ends that parse tags set False)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    detokenize: bool = True
    """Produce text (needs a tokenizer); False returns token ids only."""
    extra: dict = field(default_factory=dict)
    """Free-form metadata carried to the outputs (e.g. an RL sample id)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} = {getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "it must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "it must be an integer >= 1, or None for 'up to the context length'")
        if not self.temperature >= 0.0:
            raise bad("temperature", "it must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "it must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "it must be an integer >= 1, or 0 / -1 for off")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "it must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "it must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "it must be in [-2, 2]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "it must be an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            raise bad("stop_token_ids", "ids must be non-negative integers")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "it must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"it must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(name, "it must be an integer >= 0 (alternatives per token) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def argmax_only(self, num_output: int) -> bool:
        """The next token is the logits' argmax, nothing else: greedy, no penalties, no logprobs, and min_tokens
        reached after `num_output` tokens (no stop-token ban)."""
        return (
            self.greedy and not self.has_penalties and self.logprobs is None and self.min_tokens <= num_output
        )

    def top_k_or_off(self, vocab_size: int) -> int:
        return vocab_size if self.top_k <= 0 else min(self.top_k, vocab_size)


@dataclass
class PenaltyState:
    """What the penalties of one sequence need: which tokens the prompt has and how often each was generated."""

    prompt_mask: torch.Tensor
    """[V] bool: token appears in the prompt (repetition penalty)."""
    output_counts: torch.Tensor
    """[V] float32: times each token was generated (presence / frequency / repetition penalties)."""

    @classmethod
    def create(cls, prompt_ids: Sequence[int], vocab_size: int, device: torch.device) -> PenaltyState:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if len(prompt_ids):
            mask[torch.tensor(list(prompt_ids), device=device)] = True
        return cls(mask, torch.zeros(vocab_size, dtype=torch.float32, device=device))

    def add(self, token_ids: Sequence[int]) -> None:
        if len(token_ids):
            idx = torch.tensor(list(token_ids), device=self.output_counts.device)
            self.output_counts.index_put_((idx,), torch.ones_like(idx, dtype=torch.float32), accumulate=True)

    def copy(self) -> PenaltyState:
        return PenaltyState(self.prompt_mask.clone(), self.output_counts.clone())


@dataclass
class BatchSampling:
    """Per-row sampling settings of one batch as tensors, with flags that let the sampler skip unused work."""

    params: list[SamplingParams]
    temperature: torch.Tensor
    """[B] float32; 1 on greedy rows (they take the argmax instead)."""
    greedy: torch.Tensor
    """[B] bool."""
    top_k: torch.Tensor
    """[B] long; V when off."""
    top_p: torch.Tensor
    """[B] float32."""
    min_p: torch.Tensor
    """[B] float32."""
    all_greedy: bool
    any_greedy: bool
    needs_sort: bool
    any_min_p: bool
    penalties: list[PenaltyState | None]
    """Per row: its penalty state, or None (no penalty on that row)."""
    bans: list[tuple[list[int], int]]
    """Per row: (ids, positions): forbid `ids` at the first `positions` positions of this step (stop ids while
    min_tokens is not reached; a speculative step covers several positions)."""

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        vocab_size: int,
        device: torch.device,
        penalties: list[PenaltyState | None] | None = None,
        bans: list[tuple[list[int], int]] | None = None,
    ) -> BatchSampling:
        greedy = [p.greedy for p in params]
        top_k = [p.top_k_or_off(vocab_size) for p in params]
        return cls(
            params=params,
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy)], device=device
            ),
            greedy=torch.tensor(greedy, device=device),
            top_k=torch.tensor(top_k, device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            min_p=torch.tensor([p.min_p for p in params], device=device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            needs_sort=any(
                not g and (k < vocab_size or p.top_p < 1.0) for p, g, k in zip(params, greedy, top_k)
            ),
            any_min_p=any(not g and p.min_p > 0.0 for p, g in zip(params, greedy)),
            penalties=penalties or [None] * len(params),
            bans=bans or [([], 0) for _ in params],
        )


# ------------------------------------------------------------------------------------- logits processing
def apply_penalties(
    logits: torch.Tensor, batch: BatchSampling, extra_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Repetition / presence / frequency penalties and min_tokens bans on logits [B, V] or [B, K, V] (new tensor).

    extra_counts [B, K, V]: tokens generated inside this step before each position (speculative drafts), added
    to each row's output counts so position k is penalised exactly as plain decoding would penalise it.
    """
    rows = [i for i, s in enumerate(batch.penalties) if s is not None]
    bans = [(i, ids, n) for i, (ids, n) in enumerate(batch.bans) if ids and n > 0]
    if not rows and not bans:
        return logits
    logits = logits.clone()
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        states = [batch.penalties[i] for i in rows]
        counts = torch.stack([s.output_counts for s in states])  # [R, V]
        prompt = torch.stack([s.prompt_mask for s in states])
        sub = logits[idx]
        if sub.dim() == 3:
            counts, prompt = counts[:, None], prompt[:, None]
            if extra_counts is not None:
                counts = counts + extra_counts[idx]
        params = [batch.params[i] for i in rows]
        shape = (-1,) + (1,) * (sub.dim() - 1)
        rep = torch.tensor([p.repetition_penalty for p in params], device=logits.device).view(shape)
        pres = torch.tensor([p.presence_penalty for p in params], device=logits.device).view(shape)
        freq = torch.tensor([p.frequency_penalty for p in params], device=logits.device).view(shape)
        seen = prompt | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        logits[idx] = sub
    for i, ids, n in bans:
        if logits.dim() == 2:
            logits[i, ids] = float("-inf")
        else:
            logits[i, :n, ids] = float("-inf")
    return logits


def processed_probs(logits: torch.Tensor, batch: BatchSampling) -> torch.Tensor:
    """The sampling distribution after temperature, top-k, top-p and min-p: logits [B, (K,) V] -> probs (fp32).

    Greedy rows get a one-hot on their argmax, so accept/reject treats them like any other row.
    """
    x = logits.float()
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, None]
    B, K, V = x.shape
    x = x / batch.temperature.view(B, 1, 1)
    if batch.needs_sort:
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=x.device).view(1, 1, V)
        sorted_x = sorted_x.masked_fill(ranks >= batch.top_k.view(B, 1, 1), float("-inf"))
        probs_sorted = sorted_x.softmax(-1)
        before = probs_sorted.cumsum(-1) - probs_sorted  # mass of strictly more likely tokens
        sorted_x = sorted_x.masked_fill(before >= batch.top_p.view(B, 1, 1), float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    probs = x.softmax(-1)
    if batch.any_min_p:
        cut = probs.amax(-1, keepdim=True) * batch.min_p.view(B, 1, 1)
        probs = probs.masked_fill(probs < cut, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if batch.any_greedy:
        onehot = torch.zeros_like(probs).scatter_(
            -1, logits.float().view(B, K, V).argmax(-1, keepdim=True), 1.0
        )
        probs = torch.where(batch.greedy.view(B, 1, 1), onehot, probs)
    return probs[:, 0] if squeeze else probs


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (need not be normalised), uniforms [N] in [0, 1) -> ids [N] (long)."""
    cdf = probs.float().cumsum(-1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample(logits: torch.Tensor, batch: BatchSampling, uniforms: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (long, on the logits' device). uniforms [B]: one draw per row (greedy: unused)."""
    logits = apply_penalties(logits, batch)
    if batch.all_greedy:
        return logits.argmax(-1)
    probs = processed_probs(logits, batch)
    return sample_from_probs(probs, uniforms)


def draw_uniforms(
    generators: Sequence[torch.Generator | None], count: int, device: torch.device
) -> torch.Tensor:
    """[B, count] uniforms in [0, 1): row b from generators[b] alone (zeros for rows without one, e.g. greedy)."""
    rows = []
    for g in generators:
        if g is None:
            rows.append(torch.zeros(count, device=device))
        else:
            rows.append(torch.rand(count, generator=g, device=g.device).to(device))
    return torch.stack(rows) if rows else torch.zeros(0, count, device=device)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own generator; it lives on the sampling device where that device supports generators."""
    try:
        g = torch.Generator(device=device)
    except RuntimeError:  # devices without their own generator type sample from a CPU generator
        g = torch.Generator()
    return g.manual_seed(seed)


# ------------------------------------------------------------------------------------- logprobs
def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution logprobs: logits [N, V], chosen ids [N] -> (chosen [N], top values [N, k], top ids [N, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, token_ids.view(-1, 1)).squeeze(-1)
    if num_top > 0:
        top = lp.topk(min(num_top, lp.shape[-1]), dim=-1)
        return chosen, top.values, top.indices
    empty = lp.new_zeros(lp.shape[0], 0)
    return chosen, empty, empty.long()


def logprob_dicts(
    chosen_ids: list[int],
    chosen: list[float],
    top_vals: list[list[float]],
    top_ids: list[list[int]],
    num_top: list[int],
) -> list[dict[int, float]]:
    """Host lists -> one {token_id: logprob} per row: the chosen token plus that row's top alternatives."""
    out = []
    for i, tok in enumerate(chosen_ids):
        d = {tok: chosen[i]}
        for t, v in zip(top_ids[i][: num_top[i]], top_vals[i][: num_top[i]]):
            d.setdefault(t, v)
        out.append(d)
    return out
