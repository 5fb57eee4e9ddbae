"""RL losses (docs/rl.md § What the tests prove, items 1-4): IS weights, gradients, micro-batching, advantages, PPO/GSPO
clipping, KL estimators. Expectations are hand-computed or come from naive per-token loops, never from the
implementation under test."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.rl.losses import (
    LossConfig,
    compute_advantages,
    gae_advantages,
    importance_weights,
    kl_penalty,
    policy_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Exact comparisons with hand values need double precision; restored for the other test modules."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


HYP = settings(max_examples=25, deadline=None, derandomize=True)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------- importance weights
# Row 0: ratios pi_old/mu = 0.5, 1.5, 3.0 (product 2.25, geometric mean 2.25 ** (1/3) = 1.3104);
# row 1: 0.8, 1.25 (product 1); row 2: 0.25, 0.25 (product 0.0625, geometric mean 0.25). The last column
# is padding holding a huge ratio that must never count.
RATIOS = [[0.5, 1.5, 3.0, 1e6], [0.8, 1.25, 1e6, 1e6], [0.25, 0.25, 1e6, 1e6]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
GEO0 = 2.25 ** (1 / 3)
# (level, rule) -> expected weights on the masked tokens of each row (low = 0.6, high = 2.0)
IS_TABLE = {
    ("token", "truncate"): [[0.5, 1.5, 2.0], [0.8, 1.25], [0.25, 0.25]],
    ("token", "mask"): [[0.0, 1.5, 0.0], [0.8, 1.25], [0.0, 0.0]],
    ("token", "clip"): [[0.6, 1.5, 2.0], [0.8, 1.25], [0.6, 0.6]],
    ("sequence", "truncate"): [[2.0] * 3, [1.0] * 2, [0.0625] * 2],
    ("sequence", "mask"): [[0.0] * 3, [1.0] * 2, [0.0] * 2],
    ("sequence", "clip"): [[2.0] * 3, [1.0] * 2, [0.6] * 2],
    ("geometric", "truncate"): [[GEO0] * 3, [1.0] * 2, [0.25] * 2],
    ("geometric", "mask"): [[GEO0] * 3, [1.0] * 2, [0.0] * 2],
    ("geometric", "clip"): [[GEO0] * 3, [1.0] * 2, [0.6] * 2],
}
# which masked tokens the rule changed
CHANGED = {
    ("token", "truncate"): [[0, 0, 1], [0, 0], [0, 0]],
    ("token", "mask"): [[1, 0, 1], [0, 0], [1, 1]],
    ("token", "clip"): [[1, 0, 1], [0, 0], [1, 1]],
    ("sequence", "truncate"): [[1] * 3, [0] * 2, [0] * 2],
    ("sequence", "mask"): [[1] * 3, [0] * 2, [1] * 2],
    ("sequence", "clip"): [[1] * 3, [0] * 2, [1] * 2],
    ("geometric", "truncate"): [[0] * 3, [0] * 2, [0] * 2],
    ("geometric", "mask"): [[0] * 3, [0] * 2, [1] * 2],
    ("geometric", "clip"): [[0] * 3, [0] * 2, [1] * 2],
}


def _is_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    behavior = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)) - 2.0
    proximal = behavior + torch.log(_t(RATIOS))
    return proximal, behavior, _t(MASK)


@pytest.mark.parametrize(("level", "rule"), sorted(IS_TABLE))
def test_importance_weights_match_hand_computed_values_at_every_level_and_rule(level, rule):
    proximal, behavior, mask = _is_inputs()
    cfg = LossConfig(is_level=level, is_rule=rule, is_threshold_low=0.6, is_threshold_high=2.0)
    weights, changed = importance_weights(proximal, behavior, mask, cfg)
    for b, expected in enumerate(IS_TABLE[level, rule]):
        n = len(expected)
        assert weights[b, :n].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert changed[b, :n].tolist() == [bool(c) for c in CHANGED[level, rule][b]]
        assert not changed[b, n:].any()


def test_truncate_ignores_the_low_threshold_and_veto_zeroes_a_whole_rollout():
    proximal, behavior, mask = _is_inputs()
    weights, _ = importance_weights(proximal, behavior, mask, LossConfig(is_threshold_low=0.6))
    assert weights[2, :2].tolist() == pytest.approx([0.25, 0.25])  # truncate: only the upper bound
    veto = LossConfig(is_veto_threshold=0.3)  # row 2 has a token ratio 0.25 < 0.3
    weights, changed = importance_weights(proximal, behavior, mask, veto)
    assert weights[2, :2].tolist() == [0.0, 0.0] and changed[2, :2].all()
    assert weights[0, :3].tolist() == pytest.approx([0.5, 1.5, 2.0])


def test_a_sequence_ratio_beyond_float_range_is_truncated_not_nan():
    log_ratio = torch.full((1, 50), 20.0)  # exp(1000) overflows
    for rule in ("truncate", "mask", "clip"):
        weights, _ = importance_weights(
            log_ratio, torch.zeros(1, 50), torch.ones(1, 50), LossConfig(is_level="sequence", is_rule=rule)
        )
        assert torch.isfinite(weights).all()
        assert weights[0, 0].item() == (0.0 if rule == "mask" else pytest.approx(2.0))


@HYP
@given(
    st.lists(st.floats(-3, 3), min_size=1, max_size=6),
    st.sampled_from(["token", "sequence", "geometric"]),
    st.sampled_from(["truncate", "mask", "clip"]),
    st.floats(0.0, 0.9),
    st.floats(1.1, 5.0),
)
def test_importance_weights_stay_within_the_rule_bounds(log_ratios, level, rule, low, high):
    proximal = torch.tensor([log_ratios])
    cfg = LossConfig(is_level=level, is_rule=rule, is_threshold_low=low, is_threshold_high=high)
    w = importance_weights(proximal, torch.zeros_like(proximal), torch.ones_like(proximal), cfg)[0][
        0
    ].tolist()
    tol = 1e-9
    for x in w:
        if rule == "truncate":
            assert 0 <= x <= high + tol
        elif rule == "clip":
            assert low - tol <= x <= high + tol
        else:
            assert x == 0 or low - tol <= x <= high + tol


# ---------------------------------------------------------------------------- the plain case
def _batch(seed: int, lengths: list[int], width: int | None = None):
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), width or max(lengths)
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    behavior = -torch.rand(b, t, generator=g) * 3
    proximal = behavior + 0.3 * torch.randn(b, t, generator=g)
    current = proximal + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    ref = current + 0.2 * torch.randn(b, t, generator=g)
    ent = torch.rand(b, t, generator=g)
    return current, proximal, behavior, adv, mask, ref, ent


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("rule", ["truncate", "mask", "clip"])
def test_identical_policies_give_unit_weights_the_plain_pg_loss_and_zero_ppo_kl(level, rule):
    current, _, _, adv, mask, _, _ = _batch(1, [3, 5, 1, 4], width=6)
    current = current.clone().requires_grad_(True)
    same = current.detach().clone()
    cfg = LossConfig(is_level=level, is_rule=rule, is_threshold_low=0.5)
    loss, m = policy_loss(current, same, same, adv, mask, cfg)
    assert m["ppo_kl"].item() == 0.0 and m["clipfrac"].item() == 0.0 and m["is_clipfrac"].item() == 0.0
    assert m["is_weight_mean"].item() == 1.0 and m["is_weight_max"].item() == 1.0
    assert m["train_rollout_logp_diff"].item() == 0.0
    # plain policy gradient: loss = -(1/B) sum_b A_b * (1/n_b) sum_t ratio_t, ratio = 1
    lengths = [3, 5, 1, 4]
    assert loss.item() == pytest.approx(-sum(adv.tolist()) / 4)
    loss.backward()
    for b, n in enumerate(lengths):
        assert current.grad[b, :n].tolist() == pytest.approx([-adv[b].item() / n / 4] * n)
        assert current.grad[b, n:].abs().sum().item() == 0.0


# ---------------------------------------------------------------------------- gradients
def _naive_coefficient(cur, prox, beh, a, n, num_rollouts, cfg):
    """d loss / d current_logp for one token of decoupled PPO (token-level truncate IS), by cases."""
    r = math.exp(cur - prox)
    w = min(math.exp(prox - beh), cfg.is_threshold_high)
    if a > 0 and r > 1 + cfg.eps_clip_high:
        return 0.0  # clipped: constant
    if a < 0 and r < 1 - cfg.eps_clip_low:
        return 0.0
    if a < 0 and cfg.dual_clip_c is not None and r > cfg.dual_clip_c:
        return 0.0  # dual clip: capped at c * |A|
    return -w * a * r / n / num_rollouts


@pytest.mark.parametrize("dual", [None, 1.5])
def test_autograd_gradient_equals_the_analytic_is_weighted_policy_gradient(dual):
    """Categorical toy policy: current_logp = log_softmax(theta)[token]; d log pi(a) / d theta = e_a - pi."""
    g = torch.Generator().manual_seed(3)
    lengths, vocab = [4, 2, 5], 5
    b, t = len(lengths), max(lengths)
    theta = torch.randn(b, t, vocab, generator=g, requires_grad=True)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths])
    current = torch.log_softmax(theta, -1).gather(-1, tokens[..., None])[..., 0]
    proximal = current.detach() + 0.5 * torch.randn(b, t, generator=g)  # ratios spread over [0.3, 3]
    behavior = proximal + 0.6 * torch.randn(b, t, generator=g)
    adv = torch.tensor([1.3, -0.7, -1.1])
    cfg = LossConfig(dual_clip_c=dual, is_threshold_high=1.5)
    loss, metrics = policy_loss(current, proximal, behavior, adv, mask, cfg)
    loss.backward()
    probs = torch.softmax(theta.detach(), -1)
    expected = torch.zeros_like(theta)
    zero_grad_tokens = 0
    for i in range(b):
        for j in range(lengths[i]):
            coef = _naive_coefficient(
                current[i, j].item(),
                proximal[i, j].item(),
                behavior[i, j].item(),
                adv[i].item(),
                lengths[i],
                b,
                cfg,
            )
            zero_grad_tokens += coef == 0.0
            expected[i, j] = coef * (torch.nn.functional.one_hot(tokens[i, j], vocab) - probs[i, j])
    assert 0 < zero_grad_tokens < sum(lengths)  # the case exercises both clipped and unclipped tokens
    torch.testing.assert_close(theta.grad, expected, rtol=1e-10, atol=1e-12)
    assert metrics["is_weight_max"].item() <= 1.5


def test_loss_gradient_passes_finite_difference_check():
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    tokens = torch.randint(0, 4, (2, 3), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    proximal = torch.log_softmax(theta.detach(), -1).gather(-1, tokens[..., None])[..., 0] + 0.05
    behavior = proximal - 0.2
    ref = proximal + 0.1
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, is_level="geometric")

    def fn(th):
        logp = torch.log_softmax(th, -1)
        current = logp.gather(-1, tokens[..., None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)
        return policy_loss(
            current, proximal, behavior, torch.tensor([0.8, -0.4]), mask, cfg, ref_logp=ref, entropy=entropy
        )[0]

    assert torch.autograd.gradcheck(fn, (theta,))


def _bandit():
    theta = torch.tensor([0.3, -0.2, 0.5, -0.6], requires_grad=True)
    reward = torch.tensor([1.0, -0.5, 0.25, 2.0])
    mu = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pi = torch.softmax(theta.detach(), -1)
    exact = -sum(pi[a] * reward[a] * (torch.eye(4)[a] - pi) for a in range(4))  # -grad E_pi[R]
    return theta, reward, mu, pi, exact


def _bandit_loss_grad(theta, actions, reward, mu, cfg):
    logp = torch.log_softmax(theta, -1)[actions][:, None]
    n = len(actions)
    loss, _ = policy_loss(
        logp, logp.detach(), mu.log()[actions][:, None], reward[actions], torch.ones(n, 1), cfg
    )
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def test_is_corrected_gradient_from_behavior_samples_equals_the_on_policy_gradient():
    """Each action appears in proportion to mu(a) (10 rollouts: 1, 2, 3, 4 copies), so the batch gradient is the
    exact expectation under mu: with IS weight pi/mu it must equal the on-policy gradient under pi."""
    theta, reward, mu, pi, exact = _bandit()
    actions = torch.tensor([0] + [1] * 2 + [2] * 3 + [3] * 4)
    untruncated = LossConfig(is_threshold_high=100.0)
    torch.testing.assert_close(_bandit_loss_grad(theta, actions, reward, mu, untruncated), exact)
    assert (pi / mu).max() > 1.5  # so a truncation at 1.5 bites...
    biased = _bandit_loss_grad(theta, actions, reward, mu, LossConfig(is_threshold_high=1.5))
    assert (biased - exact).abs().max() > 0.05  # ...and biases the gradient measurably
    assert (pi / mu).max() < 4.0  # a truncation above every weight changes nothing
    torch.testing.assert_close(
        _bandit_loss_grad(theta, actions, reward, mu, LossConfig(is_threshold_high=4.0)), exact
    )
    uncorrected = _bandit_loss_grad(theta, actions, reward, mu, LossConfig(off_policy="none"))
    assert (uncorrected - exact).abs().max() > 0.05


def test_is_corrected_gradient_from_sampled_behavior_matches_on_policy_within_statistical_error():
    theta, reward, mu, pi, exact = _bandit()
    n = 20_000
    actions = torch.multinomial(mu, n, replacement=True, generator=torch.Generator().manual_seed(5))
    grad = _bandit_loss_grad(theta, actions, reward, mu, LossConfig(is_threshold_high=100.0))
    per_sample = -((pi / mu)[actions] * reward[actions])[:, None] * (torch.eye(4)[actions] - pi)
    stderr = per_sample.std(0) / math.sqrt(n)
    assert ((grad - exact).abs() < 4 * stderr + 1e-9).all()


# ---------------------------------------------------------------------------- micro-batch invariance
def _run(batch, rows, cfg, **kwargs):
    current, proximal, behavior, adv, mask, ref, ent = batch
    width = int(mask[rows].sum(-1).max().item())  # each micro-batch re-padded to its own length
    cur = current[rows, :width].detach().clone().requires_grad_(True)
    loss, _ = policy_loss(
        cur,
        proximal[rows, :width],
        behavior[rows, :width],
        adv[rows],
        mask[rows, :width],
        cfg,
        ref_logp=ref[rows, :width],
        entropy=ent[rows, :width],
        **kwargs,
    )
    loss.backward()
    grad = torch.zeros_like(current)
    grad[rows, :width] = cur.grad
    return loss.detach(), grad


REDUCTION_CFGS = [
    LossConfig(kl_coef=0.05, entropy_coef=0.01, is_level="sequence"),
    LossConfig(reduction="token_sum_global", dual_clip_c=3.0, kl_estimator="k2"),
    LossConfig(
        reduction="constant", loss_constant=16.0, policy_loss="gspo", is_rule="mask", is_level="geometric"
    ),
]


@pytest.mark.parametrize("cfg", REDUCTION_CFGS, ids=lambda c: c.reduction)
@pytest.mark.parametrize(
    "splits", [[[0, 1, 2], [3, 4, 5]], [[0, 1], [2, 3], [4, 5]], [[5], [0, 2, 4, 1], [3]]]
)
def test_micro_batch_losses_and_gradients_sum_to_the_full_batch(cfg, splits):
    batch = _batch(7, [3, 7, 1, 5, 2, 6], width=9)
    counts = {"num_rollouts": 6, "num_tokens": 24}
    full_loss, full_grad = _run(batch, list(range(6)), cfg, **counts)
    parts = [_run(batch, rows, cfg, **counts) for rows in splits]
    torch.testing.assert_close(sum(p[0] for p in parts), full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(p[1] for p in parts), full_grad, rtol=1e-12, atol=1e-12)


@HYP
@given(st.lists(st.integers(1, 6), min_size=2, max_size=7), st.data())
def test_any_random_micro_batch_split_leaves_loss_and_gradient_unchanged(lengths, data):
    batch = _batch(len(lengths), lengths)
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.02, dual_clip_c=2.0)
    order = data.draw(st.permutations(range(len(lengths))))
    cut = data.draw(st.integers(1, len(lengths) - 1))
    full_loss, full_grad = _run(batch, list(range(len(lengths))), cfg, num_rollouts=len(lengths))
    parts = [_run(batch, rows, cfg, num_rollouts=len(lengths)) for rows in (order[:cut], order[cut:])]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss)
    torch.testing.assert_close(parts[0][1] + parts[1][1], full_grad)


def test_fan_out_segments_split_across_micro_batches_count_their_rollout_once():
    """Rollouts 0 and 1 are each two rows (segments); rollout 2 is one row. Reference: per-rollout token mean
    over all its segments' tokens, averaged over the 3 rollouts, computed token by token."""
    lengths = [2, 3, 4, 1, 5]
    rollout_of_row = [0, 0, 1, 1, 2]
    batch = _batch(11, lengths)
    current, proximal, behavior, adv, mask, _, _ = batch
    adv = torch.tensor([0.9, 0.9, -0.4, -0.4, 1.5])  # segments share their rollout's advantage
    batch = (current, proximal, behavior, adv, mask, current.detach(), torch.zeros_like(current))
    cfg = LossConfig()
    total = {0: 5, 1: 5, 2: 5}
    counts = torch.tensor([float(total[r]) for r in rollout_of_row])
    expected = 0.0
    for i, n in enumerate(lengths):
        for j in range(n):
            r = math.exp(current[i, j].item() - proximal[i, j].item())
            w = min(math.exp(proximal[i, j].item() - behavior[i, j].item()), 2.0)
            a = adv[i].item()
            pg = max(-a * r, -a * min(max(r, 0.8), 1.28))
            expected += w * pg / total[rollout_of_row[i]] / 3
    loss = 0.0
    grads = 0.0
    for rows in ([0, 2], [1, 3, 4]):
        part, grad = _run(batch, rows, cfg, num_rollouts=3, rollout_token_counts=counts[rows])
        loss, grads = loss + part, grads + grad
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    full_loss, full_grad = _run(batch, list(range(5)), cfg, num_rollouts=3, rollout_token_counts=counts)
    torch.testing.assert_close(full_loss, loss)
    torch.testing.assert_close(full_grad, grads)


# ---------------------------------------------------------------------------- advantages
# Groups are interleaved and not numbered from 0: group 3 = rewards 1, 0, 1, 0; group 8 = one rollout (5);
# group 1 = rewards 2, 4.
REWARDS = [1.0, 2.0, 0.0, 1.0, 5.0, 0.0, 4.0]
GROUPS = [3, 1, 3, 3, 8, 3, 1]


def _adv(**kwargs) -> list[float]:
    return compute_advantages(torch.tensor(REWARDS), torch.tensor(GROUPS), LossConfig(**kwargs)).tolist()


def test_grpo_advantage_is_reward_minus_group_mean():
    assert _adv(normalize_advantage_std=False) == pytest.approx([0.5, -1.0, -0.5, 0.5, 0.0, -0.5, 1.0])


def test_grpo_advantage_divides_by_the_unbiased_group_std():
    s3 = math.sqrt((4 * 0.25) / 3)  # group 3: deviations +-0.5, n - 1 = 3
    s1 = math.sqrt((1 + 1) / 1)  # group 1: deviations -+1, n - 1 = 1
    expected = [0.5 / s3, -1 / s1, -0.5 / s3, 0.5 / s3, 0.0, -0.5 / s3, 1 / s1]
    assert _adv() == pytest.approx(expected, rel=1e-5)


def test_rloo_advantage_subtracts_the_mean_of_the_other_rollouts():
    # group 3 (1, 0, 1, 0): 1 - 1/3, 0 - 2/3; group 1 (2, 4): 2 - 4, 4 - 2; a lone rollout has no baseline: 0
    expected = [1 - 1 / 3, 2 - 4, 0 - 2 / 3, 1 - 1 / 3, 0.0, 0 - 2 / 3, 4 - 2]
    assert _adv(advantage_estimator="rloo") == pytest.approx(expected)


def test_reinforce_plus_plus_baseline_whitens_group_centred_rewards_by_the_batch_std():
    centred = [0.5, -1.0, -0.5, 0.5, 0.0, -0.5, 1.0]  # mean 0
    std = math.sqrt(sum(c * c for c in centred) / 7)
    assert _adv(advantage_estimator="reinforce++") == pytest.approx([c / std for c in centred], rel=1e-5)
    assert _adv(advantage_estimator="reinforce++", normalize_advantage_std=False) == pytest.approx(centred)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_zero_variance_groups_get_zero_advantage_not_nan(estimator):
    adv = compute_advantages(
        torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]),
        torch.tensor([0, 0, 0, 1, 1]),
        LossConfig(advantage_estimator=estimator),
    )
    assert adv.tolist() == [0.0] * 5


@HYP
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0, -1.0, 3.0])), min_size=1, max_size=12
    )
)
def test_group_advantages_match_a_naive_per_group_loop(items):
    groups = [g for g, _ in items]
    rewards = [r for _, r in items]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    grpo, rloo = [0.0] * len(items), [0.0] * len(items)
    for idx in members.values():
        vals = [Fraction(rewards[i]) for i in idx]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)
        for i, v in zip(idx, vals, strict=True):
            grpo[i] = float(v - mean) / (math.sqrt(var) + 1e-6)
            others = [vals[k] for k in range(len(vals)) if idx[k] != i]
            rloo[i] = float(v - sum(others) / len(others)) if others else 0.0
    r, g = torch.tensor(rewards), torch.tensor(groups)
    assert compute_advantages(r, g, LossConfig()).tolist() == pytest.approx(grpo, abs=1e-9)
    assert compute_advantages(r, g, LossConfig(advantage_estimator="rloo")).tolist() == pytest.approx(rloo)


def test_gae_matches_a_naive_backward_recursion_that_skips_unmasked_tokens():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    adv, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for b in range(2):
        idx = [t for t in range(6) if mask[b, t]]
        running, expected = 0.0, {}
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            running = rewards[b, t].item() + gamma * next_v - values[b, t].item() + gamma * lam * running
            expected[t] = running
        for t in range(6):
            assert adv[b, t].item() == pytest.approx(expected.get(t, 0.0))
            assert returns[b, t].item() == pytest.approx(
                expected[t] + values[b, t].item() if t in expected else 0
            )


# ---------------------------------------------------------------------------- clipping
def _one_token(ratio: float, adv: float, cfg: LossConfig):
    current = torch.tensor([[math.log(ratio)]], requires_grad=True)
    zero = torch.zeros(1, 1)
    loss, metrics = policy_loss(current, zero, zero, torch.tensor([adv]), torch.ones(1, 1), cfg)
    loss.backward()
    return loss.item(), current.grad.item(), metrics


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad", "clipped"),
    [
        (1.25, 2.0, -2.5, -2.5, 0),  # A > 0, inside clip-high 1.28: loss -A r, d/dlogp = -A r
        (1.30, 2.0, -2.56, 0.0, 1),  # A > 0 beyond 1 + 0.28: clipped to -A * 1.28, no gradient
        (0.70, 2.0, -1.4, -1.4, 0),  # A > 0 below 1 - 0.2: the min keeps the unclipped (pessimistic) term
        (0.85, -1.0, 0.85, 0.85, 0),  # A < 0 inside: loss -A r
        (0.75, -1.0, 0.8, 0.0, 1),  # A < 0 below 1 - 0.2: clipped to -A * 0.8
        (1.50, -1.0, 1.5, 1.5, 0),  # A < 0 above 1 + eps: unclipped (no dual clip)
    ],
)
def test_ppo_clip_with_asymmetric_bounds(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, metrics = _one_token(ratio, adv, LossConfig())
    assert got_loss == pytest.approx(loss) and got_grad == pytest.approx(grad)
    assert metrics["clipfrac"].item() == clipped
    assert metrics["ppo_kl"].item() == pytest.approx(-math.log(ratio))


def test_clip_high_is_separate_from_clip_low():
    assert _one_token(1.25, 1.0, LossConfig(eps_clip_high=0.2))[1] == 0.0  # 1.25 > 1 + 0.2: clipped
    assert _one_token(1.25, 1.0, LossConfig(eps_clip_low=0.1, eps_clip_high=0.3))[1] != 0.0
    assert _one_token(0.85, -1.0, LossConfig(eps_clip_low=0.1, eps_clip_high=0.3))[1] == 0.0  # 0.85 < 0.9


def test_dual_clip_caps_negative_advantage_tokens_at_c_times_abs_advantage():
    cfg = LossConfig(dual_clip_c=3.0)
    loss, grad, metrics = _one_token(5.0, -2.0, cfg)
    assert (loss, grad, metrics["dual_clipfrac"].item()) == (pytest.approx(6.0), 0.0, 1.0)
    loss, grad, _ = _one_token(5.0, -2.0, LossConfig())
    assert (loss, grad) == (pytest.approx(10.0), pytest.approx(10.0))  # without it the loss is unbounded
    loss, grad, metrics = _one_token(2.0, -2.0, cfg)  # ratio below c: untouched
    assert (loss, grad, metrics["dual_clipfrac"].item()) == (pytest.approx(4.0), pytest.approx(4.0), 0.0)
    loss, grad, _ = _one_token(5.0, 2.0, cfg)  # positive advantages: ordinary clip only
    assert (loss, grad) == (pytest.approx(-2.56), 0.0)


def test_gspo_clips_the_sequence_ratio_not_token_ratios():
    # token ratios 2.0 and 0.5 (geometric mean 1): PPO clips token 0; GSPO sees ratio 1 and clips nothing
    current = torch.tensor([[math.log(2.0), math.log(0.5)]], requires_grad=True)
    zero, mask = torch.zeros(1, 2), torch.ones(1, 2)
    loss, metrics = policy_loss(
        current, zero, zero, torch.tensor([1.0]), mask, LossConfig(policy_loss="gspo")
    )
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and metrics["clipfrac"].item() == 0.0
    # loss = -A s with s = exp(mean log ratio): d/d logp_t = -A s / n
    assert current.grad.tolist() == [[pytest.approx(-0.5), pytest.approx(-0.5)]]
    ppo_loss, ppo_metrics = policy_loss(current, zero, zero, torch.tensor([1.0]), mask, LossConfig())
    assert ppo_metrics["clipfrac"].item() == 0.5
    assert ppo_loss.item() == pytest.approx(-(1.28 + 0.5) / 2)
    # a sequence ratio beyond the bound clips every token of the rollout
    current = torch.tensor([[math.log(2.0), math.log(1.0)]])  # geometric mean sqrt(2) > 1.28
    _, metrics = policy_loss(current, zero, zero, torch.tensor([1.0]), mask, LossConfig(policy_loss="gspo"))
    assert metrics["clipfrac"].item() == 1.0


# ---------------------------------------------------------------------------- off-policy modes
def test_off_policy_modes_pick_the_ratio_denominator_and_the_weight():
    current, proximal, behavior, adv, mask, _, _ = _batch(13, [3, 2])
    cur = current.detach()
    none_loss, none_m = policy_loss(cur, proximal, behavior, adv, mask, LossConfig(off_policy="none"))
    moved, _ = policy_loss(cur, proximal, behavior + 1.0, adv, mask, LossConfig(off_policy="none"))
    assert moved.item() == none_loss.item()  # none: behavior only feeds the metrics
    assert none_m["ppo_kl"].item() == pytest.approx(((proximal - cur) * mask).sum().item() / 5)
    assert none_m["train_rollout_logp_diff"].item() == pytest.approx(
        ((proximal - behavior).abs() * mask).sum().item() / 5
    )
    by_loss, by_m = policy_loss(cur, proximal + 5.0, behavior, adv, mask, LossConfig(off_policy="bypass"))
    assert by_m["ppo_kl"].item() == pytest.approx(((behavior - cur) * mask).sum().item() / 5)
    same, _ = policy_loss(cur, behavior, behavior, adv, mask, LossConfig(off_policy="none"))
    assert by_loss.item() == pytest.approx(same.item())  # bypass == none with proximal := behavior
    dec_loss, _ = policy_loss(cur, proximal, behavior, adv, mask, LossConfig(is_threshold_high=1e9))
    expected = 0.0
    for b, n in enumerate([3, 2]):
        for t in range(n):
            r = math.exp(cur[b, t].item() - proximal[b, t].item())
            a = adv[b].item()
            w = math.exp(proximal[b, t].item() - behavior[b, t].item())
            expected += w * max(-a * r, -a * min(max(r, 0.8), 1.28)) / n / 2
    assert dec_loss.item() == pytest.approx(expected, rel=1e-12)


def test_opsm_drops_only_negative_advantage_rollouts_that_drifted_too_far():
    current = torch.zeros(3, 2, requires_grad=True)
    behavior = torch.tensor([[0.5, 0.3], [0.5, 0.3], [0.05, 0.05]])  # mean log(mu/pi) 0.4, 0.4, 0.05
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, metrics = policy_loss(
        current,
        current.detach(),
        behavior,
        adv,
        torch.ones(3, 2),
        LossConfig(off_policy="none", opsm_delta=0.1),
    )
    loss.backward()
    assert current.grad[0].tolist() == [0.0, 0.0]  # A < 0 and drifted: masked
    assert current.grad[1].abs().min() > 0 and current.grad[2].abs().min() > 0
    assert metrics["opsm_frac"].item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- KL and entropy
def test_kl_estimators_match_hand_values_at_one_point():
    logp, ref = torch.tensor([math.log(0.4)]), torch.tensor([math.log(0.2)])  # log r = log 2
    ln2 = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(ln2)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(ln2 * ln2 / 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + ln2)  # 1/r - 1 + log r


def test_k1_and_k3_are_unbiased_for_the_categorical_kl_and_k2_for_half_the_squared_log_ratio():
    g = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(6, generator=g), -1)
    q = torch.softmax(torch.randn(6, generator=g), -1)
    closed_kl = sum(p[i].item() * math.log(p[i].item() / q[i].item()) for i in range(6))
    expect = lambda est: (p * kl_penalty(p.log(), q.log(), est)).sum().item()  # noqa: E731
    assert expect("k1") == pytest.approx(closed_kl) and expect("k3") == pytest.approx(closed_kl)
    half_sq = sum(p[i].item() * math.log(p[i].item() / q[i].item()) ** 2 / 2 for i in range(6))
    assert expect("k2") == pytest.approx(half_sq)


@HYP
@given(st.floats(-8, 8))
def test_k2_and_k3_are_nonnegative_and_all_estimators_vanish_at_equal_policies(log_r):
    x = torch.tensor([log_r])
    assert kl_penalty(x, torch.zeros(1), "k3").item() >= 0 and kl_penalty(x, torch.zeros(1), "k2").item() >= 0
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(x, x, est).item() == 0.0


def test_kl_and_entropy_terms_add_to_the_loss_with_the_same_reduction():
    current, proximal, behavior, adv, mask, ref, ent = _batch(9, [2, 4, 3])
    base, _ = policy_loss(current, proximal, behavior, adv, mask, LossConfig())
    kl_loss, m = policy_loss(current, proximal, behavior, adv, mask, LossConfig(kl_coef=0.3), ref_logp=ref)
    ent_loss, m2 = policy_loss(
        current, proximal, behavior, adv, mask, LossConfig(entropy_coef=0.2), entropy=ent
    )
    lengths = [2, 4, 3]
    k3 = lambda b, t: math.exp(ref[b, t] - current[b, t]) - 1 - (ref[b, t] - current[b, t]).item()  # noqa: E731
    per_rollout_kl = sum(sum(k3(b, t) for t in range(n)) / n for b, n in enumerate(lengths)) / 3
    per_rollout_ent = sum(sum(ent[b, t].item() for t in range(n)) / n for b, n in enumerate(lengths)) / 3
    assert kl_loss.item() - base.item() == pytest.approx(0.3 * per_rollout_kl)
    assert ent_loss.item() - base.item() == pytest.approx(-0.2 * per_rollout_ent)
    assert m["kl"].item() == pytest.approx(sum(k3(b, t) for b, n in enumerate(lengths) for t in range(n)) / 9)
    _, first = policy_loss(current, current, current, adv, mask, LossConfig(kl_coef=0.3), ref_logp=current)
    assert first["kl"].item() == 0.0 and first["ppo_kl"].item() == 0.0


def test_missing_ref_or_entropy_and_bad_shapes_raise_clear_errors():
    current, proximal, behavior, adv, mask, _, _ = _batch(1, [2, 3])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(current, proximal, behavior, adv, mask, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(current, proximal, behavior, adv, mask, LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="behavior_logp"):
        policy_loss(current, proximal, behavior[:, :1], adv, mask, LossConfig())
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(current, proximal, behavior, adv[:1], mask, LossConfig())


def test_garbage_in_padded_positions_never_reaches_loss_or_gradient():
    current, proximal, behavior, adv, mask, ref, ent = _batch(12, [3, 1], width=4)
    cur = current.clone()
    pad = mask == 0
    cur[pad], proximal[pad], behavior[pad] = -torch.inf, 80.0, -80.0
    ref[pad], ent[pad] = torch.nan, torch.nan
    cur.requires_grad_(True)
    for level in ("token", "sequence", "geometric"):
        cfg = LossConfig(kl_coef=0.1, entropy_coef=0.1, is_level=level, is_rule="mask", policy_loss="gspo")
        loss, metrics = policy_loss(cur, proximal, behavior, adv, mask, cfg, ref_logp=ref, entropy=ent)
        (grad,) = torch.autograd.grad(loss, cur)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[pad].abs().sum() == 0
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"advantage_estimator": "ppo"}, "advantage_estimator"),
        ({"off_policy": "tis"}, "off_policy"),
        ({"is_level": "seq"}, "is_level"),
        ({"is_rule": "icepop"}, "is_rule"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"reduction": "mean"}, "reduction"),
        ({"policy_loss": "cispo"}, "policy_loss"),
        ({"dual_clip_c": 0.5}, "dual_clip_c"),
        ({"eps_clip_low": 1.5}, "eps_clip_low"),
        ({"is_threshold_low": 3.0}, "is_threshold_low"),
        ({"kl_coef": -1.0}, "kl_coef"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        LossConfig(**kwargs)
