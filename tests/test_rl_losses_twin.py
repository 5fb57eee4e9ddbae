"""Reference twin of `policy_loss`: the pieces it is composed of (importance_ratio, clipped_surrogate,
dual_clip, importance_weights, off_policy_sequence_mask, reference_kl, regularized, aggregate) must give
bit-identical loss, metrics and gradient to the single-function implementation they replaced, frozen below
(verbatim, with its helpers) over every loss variant and option."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from glm5.rl.losses import (
    IS_LEVELS,
    IS_RULES,
    KL_ESTIMATORS,
    OFF_POLICY_MODES,
    POLICY_LOSSES,
    REDUCTIONS,
    LossConfig,
    policy_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- frozen copy (do not edit)
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


def _reduce(
    token_loss: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    num_rollouts: int | None,
    num_tokens: int | None,
    rollout_token_counts: Tensor | None,
) -> Tensor:
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


def frozen_policy_loss(
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
    _check_shapes(
        {
            "current_logp": current_logp,
            "proximal_logp": proximal_logp,
            "behavior_logp": behavior_logp,
            "loss_mask": loss_mask,
            "ref_logp": ref_logp,
            "entropy": entropy,
        },
        advantages,
    )
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("LossConfig.kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("LossConfig.entropy_coef > 0 needs entropy (the current policy's per-token entropy)")
    if rollout_token_counts is not None and rollout_token_counts.shape != current_logp.shape[:1]:
        raise ValueError(f"rollout_token_counts must have shape [B] = {tuple(current_logp.shape[:1])}")
    mask = loss_mask.to(current_logp.dtype)
    valid = mask > 0
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).detach().to(current_logp.dtype)
    old = (behavior_logp if cfg.off_policy == "bypass" else proximal_logp).detach()

    # Padding may hold anything: zero the log-ratio there before exp so no inf/NaN reaches the gradient.
    log_ratio = torch.where(valid, current_logp - old, 0.0)
    if cfg.policy_loss == "gspo":
        seq = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(log_ratio)
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.eps_clip_low, 1.0 + cfg.eps_clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if cfg.dual_clip_c is not None:
        cap = -adv * cfg.dual_clip_c
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)

    if cfg.off_policy == "decoupled":
        weights, changed = importance_weights(proximal_logp, behavior_logp, loss_mask, cfg)
        pg = pg * weights
    else:
        weights, changed = torch.ones_like(pg), torch.zeros_like(clipped)

    opsm = torch.zeros_like(clipped)
    if cfg.opsm_delta is not None:
        seq_kl = masked_rowmean(torch.where(valid, (behavior_logp - current_logp).detach(), 0.0), mask)
        opsm = (adv < 0) & (seq_kl > cfg.opsm_delta)
        pg = torch.where(opsm, 0.0, pg)

    token_loss = pg
    kl = torch.zeros_like(pg)
    if ref_logp is not None:
        kl = kl_penalty(
            torch.where(valid, current_logp, 0.0), torch.where(valid, ref_logp, 0.0), cfg.kl_estimator
        )
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl
    ent = entropy if entropy is not None else torch.zeros_like(pg)
    if cfg.entropy_coef > 0:
        token_loss = token_loss - cfg.entropy_coef * ent

    reduce = lambda x: _reduce(x, mask, cfg, num_rollouts, num_tokens, rollout_token_counts)  # noqa: E731
    loss = reduce(token_loss)
    with torch.no_grad():
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


# ---------------------------------------------------------------------------- the comparison
B, T = 5, 7


def _inputs(dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T) < torch.tensor([[7], [4], [1], [0], [6]])).to(dtype)  # row 3: no token at all
    mask[0, 2] = 0.0  # a hole (a tool observation) inside a response
    behavior = torch.randn(B, T, generator=g, dtype=dtype) - 2.0
    proximal = behavior + 0.7 * torch.randn(B, T, generator=g, dtype=dtype)
    current = proximal + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = current + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    pad = mask == 0  # padding may hold anything; the loss must not look at it
    behavior, current = behavior.masked_fill(pad, -60.0), current.masked_fill(pad, 40.0)
    return {
        "current": current,
        "proximal": proximal,
        "behavior": behavior,
        "ref": ref,
        "entropy": torch.rand(B, T, generator=g, dtype=dtype) * 3,
        "mask": mask,
        "adv_rows": torch.tensor([1.5, -0.7, 0.0, 2.0, -2.5], dtype=dtype),
        "adv_tokens": torch.randn(B, T, generator=g, dtype=dtype),
    }


def _run(fn, cfg: LossConfig, x: dict[str, Tensor], options: dict[str, Any]) -> tuple[Tensor, dict, Tensor]:
    current = x["current"].clone().requires_grad_(True)
    loss, metrics = fn(
        current,
        x["proximal"],
        x["behavior"],
        x["adv_tokens"] if options["token_adv"] else x["adv_rows"],
        x["mask"],
        cfg,
        ref_logp=x["ref"] if options["ref"] else None,
        entropy=x["entropy"] if options["entropy"] else None,
        num_rollouts=options["num_rollouts"],
        num_tokens=options["num_tokens"],
        rollout_token_counts=x["mask"].sum(-1) + 2 if options["counts"] else None,
    )
    loss.backward()
    return loss, metrics, current.grad


def _cases():
    """Every (policy loss, off-policy mode, IS level, IS rule, reduction), each with a different mix of the other
    options, cycled so that every option value meets every main axis value."""
    extras = list(
        itertools.product(
            (None, 3.0),  # dual_clip_c
            (None, 0.5),  # is_veto_threshold
            (None, 0.05),  # opsm_delta
            KL_ESTIMATORS,
            ((0.0, False), (0.0, True), (0.1, True)),  # (kl_coef, ref_logp given)
            ((0.0, False), (0.0, True), (0.01, True)),  # (entropy_coef, entropy given)
            (False, True),  # token-level advantages
            ((None, None, False), (12, 40, False), (9, None, True)),  # (num_rollouts, num_tokens, counts)
            (None, 16.0),  # loss_constant
        )
    )
    main = itertools.product(POLICY_LOSSES, OFF_POLICY_MODES, IS_LEVELS, IS_RULES, REDUCTIONS)
    for i, (loss, off, level, rule, reduction) in enumerate(main):
        for j in (i, i + 167, i + 331):  # three spread picks per main combination (coprime strides)
            dual, veto, opsm, est, (kl_coef, ref), (ent_coef, ent), token_adv, counts, constant = extras[
                (j * 7919) % len(extras)
            ]
            cfg = LossConfig(
                policy_loss=loss,
                off_policy=off,
                is_level=level,
                is_rule=rule,
                reduction=reduction,
                dual_clip_c=dual,
                is_veto_threshold=veto,
                opsm_delta=opsm,
                kl_estimator=est,
                kl_coef=kl_coef,
                entropy_coef=ent_coef,
                loss_constant=constant,
                is_threshold_low=0.5 if rule != "truncate" else 0.0,
                is_threshold_high=1.6,
            )
            options = {
                "ref": ref,
                "entropy": ent,
                "token_adv": token_adv,
                "num_rollouts": counts[0],
                "num_tokens": counts[1],
                "counts": counts[2],
            }
            yield cfg, options


CASES = list(_cases())


def test_the_cases_cover_every_option_value():
    seen = {
        name: {getattr(cfg, name) for cfg, _ in CASES}
        for name in (
            "dual_clip_c",
            "is_veto_threshold",
            "opsm_delta",
            "kl_estimator",
            "kl_coef",
            "entropy_coef",
        )
    }
    assert all(len(values) >= 2 for values in seen.values()), seen
    assert {o["counts"] for _, o in CASES} == {False, True} and {o["token_adv"] for _, o in CASES} == {
        False,
        True,
    }
    assert len(CASES) == 3 * len(POLICY_LOSSES) * len(OFF_POLICY_MODES) * 9 * len(REDUCTIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_is_bit_identical_to_the_frozen_single_function_version(dtype):
    for seed, (cfg, options) in enumerate(CASES):
        x = _inputs(dtype, seed)
        loss, metrics, grad = _run(policy_loss, cfg, x, options)
        ref_loss, ref_metrics, ref_grad = _run(frozen_policy_loss, cfg, x, options)
        where = f"case {seed}: {cfg} {options}"
        assert torch.isfinite(loss), where
        assert torch.equal(loss, ref_loss), where
        assert torch.equal(grad, ref_grad), where
        assert metrics.keys() == ref_metrics.keys(), where
        for name in metrics:
            assert torch.equal(metrics[name], ref_metrics[name]), f"{name}, {where}"


def test_the_twin_comparison_notices_a_tiny_change():
    """The comparison is strict: moving both clip bounds by 1e-12 changes the loss of a case that clips."""
    x = _inputs(torch.float64, 0)
    cfg, options = next((c, o) for c, o in CASES if _run(policy_loss, c, x, o)[1]["clipfrac"] > 0)
    nudged = dataclasses.replace(
        cfg,
        eps_clip_low=cfg.eps_clip_low - 1e-12,
        eps_clip_high=cfg.eps_clip_high + 1e-12,
    )
    assert not torch.equal(
        _run(policy_loss, nudged, x, options)[0], _run(frozen_policy_loss, cfg, x, options)[0]
    )
