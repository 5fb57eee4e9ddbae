"""The training step's fast paths against their reference twins: the LM head fused with its cross-entropy
(glm5.model.loss) and the indexer loss that scores every key and takes the selected columns
(glm5.model.attention.DENSE_SCORES_MAX_RATIO). Values and gradients, fp32 and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from configs import MICRO
from trainutil import losses, params, prepare, run_folder, smoke_recipe

import glm5.model.attention as attention
from glm5.model import GLM5ForCausalLM
from glm5.model.loss import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference
from glm5.train import Trainer


def _head_case(n: int = 37, d: int = 24, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX  # rows without a target
    return h, w, t


def _loss_and_grads(fn, h, w, t, scale: float = 0.37, bf16: bool = False, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(h, w, t, **kw)
    (loss * scale).backward()  # a loss weight / target count upstream, as in training_losses
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 11])
def test_fused_cross_entropy_equals_cross_entropy_of_the_logits_in_fp32(chunk_rows) -> None:
    h, w, t = _head_case()
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=chunk_rows)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
    assert got[1][::5].abs().max() == 0  # ignored rows get no gradient


def test_fused_cross_entropy_groups_of_chunks_give_the_same_gradients(monkeypatch) -> None:
    """Weight gradients are summed per group of chunks: several groups equal one (up to fp32 summation order)."""
    import glm5.model.loss as loss_mod

    h, w, t = _head_case(n=40)
    one = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=4)
    monkeypatch.setattr(loss_mod, "GROUP_BYTES", 4 * w.shape[0] * 4)  # one 4-row chunk per group
    many = _loss_and_grads(linear_cross_entropy, h, w, t, chunk_rows=4)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_under_bf16_autocast_is_as_accurate_as_the_unfused_pair() -> None:
    """The head's product is rounded to bf16 as autocast's linear rounds it (the same loss), and the gradients
    are no further from the fp32 ones than the unfused autocast pair's."""
    h, w, t = _head_case(n=64, d=32, v=300, seed=1)
    exact = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t, bf16=True)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, bf16=True, chunk_rows=16)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    assert (got[0] - exact[0]).abs() > 1e-5 * exact[0]  # it did compute in bf16
    for i in (1, 2):
        ref_err = (ref[i] - exact[i]).norm()
        got_err = (got[i] - exact[i]).norm()
        assert got_err <= 1.5 * ref_err, (i, got_err.item(), ref_err.item())


def test_fused_cross_entropy_without_targets_is_zero_and_refuses_bad_shapes() -> None:
    h, w, _ = _head_case()
    none = torch.full((h.shape[0],), IGNORE_INDEX)
    loss, gh, gw = _loss_and_grads(linear_cross_entropy, h, w, none)
    assert loss == 0 and gh.abs().max() == 0 and gw.abs().max() == 0
    with pytest.raises(ValueError, match="must match the rows"):
        linear_cross_entropy(h, w, none[:-1])
    with pytest.raises(ValueError, match="features"):
        linear_cross_entropy(h[:, :-1], w, none)


def _micro_model(seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(MICRO).train()


def _targets(ids: torch.Tensor, depth: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    lm = F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    mtp = [F.pad(ids[:, d + 2 :], (0, d + 2), value=IGNORE_INDEX) for d in range(depth)]
    return lm, mtp


def test_the_forward_with_targets_equals_cross_entropy_of_its_logits() -> None:
    """Loss sums and every parameter's gradient, main model and two MTP depths (fp32)."""
    ids = torch.randint(0, MICRO.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    lm_t, mtp_t = _targets(ids, 2)
    grads = []
    for fused in (False, True):
        m = _micro_model()
        if fused:
            out = m(ids, mtp_depth=2, targets=lm_t, mtp_targets=mtp_t)
            assert out.logits is None and out.mtp_logits == []
            sums = [out.lm_loss_sum, *out.mtp_loss_sums]
        else:
            out = m(ids, mtp_depth=2)
            sums = [
                F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum")
                for logits, t in zip([out.logits, *out.mtp_logits], [lm_t, *mtp_t])
            ]
        (sums[0] + 0.3 * sums[1] + 0.2 * sums[2]).backward()
        grads.append(({n: p.grad for n, p in m.named_parameters() if p.grad is not None}, torch.stack(sums)))
    (ref_g, ref_s), (got_g, got_s) = grads
    torch.testing.assert_close(got_s, ref_s, rtol=1e-6, atol=0)
    assert got_g.keys() == ref_g.keys() and "lm_head.weight" in got_g
    for name in ref_g:  # fp32 rounding: a few ulps of each gradient's scale
        err = (got_g[name] - ref_g[name]).abs().max()
        assert err <= 2e-6 * ref_g[name].abs().max(), (name, err.item())


def test_the_forward_refuses_targets_it_cannot_use() -> None:
    m = _micro_model()
    ids = torch.randint(0, MICRO.vocab_size, (1, 8))
    lm_t, mtp_t = _targets(ids, 1)
    with pytest.raises(ValueError, match="one mtp_targets entry per MTP depth"):
        m(ids, mtp_depth=2, targets=lm_t, mtp_targets=mtp_t)
    with pytest.raises(ValueError, match="no num_logits_to_keep"):
        m(ids, targets=lm_t, mtp_targets=[], num_logits_to_keep=1)


def _indexer_losses(monkeypatch, ratio: int, ids: torch.Tensor):
    """Indexer losses, the indexer's gradients and how often keys were gathered, with the given ratio."""
    monkeypatch.setattr(attention, "DENSE_SCORES_MAX_RATIO", ratio)
    calls = []
    real = attention._gather_rows
    monkeypatch.setattr(attention, "_gather_rows", lambda *a: calls.append(1) or real(*a))
    m = _micro_model(seed=1)
    out = m(ids, mtp_depth=1, return_stats=True)
    lossv = torch.stack([s.indexer_loss for s in out.stats if s.indexer_loss is not None])
    lossv.sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if ".indexer." in n}
    return lossv.detach(), grads, len(calls)


def test_indexer_loss_from_every_keys_scores_equals_the_gathered_keys_form(monkeypatch) -> None:
    """S = 30 keys, top-8 (sparse stage): the default scores all keys (no gathers); ratio 0 forces the gathers."""
    ids = torch.randint(0, MICRO.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    default = attention.DENSE_SCORES_MAX_RATIO
    assert 30 > MICRO.index_topk and 30 <= default * MICRO.index_topk
    ref_l, ref_g, ref_calls = _indexer_losses(monkeypatch, 0, ids)
    got_l, got_g, got_calls = _indexer_losses(monkeypatch, default, ids)
    assert ref_calls > 0 and got_calls == 0  # each form took its own path
    torch.testing.assert_close(got_l, ref_l, rtol=1e-5, atol=1e-7)
    assert all(g is not None for g in got_g.values()) and got_g.keys() == ref_g.keys()
    scale = max(g.abs().max() for g in ref_g.values())  # fp32 rounding, relative to the gradients' scale
    for name in ref_g:  # (not per tensor: the k_norm bias's gradient is a near-cancelled sum)
        err = (got_g[name] - ref_g[name]).abs().max()
        assert err <= 1e-5 * scale, (name, err.item())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("fastpath_base"))


def test_a_training_run_with_fused_heads_equals_the_unfused_run(base, tmp_path) -> None:
    """Three fp32 steps through every stage of the smoke recipe: the losses agree to fp32 rounding, and the
    weights to 1% of what AdamW can move them in those steps (lr per step; it amplifies the rounding of
    near-zero gradients, a wrong gradient moves weights by ~lr)."""
    runs = []
    for fused in (False, True):
        trainer = Trainer(
            smoke_recipe(steps=3, dtype="float32"), run_folder(base, tmp_path / str(fused)), quiet=True
        )
        trainer.fused_loss = fused
        runs.append((losses(trainer.fit()), params(trainer)))
    (ref_losses, ref_params), (got_losses, got_params) = runs
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    bound = 0.01 * trainer.recipe.lr * 3
    for name in ref_params:
        err = (got_params[name] - ref_params[name]).abs().max()
        assert err <= bound, (name, err.item(), bound)


def test_moe_experts_cast_once_under_autocast_give_the_per_call_casts_bitwise() -> None:
    """forward_sorted casts the rows and the 3-D expert weights once under bf16 autocast; the per-expert-call
    casts of plain autocast (its twin, written out here) give the same output and gradients, bit for bit."""
    from glm5.kernels.grouped_mm import grouped_mm
    from glm5.model.moe import MoE

    torch.manual_seed(5)
    moe = MoE(MICRO)
    for p in (moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, MICRO.hidden_size)
    weights, idx, _ = moe.gate(x)
    weights = weights.detach()

    def per_call(x_ND: torch.Tensor) -> torch.Tensor:
        ex, flat = moe.experts, idx.reshape(-1)
        order = flat.argsort(stable=True)
        token_of, counts = order // idx.shape[1], torch.bincount(flat, minlength=ex.num_experts)
        gate, up = grouped_mm(x_ND.index_select(0, token_of), ex.gate_up_proj, counts).chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, ex.down_proj, counts) * weights.reshape(-1)[order, None].to(
            torch.bfloat16
        )
        return torch.zeros_like(x_ND).index_add_(0, token_of, y.to(x_ND.dtype))

    results = []
    for fn in (per_call, lambda x_ND: moe.experts.forward_sorted(x_ND, idx, weights)):
        moe.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xg)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, xg.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad))
    for ref, got in zip(*results):
        assert torch.equal(ref, got)
