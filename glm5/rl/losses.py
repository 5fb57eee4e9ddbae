"""RL advantages and policy loss as pure tensor functions (no model, no Ray, no I/O).

* Advantages from one scalar reward per rollout: GRPO (group mean, optional group std), REINFORCE++-baseline
  (group mean, then batch std), RLOO (leave-one-out mean); GAE for a later critic.
* Policy loss: PPO-clip with asymmetric (eps_low, eps_high) and optional dual clip, or the GSPO sequence ratio.
* Off-policy correction (docs/rl.md § Off-policy correction), 3 log-probs: the behavior policy mu that sampled the
  tokens (the inference engine), the proximal policy pi_old (the trainer's recompute before the update) and the
  current pi_theta. ``decoupled`` multiplies the PPO-clip term (ratio pi_theta/pi_old) by an importance weight
  f(pi_old/mu) -- truncate (TIS), mask (MIS/icepop) or clip, at token, sequence or geometric level;
  ``bypass`` uses mu as pi_old (no recompute, no weight); ``none`` trusts pi_old == mu (no weight).
* KL to a reference (k1/k2/k3 estimators) and an entropy bonus.
* Reductions that make micro-batching exact: ``rollout_token_mean`` divides each rollout's token sum by that
  rollout's own token count and the total by the *global* number of rollouts in the optimizer step (slime's
  ``rollout_mask_sums``), so summing micro-batch losses gives the full-batch loss and gradient.

Shapes: B rollouts (rows) x T padded positions; ``loss_mask`` is 1 on trainable response tokens, 0 on padding,
prompt and tool-observation tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ADVANTAGE_ESTIMATORS = ("grpo", "reinforce++", "rloo")
POLICY_LOSSES = ("ppo", "gspo")
OFF_POLICY_MODES = ("none", "bypass", "decoupled")
IS_LEVELS = ("token", "sequence", "geometric")
IS_RULES = ("truncate", "mask", "clip")
KL_ESTIMATORS = ("k1", "k2", "k3")
REDUCTIONS = ("rollout_token_mean", "token_sum_global", "constant")


@dataclass(frozen=True)
class LossConfig:
    """What the advantage estimator and the policy loss compute; validated on construction."""

    advantage_estimator: str = "grpo"
    """grpo (r - group mean [/ group std]), reinforce++ (REINFORCE++-baseline: r - group mean, then divided by
    the batch std) or rloo (r - mean of the other rollouts of the group)."""
    normalize_advantage_std: bool = True
    """grpo: divide by the group's (unbiased) std + advantage_eps; reinforce++: whiten by the batch std."""
    advantage_eps: float = 1e-6
    """Added to a std before dividing (a zero-variance group then gets zero advantage, not NaN)."""
    eps_clip_low: float = 0.2
    """PPO clip: the ratio is clipped below at 1 - eps_clip_low."""
    eps_clip_high: float = 0.28
    """PPO clip: the ratio is clipped above at 1 + eps_clip_high (DAPO clip-higher)."""
    dual_clip_c: float | None = None
    """Dual clip (c > 1): for negative advantages the token loss is capped at c * |A|."""
    policy_loss: str = "ppo"
    """ppo (token ratio) or gspo (sequence ratio: exp of the masked mean token log-ratio, clipped per rollout)."""
    off_policy: str = "decoupled"
    """none (PPO ratio against pi_old, no weight), bypass (PPO ratio against the behavior log-probs) or
    decoupled (PPO ratio against pi_old times the importance weight f(pi_old / mu))."""
    is_level: str = "token"
    """Importance-weight level: token (per token), sequence (product over the rollout) or geometric (the
    geometric mean of the token ratios over the rollout)."""
    is_rule: str = "truncate"
    """truncate: min(w, high) (TIS); mask: w if low <= w <= high else 0 (MIS / icepop); clip: clamp(w, low, high)."""
    is_threshold_high: float = 2.0
    """Upper bound of the importance weight."""
    is_threshold_low: float = 0.0
    """Lower bound of the importance weight (mask and clip rules)."""
    is_veto_threshold: float | None = None
    """Veto: a rollout with any token ratio pi_old/mu below this gets weight 0 (None: off)."""
    opsm_delta: float | None = None
    """Off-policy sequence masking (DeepSeek-V3.2): drop negative-advantage tokens of rollouts whose mean
    log(mu / pi_theta) exceeds this (None: off)."""
    kl_coef: float = 0.0
    """Weight of the KL-to-reference term in the loss (needs ``ref_logp``)."""
    kl_estimator: str = "k3"
    """k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r, with r = pi_theta / pi_ref (Schulman)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss; needs ``entropy``)."""
    reduction: str = "rollout_token_mean"
    """rollout_token_mean (per-rollout token mean, averaged over rollouts), token_sum_global (DAPO: token sum
    over the global token count) or constant (Dr.GRPO: token sum over num_rollouts * loss_constant)."""
    loss_constant: float | None = None
    """constant reduction: the per-rollout denominator (e.g. the generation budget). None: the padded length T
    of the batch, which is only micro-batch invariant when every micro-batch has the same T."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("advantage_estimator", ADVANTAGE_ESTIMATORS),
            ("policy_loss", POLICY_LOSSES),
            ("off_policy", OFF_POLICY_MODES),
            ("is_level", IS_LEVELS),
            ("is_rule", IS_RULES),
            ("kl_estimator", KL_ESTIMATORS),
            ("reduction", REDUCTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"LossConfig.{name}={value!r} is not supported; choose one of {', '.join(allowed)}"
                )
        if not 0.0 <= self.eps_clip_low < 1.0:
            raise ValueError(f"LossConfig.eps_clip_low={self.eps_clip_low} must be in [0, 1)")
        if self.eps_clip_high < 0.0:
            raise ValueError(f"LossConfig.eps_clip_high={self.eps_clip_high} must be >= 0")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1.0:
            raise ValueError(f"LossConfig.dual_clip_c={self.dual_clip_c} must be > 1 (or None to disable)")
        if not self.is_threshold_high > 0.0:
            raise ValueError(f"LossConfig.is_threshold_high={self.is_threshold_high} must be > 0")
        if not 0.0 <= self.is_threshold_low < self.is_threshold_high:
            raise ValueError(
                f"LossConfig.is_threshold_low={self.is_threshold_low} must be in "
                f"[0, is_threshold_high={self.is_threshold_high})"
            )
        for name in ("advantage_eps", "kl_coef", "entropy_coef"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be >= 0")
        for name in ("is_veto_threshold", "opsm_delta", "loss_constant"):
            value = getattr(self, name)
            if value is not None and not value > 0.0:
                raise ValueError(f"LossConfig.{name}={value} must be > 0 (or None to disable)")


# ---------------------------------------------------------------------------- advantages
def compute_advantages(rewards: Tensor, group_index: Tensor, cfg: LossConfig) -> Tensor:
    """One advantage per rollout from its scalar reward; rollouts of the same prompt share a ``group_index``.

    Groups need not be contiguous or numbered from 0. A group of one rollout (and any zero-variance group) gets
    advantage 0: it carries no comparison.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both have shape [N]; got {tuple(rewards.shape)} and "
            f"{tuple(group_index.shape)}"
        )
    r = rewards.detach().to(torch.float32 if not rewards.is_floating_point() else rewards.dtype)
    n = r.shape[0]
    if n == 0:
        return r.clone()
    _, inv = torch.unique(group_index, return_inverse=True)
    counts = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    sums = torch.zeros_like(counts).index_add_(0, inv, r)
    centered = r - (sums / counts.clamp(min=1))[inv]
    size = counts[inv]
    if cfg.advantage_estimator == "rloo":
        # r_i - (S - r_i) / (n - 1) = n / (n - 1) * (r_i - S / n)
        return centered * size / (size - 1).clamp(min=1)
    if cfg.advantage_estimator == "grpo":
        if not cfg.normalize_advantage_std:
            return centered
        sq = torch.zeros_like(counts).index_add_(0, inv, centered.square())
        std = (sq / (counts - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std in verl/slime
        return centered / (std[inv] + cfg.advantage_eps)
    # reinforce++ (baseline): group-mean baseline, then batch whitening (OpenRLHF: population std)
    if not cfg.normalize_advantage_std or n < 2:
        return centered
    return (centered - centered.mean()) / (centered.std(unbiased=False) + cfg.advantage_eps)


def gae_advantages(
    rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked tokens of each row ([B, T] each) -> (advantages,
    returns). Unmasked positions (prompt, observations, padding) are skipped: the recursion jumps over them,
    and the value after the last masked token is 0 (the episode ends)."""
    if not rewards.shape == values.shape == loss_mask.shape or rewards.dim() != 2:
        raise ValueError("rewards, values and loss_mask must share one [B, T] shape")
    mask = loss_mask.to(values.dtype)
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        new_running = delta + gamma * lam * running
        running = m * new_running + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = m * running
    return adv, (adv + values) * mask


# ---------------------------------------------------------------------------- building blocks
def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` > 0 (0 when there are none); padding values never leak."""
    mask = mask.to(x.dtype)
    return torch.where(mask > 0, x * mask, 0.0).sum() / mask.sum().clamp(min=1)


def masked_rowmean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``x`` over masked positions, shape [B, 1]."""
    mask = mask.to(x.dtype)
    return torch.where(mask > 0, x * mask, 0.0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(
        min=1
    )


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: k1 = log r, k2 = (log r)^2 / 2,
    k3 = exp(-log r) - 1 + log r, with log r = logp - ref_logp."""
    log_r = logp - ref_logp
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(-log_r) + log_r
    raise ValueError(f"kl estimator {estimator!r} is not supported; choose one of {', '.join(KL_ESTIMATORS)}")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def importance_weights(
    proximal_logp: Tensor, behavior_logp: Tensor, loss_mask: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor]:
    """Off-policy weights f(pi_old / mu) per token ([B, T], detached) and a bool tensor marking the tokens whose
    weight the rule changed (truncated, masked, clipped or vetoed).

    Sequence and geometric weights are the same for every token of a row: exp(sum) and exp(mean) of the masked
    token log-ratios. Bounds are compared in log space, so a huge sequence ratio never overflows into NaN.
    """
    mask = loss_mask > 0
    log_ratio = torch.where(mask, (proximal_logp - behavior_logp).detach(), 0.0)
    if cfg.is_level == "token":
        log_w = log_ratio
    else:
        log_w = log_ratio.sum(-1, keepdim=True)
        if cfg.is_level == "geometric":
            log_w = log_w / mask.sum(-1, keepdim=True).clamp(min=1)
        log_w = log_w.expand_as(log_ratio)
    log_high, log_low = _log(cfg.is_threshold_high), _log(cfg.is_threshold_low)
    above, below = log_w > log_high, log_w < log_low
    if cfg.is_rule == "truncate":
        changed = above
        weights = log_w.clamp(max=log_high).exp()
    elif cfg.is_rule == "clip":
        changed = above | below
        weights = log_w.clamp(min=log_low, max=log_high).exp()
    else:  # mask
        changed = above | below
        weights = torch.where(changed, 0.0, log_w.clamp(max=log_high).exp())
    if cfg.is_veto_threshold is not None:
        veto = ((log_ratio < math.log(cfg.is_veto_threshold)) & mask).any(-1, keepdim=True).expand_as(weights)
        weights = torch.where(veto, 0.0, weights)
        changed = changed | veto
    return weights, changed & mask


def aggregate(
    token_loss: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    num_rollouts: int | None = None,
    num_tokens: int | None = None,
    rollout_token_counts: Tensor | None = None,
) -> Tensor:
    """The scalar loss from per-token losses over the masked tokens, by ``cfg.reduction``:
    rollout_token_mean = sum_i (sum_t l_it / n_i) / N, token_sum_global = sum_it l_it / sum_i n_i and
    constant = sum_it l_it / (N * C), with N = num_rollouts (default: this batch's rows), n_i = rollout i's
    tokens (rollout_token_counts when a rollout spans several rows) and C = loss_constant (default T)."""
    masked = torch.where(mask > 0, token_loss * mask, 0.0)
    rollouts = num_rollouts if num_rollouts is not None else mask.shape[0]
    if cfg.reduction == "rollout_token_mean":
        per_row_tokens = rollout_token_counts if rollout_token_counts is not None else mask.sum(-1)
        return (masked.sum(-1) / per_row_tokens.to(masked.dtype).clamp(min=1)).sum() / max(rollouts, 1)
    if cfg.reduction == "token_sum_global":
        tokens = mask.sum().clamp(min=1) if num_tokens is None else max(num_tokens, 1)
        return masked.sum() / tokens
    constant = cfg.loss_constant if cfg.loss_constant is not None else mask.shape[1]
    return masked.sum() / (max(rollouts, 1) * constant)


def _check_shapes(named: dict[str, Tensor | None], advantages: Tensor) -> None:
    shape = named["current_logp"].shape  # type: ignore[union-attr]
    if len(shape) != 2:
        raise ValueError(f"current_logp must have shape [B, T], got {tuple(shape)}")
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but current_logp has {tuple(shape)}")
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must have shape [B] or [B, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )


# ---------------------------------------------------------------------------- the loss, piece by piece
def importance_ratio(current_logp: Tensor, old_logp: Tensor, mask: Tensor, sequence: bool = False) -> Tensor:
    """r = pi_theta / pi_old per token = exp(logp - old_logp); sequence=True (GSPO): every token of a row gets
    exp(mean over the row's masked tokens of the log-ratio). Padding may hold anything: its log-ratio is set
    to 0 before exp, so no inf/NaN reaches the gradient."""
    log_ratio = torch.where(mask > 0, current_logp - old_logp, 0.0)
    if sequence:
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(log_ratio)
    return log_ratio.exp()


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """PPO-clip per token: max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and where the clipped term won."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def dual_clip(pg: Tensor, adv: Tensor, c: float | None) -> tuple[Tensor, Tensor]:
    """Dual clip: for A < 0 the token loss is capped at -c A (c = None: off), and where the cap bit."""
    if c is None:
        return pg, torch.zeros_like(pg, dtype=torch.bool)
    cap = -adv * c
    capped = (adv < 0) & (pg > cap)
    return torch.where(adv < 0, torch.minimum(pg, cap), pg), capped


def off_policy_sequence_mask(
    current_logp: Tensor, behavior_logp: Tensor, mask: Tensor, adv: Tensor, delta: float
) -> Tensor:
    """OPSM: the negative-advantage tokens of rows whose mean log(mu / pi_theta) over masked tokens exceeds
    delta (those tokens are dropped from the loss)."""
    seq_kl = masked_rowmean(torch.where(mask > 0, (behavior_logp - current_logp).detach(), 0.0), mask)
    return (adv < 0) & (seq_kl > delta)


def reference_kl(current_logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate (kl_penalty) with the padding log-probs zeroed first."""
    valid = mask > 0
    return kl_penalty(torch.where(valid, current_logp, 0.0), torch.where(valid, ref_logp, 0.0), estimator)


def regularized(pg: Tensor, kl: Tensor, entropy: Tensor, kl_coef: float, entropy_coef: float) -> Tensor:
    """Token loss = pg + kl_coef * KL - entropy_coef * H (a term only enters when its coefficient is > 0)."""
    token_loss = pg
    if kl_coef > 0:
        token_loss = token_loss + kl_coef * kl
    if entropy_coef > 0:
        token_loss = token_loss - entropy_coef * entropy
    return token_loss


def _check_inputs(
    named: dict[str, Tensor | None], advantages: Tensor, cfg: LossConfig, rollout_token_counts: Tensor | None
) -> None:
    _check_shapes(named, advantages)
    current_logp = named["current_logp"]
    assert current_logp is not None
    if cfg.kl_coef > 0 and named["ref_logp"] is None:
        raise ValueError("LossConfig.kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    if cfg.entropy_coef > 0 and named["entropy"] is None:
        raise ValueError("LossConfig.entropy_coef > 0 needs entropy (the current policy's per-token entropy)")
    if rollout_token_counts is not None and rollout_token_counts.shape != current_logp.shape[:1]:
        raise ValueError(f"rollout_token_counts must have shape [B] = {tuple(current_logp.shape[:1])}")


def policy_loss(
    current_logp: Tensor,
    proximal_logp: Tensor,
    behavior_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    cfg: LossConfig,
    *,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    num_rollouts: int | None = None,
    num_tokens: int | None = None,
    rollout_token_counts: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy-gradient loss of one (micro-)batch and its metrics (detached scalars).

    ``current_logp`` carries the gradient; the other log-probs are treated as constants. ``num_rollouts`` /
    ``num_tokens`` are the optimizer step's *global* counts (defaults: this batch's), so micro-batch losses
    sum to the full-batch loss. ``rollout_token_counts`` ([B], optional) is, for fan-out rollouts split into
    several rows (segments, possibly in different micro-batches), the total masked-token count of the rollout
    each row belongs to; the rollout then counts once (pass num_rollouts = the number of distinct rollouts).
    Metrics are token means over this batch's masked tokens.
    """
    named = {
        "current_logp": current_logp,
        "proximal_logp": proximal_logp,
        "behavior_logp": behavior_logp,
        "loss_mask": loss_mask,
        "ref_logp": ref_logp,
        "entropy": entropy,
    }
    _check_inputs(named, advantages, cfg, rollout_token_counts)
    mask = loss_mask.to(current_logp.dtype)
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).detach().to(current_logp.dtype)
    old = (behavior_logp if cfg.off_policy == "bypass" else proximal_logp).detach()

    ratio = importance_ratio(current_logp, old, mask, sequence=cfg.policy_loss == "gspo")
    pg, clipped = clipped_surrogate(ratio, adv, cfg.eps_clip_low, cfg.eps_clip_high)
    pg, dual = dual_clip(pg, adv, cfg.dual_clip_c)
    if cfg.off_policy == "decoupled":
        weights, changed = importance_weights(proximal_logp, behavior_logp, loss_mask, cfg)
        pg = pg * weights
    else:
        weights, changed = torch.ones_like(pg), torch.zeros_like(clipped)
    opsm = torch.zeros_like(clipped)
    if cfg.opsm_delta is not None:
        opsm = off_policy_sequence_mask(current_logp, behavior_logp, mask, adv, cfg.opsm_delta)
        pg = torch.where(opsm, 0.0, pg)
    kl = (
        torch.zeros_like(pg)
        if ref_logp is None
        else reference_kl(current_logp, ref_logp, mask, cfg.kl_estimator)
    )
    ent = entropy if entropy is not None else torch.zeros_like(pg)
    token_loss = regularized(pg, kl, ent, cfg.kl_coef, cfg.entropy_coef)

    def reduce(x: Tensor) -> Tensor:
        return aggregate(x, mask, cfg, num_rollouts, num_tokens, rollout_token_counts)

    loss = reduce(token_loss)
    with torch.no_grad():
        valid = mask > 0
        metrics = {
            "loss": loss.detach(),
            "pg_loss": reduce(pg.detach()),
            "ppo_kl": masked_mean(old - current_logp.detach(), mask),
            "clipfrac": masked_mean(clipped.to(mask.dtype), mask),
            "dual_clipfrac": masked_mean(dual.expand_as(pg).to(mask.dtype), mask),
            "is_weight_mean": masked_mean(weights, mask),
            "is_weight_max": torch.where(valid, weights, 0.0).max() if weights.numel() else weights.sum(),
            "is_clipfrac": masked_mean(changed.to(mask.dtype), mask),
            "train_rollout_logp_diff": masked_mean((proximal_logp - behavior_logp).abs(), mask),
            "opsm_frac": masked_mean(opsm.expand_as(pg).to(mask.dtype), mask),
            "kl": masked_mean(kl.detach(), mask),
            "entropy": masked_mean(ent.detach(), mask),
        }
    return loss, metrics
