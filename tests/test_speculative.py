"""MTP speculative decoding: exact accept/reject (statistically), greedy equality with plain decoding, rollback of
rejected cache entries, and acceptance metrics."""

from __future__ import annotations

import shutil

import pytest
import torch
from configs import MICRO

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.sampling import sample_from_probs
from glm5.engine.speculative import accept_greedy, accept_sampled

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = MICRO.replace(
    num_hidden_layers=2, index_topk_pattern=None, max_position_embeddings=256, eos_token_id=[1]
)


def model(seed: int = 0, cfg: GLM5Config = CFG) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(cfg).eval()


def prompts(lengths: list[int], seed: int = 0, vocab: int = CFG.vocab_size) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(
        torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64), stat / 2
    ).item()


# ------------------------------------------------------------------------------------- accept / reject math
def test_accept_greedy_keeps_the_matching_prefix_and_the_targets_next_choice() -> None:
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    target = torch.tensor([[5, 6, 7, 8]] * 3)
    accepted, tokens = accept_greedy(drafts, target)
    assert accepted.tolist() == [3, 1, 0]
    assert [tokens[b, : a + 1].tolist() for b, a in enumerate(accepted.tolist())] == [
        [5, 6, 7, 8],
        [5, 6],
        [5],
    ]


def test_accept_sampled_outputs_the_target_distribution_and_the_theoretical_acceptance_rate() -> None:
    g = torch.Generator().manual_seed(0)
    V, k, N = 5, 2, 40_000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1).double()
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1).double()
    q[0, 3] = 0.0  # a token the drafter never proposes must still come out with probability p
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack(
        [
            sample_from_probs(q[i].expand(N, V), torch.rand(N, generator=g, dtype=torch.float64))
            for i in range(k)
        ],
        1,
    )
    accepted, tokens = accept_sampled(
        drafts,
        q.expand(N, k, V),
        p.expand(N, k + 1, V),
        torch.rand(N, k, generator=g, dtype=torch.float64),
        torch.rand(N, generator=g, dtype=torch.float64),
    )
    first = torch.bincount(tokens[:, 0], minlength=V).double()
    assert chi_square_p_value(first, p[0]) > 1e-3  # token 1 ~ p_1 whatever the drafts
    two = accepted >= 1
    second = torch.bincount(tokens[two, 1], minlength=V).double()
    assert chi_square_p_value(second, p[1]) > 1e-3  # token 2 ~ p_2 (p does not depend on the context here)
    rate = torch.minimum(p[0], q[0]).sum().item()
    assert abs(two.double().mean().item() - rate) < 0.01


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_bonus_token_after_k_accepted_drafts_comes_from_the_next_target_distribution(k: int) -> None:
    """All k drafts kept -> token k+1 ~ p_{k+1}, not p_k. Drafts from q = p are always kept (p/q = 1 > u), so
    every one of the N rows draws a bonus token. The distributions are chosen far apart (total variation
    >= 0.4 between neighbours), so with N = 4000 a bonus drawn from p_k has a chi-square p-value against p_{k+1}
    of ~0 (below 1e-300 in 900 seeded trials), while the correct one fails the 1e-6 threshold once in a million
    seeds."""
    g = torch.Generator().manual_seed(100 + k)
    V, N = 6, 4000
    # p_i puts half its mass on token i (mod V), the rest spread unevenly over the others
    p = torch.rand(k + 1, V, generator=g, dtype=torch.float64) + 0.2
    p = p / p.sum(-1, keepdim=True) * 0.5
    p[torch.arange(k + 1), torch.arange(k + 1) % V] += 0.5
    assert ((p[1:] - p[:-1]).abs().sum(-1) / 2 >= 0.4).all()
    drafts = torch.stack(
        [
            sample_from_probs(p[i].expand(N, V), torch.rand(N, generator=g, dtype=torch.float64))
            for i in range(k)
        ],
        1,
    )
    accepted, tokens = accept_sampled(
        drafts,
        p[:k].expand(N, k, V),  # q = p: every draft is kept
        p.expand(N, k + 1, V),
        torch.rand(N, k, generator=g, dtype=torch.float64),
        torch.rand(N, generator=g, dtype=torch.float64),
    )
    assert (accepted == k).all()
    assert torch.equal(tokens[:, :k], drafts)
    bonus = torch.bincount(tokens[:, k], minlength=V).double()
    assert chi_square_p_value(bonus, p[k]) > 1e-6  # token k+1 ~ p_{k+1}
    assert chi_square_p_value(bonus, p[k - 1]) < 1e-12  # the test can tell p_k from p_{k+1}


def test_the_bonus_token_is_from_p_k_plus_1_also_when_drafts_are_kept_by_chance() -> None:
    """q != p: condition on the rows that kept both drafts; their third token must still be ~ p_3."""
    g = torch.Generator().manual_seed(7)
    V, k, N = 5, 2, 60_000
    p = torch.softmax(torch.randn(k + 1, V, generator=g, dtype=torch.float64) * 1.5, -1)
    p[2] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)  # p_3 far from p_2
    p[1] = torch.tensor([0.05, 0.05, 0.3, 0.3, 0.3], dtype=torch.float64)
    q = p[:k] + torch.rand(k, V, generator=g, dtype=torch.float64) * 0.3
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack(
        [
            sample_from_probs(q[i].expand(N, V), torch.rand(N, generator=g, dtype=torch.float64))
            for i in range(k)
        ],
        1,
    )
    accepted, tokens = accept_sampled(
        drafts,
        q.expand(N, k, V),
        p.expand(N, k + 1, V),
        torch.rand(N, k, generator=g, dtype=torch.float64),
        torch.rand(N, generator=g, dtype=torch.float64),
    )
    all_kept = accepted == k
    rate = torch.minimum(p[0], q[0]).sum() * torch.minimum(p[1], q[1]).sum()
    # acceptance is independent per position here
    assert abs(all_kept.double().mean().item() - rate.item()) < 0.01
    bonus = torch.bincount(tokens[all_kept, k], minlength=V).double()
    assert chi_square_p_value(bonus, p[k]) > 1e-6
    assert chi_square_p_value(bonus, p[k - 1]) < 1e-12


# ------------------------------------------------------------------------------------- engine
GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(k: int) -> None:
    m = model(1)
    ps = prompts([2, 9, 17, 30], seed=k)
    plain = [o.outputs[0].token_ids for o in LLM(m, block_size=4).generate(ps, GREEDY)]
    llm = LLM(m, block_size=4, num_speculative_tokens=k)
    spec = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]
    assert spec == plain
    assert llm.engine.cache.num_used_blocks == 0 and llm.engine.mtp_cache.num_used_blocks == 0


def test_partially_right_drafts_are_rolled_back_and_output_stays_plain_greedy() -> None:
    """Drafts from an oracle that knows the greedy continuation but spoils some: ragged acceptance per row."""
    m = model(2)
    ps = prompts([3, 11, 26], seed=9)
    plain = [o.outputs[0].token_ids for o in LLM(m, block_size=4).generate(ps, GREEDY)]
    llm = LLM(m, block_size=4, num_speculative_tokens=3)
    eng = llm.engine
    propose = eng.drafter.propose
    spoiled = {"n": 0}

    @torch.no_grad()
    def oracle(seqs, batch, uniforms):
        drafts, _ = propose(seqs, batch, uniforms)  # keeps the MTP cache's bookkeeping real
        for b, s in enumerate(seqs):
            seq = torch.tensor([s.tokens])
            for j in range(3):
                nxt = m(seq).logits[:, -1:].argmax(-1)
                spoil = (len(s.tokens) + j + b) % 4 == 0
                spoiled["n"] += spoil
                drafts[b, j] = (nxt.item() + 1) % CFG.vocab_size if spoil else nxt.item()
                seq = torch.cat([seq, nxt], 1)
        return drafts, None

    eng.drafter.propose = oracle
    requests = [eng.make_request(str(i), p, GREEDY) for i, p in enumerate(ps)]
    for r in requests:
        eng.submit(r)
    while eng.has_unfinished_requests():
        eng.step()
        for s in eng.running:  # rollback: each cache holds exactly the committed positions
            if s.status.name == "DECODE":
                assert eng.cache.length(s.seq_id) == len(s.tokens) - 1
                assert eng.mtp_cache.length(s.seq_id) + s.pending_hidden.shape[0] == len(s.tokens) - 1
    assert [eng.final_output(r).outputs[0].token_ids for r in requests] == plain
    metrics = eng.spec_metrics
    assert spoiled["n"] > 0 and 0 < metrics.num_accepted_tokens < metrics.num_draft_tokens
    assert 1.0 < metrics.mean_acceptance_length < 4.0
    assert all(r.metrics.num_accepted_tokens <= r.metrics.num_draft_tokens for r in requests)


def test_drafts_that_always_match_are_all_accepted() -> None:
    """Zero final norms make every logit 0, so the main model and the MTP both pick token 0: k + 1 tokens a step."""
    m = model(3)
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.mtp[0].shared_head.norm.weight.zero_()
    llm = LLM(m, block_size=4, num_speculative_tokens=3)
    out = llm.generate(prompts([7], seed=1), SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True))[
        0
    ]
    assert out.outputs[0].token_ids == [0] * 13
    metrics = llm.engine.spec_metrics
    assert metrics.acceptance_rate == 1.0 and metrics.mean_acceptance_length == 4.0
    assert metrics.num_steps == 3  # 1 token from the prefill, then 3 steps of 4
    assert out.metrics.num_accepted_tokens == 9


@pytest.mark.parametrize("k", [0, 2])
def test_sampled_output_has_the_models_distribution(k: int) -> None:
    """Two sampled tokens from a model over 8 tokens: the joint frequencies over 3,000 seeds match p(x1) p(x2|x1)."""
    cfg = CFG.replace(vocab_size=8, eos_token_id=[])
    m = model(4, cfg)
    with torch.no_grad():  # sharper than a random init, so the two distributions differ visibly
        m.lm_head.weight.mul_(40.0)
    prompt = [3, 5, 2, 7, 6]
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1].double(), -1)
        p2 = torch.stack(
            [torch.softmax(m(torch.tensor([prompt + [t]])).logits[0, -1].double(), -1) for t in range(8)]
        )
    joint = (p1[:, None] * p2).reshape(-1)
    n = 3000
    llm = LLM(m, block_size=4, num_speculative_tokens=k, max_num_seqs=512)
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s) for s in range(n)]
    outs = llm.generate([prompt] * n, params)
    cells = torch.tensor([o.outputs[0].token_ids[0] * 8 + o.outputs[0].token_ids[1] for o in outs])
    assert chi_square_p_value(torch.bincount(cells, minlength=64).double(), joint) > 1e-3
    if k:
        assert llm.engine.spec_metrics.num_accepted_tokens > 0


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_greedy_drafting_in_the_kernel_equals_the_model_path_with_the_same_mtp_cache() -> None:
    """The greedy path folds the catch-up into the drafting kernel call (all of it when the rows catch up alike,
    else the last position, the others skipping the head): its drafts and every MTP cache entry it writes equal
    those of the model's own mtp_forward path, under ragged acceptance (an oracle spoils some drafts) and prefix
    caching."""
    m = model(4)
    ps = prompts([3, 10, 21], seed=5)
    runs = []
    for in_kernel in (True, False):
        llm = LLM(m, block_size=4, num_speculative_tokens=3)
        drafter = llm.engine.drafter
        for store in (*drafter.cache.kv, *(t for t in drafter.cache.index_k if t is not None)):
            store.zero_()  # slots never written compare equal
        assert drafter.fused is not None and drafter.fused.drafts_in_kernel(drafter.cache)
        if not in_kernel:
            drafter.fused = None  # every MTP forward through the model's mtp_forward
        propose, seen, folded = drafter.propose, [], {"n": 0}
        kernel_propose = drafter._propose_in_kernel

        def counting(*args, _inner=kernel_propose, _n=folded):  # noqa: ANN002, ANN202
            _n["n"] += 1
            return _inner(*args)

        drafter._propose_in_kernel = counting
        catch_up = []
        if in_kernel:
            draft_call = drafter.fused.mtp_draft

            def recording(hidden, *args, _inner=draft_call, _seen=catch_up):  # noqa: ANN001, ANN002, ANN202
                _seen.append(hidden.shape[1] if hidden.dim() == 3 else 1)  # positions the first step feeds
                return _inner(hidden, *args)

            drafter.fused.mtp_draft = recording

        @torch.no_grad()
        def oracle(seqs, batch, uniforms, _propose=propose, _seen=seen):  # noqa: ANN001, ANN202
            drafts, _ = _propose(seqs, batch, uniforms)
            _seen.append(drafts.tolist())
            for b, s in enumerate(seqs):
                seq = torch.tensor([s.tokens])
                for j in range(3):
                    nxt = m(seq).logits[:, -1:].argmax(-1)
                    spoil = (len(s.tokens) + j + b) % 3 == 0
                    drafts[b, j] = (nxt.item() + 1) % CFG.vocab_size if spoil else nxt.item()
                    seq = torch.cat([seq, nxt], 1)
            return drafts, None

        drafter.propose = oracle
        out = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]
        kv = torch.cat([t.flatten() for t in drafter.cache.kv])
        runs.append((out, seen, kv, folded["n"], catch_up))
    (out_k, seen_k, kv_k, n_k, fed_k), (out_m, seen_m, kv_m, n_m, _) = runs
    assert n_k > 0 and n_m == 0  # the first run drafted in the kernel, the second never
    assert max(fed_k) > 1  # catch-ups of several positions went into the drafting call
    assert out_k == out_m and seen_k == seen_m
    torch.testing.assert_close(kv_k, kv_m, rtol=1e-5, atol=1e-5)
