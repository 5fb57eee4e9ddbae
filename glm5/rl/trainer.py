"""The RL trainer step: current-policy logprobs on padded token batches, advantages, the policy loss over
micro-batches (summing to the full-batch loss), clipping and the optimizer (reusing glm5/train/optim.py).

Samples arrive as token ids with per-token behavior logprobs and versions; nothing is re-tokenized. One
optimizer step is taken per batch, so the proximal policy pi_old of the decoupled loss equals the current
weights before the step: its logprobs are the current ones detached (bitwise what a recompute would give,
for one forward less). In bypass mode the behavior logprobs stand in for pi_old.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed
import torch.nn.functional as F

from glm5.rl.losses import LossConfig, compute_advantages, policy_loss
from glm5.rl.types import Sample
from glm5.train.optim import clip_grad_norm, is_indexer_param, param_groups
from glm5.train.state import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class TrainerConfig:
    """Optimizer and batching of the RL trainer."""

    lr: float = 1e-3
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay of matrices."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = off)."""
    micro_batch_size: int = 16
    """Samples per forward/backward; the loss is normalised globally, so this never changes the update."""
    loss: dict[str, Any] = field(default_factory=dict)
    """LossConfig fields (glm5.rl.losses): estimator, clipping, off-policy correction, reduction, KL..."""

    def loss_config(self) -> LossConfig:
        return LossConfig(**self.loss)


def pad_batch(samples: list[Sample], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a list of samples: tokens [B, L], and per response token [B, R]: the index
    of the logit that predicts it, loss mask, behavior logprobs and versions."""
    L = max(len(s.tokens) for s in samples)
    R = max(max(s.response_len for s in samples), 1)
    tokens = torch.full((len(samples), L), pad_id, dtype=torch.long)
    pos = torch.zeros(len(samples), R, dtype=torch.long)
    mask = torch.zeros(len(samples), R)
    behavior = torch.zeros(len(samples), R)
    versions = torch.zeros(len(samples), R, dtype=torch.long)
    for b, s in enumerate(samples):
        n = s.response_len
        tokens[b, : len(s.tokens)] = torch.tensor(s.tokens)
        pos[b, :n] = torch.arange(s.prompt_len - 1, s.prompt_len - 1 + n)
        mask[b, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
        behavior[b, :n] = torch.tensor(s.behavior_logprobs)
        versions[b, :n] = torch.tensor(s.token_versions)
    return {"tokens": tokens, "pos": pos, "loss_mask": mask, "behavior_logp": behavior, "versions": versions}


def response_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], want_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token) [B, R] (and the entropy of pi at each response position) by one full forward."""
    device = model.lm_head.weight.device
    tokens = batch["tokens"].to(device)
    logits = model(tokens[:, :-1]).logits.float() if tokens.shape[1] > 1 else None
    assert logits is not None, "samples need at least one prompt and one response token"
    pos = batch["pos"].to(device).clamp(max=logits.shape[1] - 1)
    picked = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))  # [B, R, V]
    logp_all = F.log_softmax(picked, dim=-1)
    targets = tokens.gather(1, (pos + 1).clamp(max=tokens.shape[1] - 1))
    logp = logp_all.gather(-1, targets[:, :, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if want_entropy else None
    return logp, entropy


class RLTrainer:
    """Owns the policy (and an optional frozen reference), the optimizer and the weight version."""

    def __init__(
        self, model: torch.nn.Module, config: TrainerConfig | None = None, ref_model: Any = None
    ) -> None:
        self.model = model.train()
        self.cfg = cfg = config or TrainerConfig()
        self.loss_cfg = cfg.loss_config()
        self.ref_model = ref_model.eval() if ref_model is not None else None
        for name, p in model.named_parameters():
            if is_indexer_param(name):  # the DSA indexer learns from its KL loss in pre-training, not from RL
                p.requires_grad_(False)
        groups = [
            dict(g, params=[p for p in g["params"] if p.requires_grad])
            for g in param_groups(model, cfg.lr, cfg.lr, cfg.weight_decay, muon=False)
        ]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g.pop("use_muon")
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True
        )
        self.version = 0
        self.pad_id = model.config.pad_token_id or 0
        self.dist: Any = None
        """A glm5.train.parallel.DistContext when this is one rank of a trainer group (glm5/rl/trainer_group.py):
        the rank then trains on its share of each batch and the metrics and the gradient norm are reduced."""

    def train_step(self, groups: list[list[Sample]]) -> dict[str, Any]:
        """One optimizer step on a batch of groups; returns metrics (loss terms, IS statistics, grad norm)."""
        t0 = time.perf_counter()
        samples = [s for g in groups for s in g]
        group_index = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        rewards = torch.tensor([float(s.reward) for s in samples])
        advantages = compute_advantages(rewards, group_index, self.loss_cfg)
        num_tokens = sum(sum(s.loss_mask) for s in samples)
        lc = self.loss_cfg
        sums: dict[str, float] = {}
        mb_size = max(1, self.cfg.micro_batch_size)
        n = len(samples)
        lo, hi, num_micro = 0, n, math.ceil(n / mb_size)
        if self.dist is not None:  # a contiguous share per rank; every rank runs the same number of passes
            per = math.ceil(n / self.dist.world_size)
            lo, hi = min(n, self.dist.rank * per), min(n, (self.dist.rank + 1) * per)
            num_micro = max(1, math.ceil(per / mb_size))
        for i in range(num_micro):
            start = lo + i * mb_size
            part = samples[start : min(start + mb_size, hi)]
            # a rank with no samples left: a zero-weight pass keeps FSDP's collectives in step
            dummy = not part
            if dummy:
                start, part = 0, samples[:1]
            batch = pad_batch(part, self.pad_id)
            current, entropy = response_logprobs(self.model, batch, want_entropy=lc.entropy_coef > 0)
            behavior = batch["behavior_logp"].to(current.device)
            proximal = behavior if lc.off_policy == "bypass" else current.detach()
            ref = None
            if self.ref_model is not None and lc.kl_coef > 0:
                with torch.no_grad():
                    ref, _ = response_logprobs(self.ref_model, batch)
            loss, metrics = policy_loss(
                current,
                proximal,
                behavior,
                advantages[start : start + len(part)].to(current.device),
                batch["loss_mask"].to(current.device),
                lc,
                ref_logp=ref,
                entropy=entropy,
                num_rollouts=len(samples),
                num_tokens=num_tokens,
            )
            (loss * 0.0 if dummy else loss).backward()
            # a micro-batch's metrics are its own means: weight by size
            share = 0.0 if dummy else len(part) / n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (0.0 if dummy else 1.0 if k == "loss" else share)
        if self.dist is not None:
            keys = sorted(sums)
            total = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(total, group=self.dist.group)
            sums = dict(zip(keys, total.tolist()))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist is None:
            norm = clip_grad_norm(params, self.cfg.grad_clip)
        else:  # FSDP / expert-parallel shards: the norm of the whole gradient, reduced over the group
            norm = clip_grad_norm(params, self.cfg.grad_clip, self.dist.group, self.dist.device)
        skipped = not math.isfinite(float(norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {
            **sums,
            "grad_norm": float(norm),
            "skipped": skipped,
            "train_s": time.perf_counter() - t0,
            "num_samples": len(samples),
            "num_tokens": num_tokens,
        }

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        """Current-policy logprobs of each sample's response tokens (for checks against the engine's)."""
        was = self.model.training
        self.model.eval()
        logp, _ = response_logprobs(self.model, pad_batch(samples, self.pad_id))
        self.model.train(was)
        return [logp[b, : s.response_len].tolist() for b, s in enumerate(samples)]

    def save(self, folder: str, buffer_state: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        """An atomic resumable checkpoint (see save_rl_checkpoint)."""
        return str(save_rl_checkpoint(folder, self, buffer_state, extra))

    def load(self, folder: str) -> dict[str, Any] | None:
        return load_rl_checkpoint(folder, self)

    def weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict (the model's own names), detached CPU tensors, for weight sync."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def sft_warm_start(
    model: torch.nn.Module,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Supervised fine-tuning on (ids, loss_mask) conversations (the assistant turns), for a policy built from
    scratch: RL needs one that is right some of the time. Returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = model.config.pad_token_id or 0
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=gen).tolist()
        L = max(len(examples[i][0]) for i in pick)
        ids = torch.full((len(pick), L), pad, dtype=torch.long)
        mask = torch.zeros(len(pick), L)
        for b, i in enumerate(pick):
            x, m = examples[i]
            ids[b, : len(x)], mask[b, : len(m)] = torch.tensor(x), torch.tensor(m, dtype=torch.float32)
        logits = model(ids[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum().clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def save_rl_checkpoint(
    folder: str,
    trainer: RLTrainer,
    buffer_state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Any:
    """Atomic checkpoint (glm5/train/state.py): weights, optimizer, RNG, the version and the whole buffer state
    (cursor, requeued and partial groups, outstanding leases, completed groups, terminal states)."""
    state = {"version": trainer.version, "buffer": buffer_state, **(extra or {})}
    return save_checkpoint(folder, trainer.version, trainer.model, trainer.optimizer, state, keep=keep)


def load_rl_checkpoint(folder: str, trainer: RLTrainer) -> dict[str, Any] | None:
    """Restore the newest checkpoint under `folder` into `trainer`; returns its state (None: nothing saved)."""
    path = latest_checkpoint(folder)
    if path is None:
        return None
    state = load_checkpoint(path, trainer.model, trainer.optimizer)
    trainer.version = int(state["version"])
    return state
