"""The fast paths of the model against their slow twins, and the properties the spec demands."""

from __future__ import annotations

import time

import pytest
import torch
from configs import MICRO

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.kernels.grouped_mm import grouped_mm, grouped_mm_reference
from glm5.model import ContiguousLatentCache
from glm5.model.attention import dense_latent_attention, sparse_latent_attention
from glm5.model.cache import Positions
from glm5.model.moe import MoE

CFG = MICRO


def model(cfg: GLM5Config = CFG, seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(cfg).eval()


def ids(batch: int, length: int, seed: int = 0, vocab: int = CFG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_sparse_gather_equals_dense_mask_reference() -> None:
    m, x = model(), ids(2, 40)
    m.configure_attention(impl="mask")
    reference = m(x).logits
    m.configure_attention(impl="sparse")
    assert (m(x).logits - reference).abs().max() <= 1e-5
    m.configure_attention(query_chunk=7)  # chunked indexer + chunked sparse attention
    assert (m(x).logits - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_chunked_indexer_selects_exactly_what_unchunked_selects() -> None:
    m, x = model(), ids(2, 50, seed=3)
    attn = m.model.layers[0].self_attn
    h = m.model.layers[0].input_layernorm(m.model.embed_tokens(x))
    cos, sin = m.rotary(torch.arange(50), h.dtype)
    c_q = attn.q_a_layernorm(attn.q_a_proj(h))
    q, k, w = attn.indexer.project(h, c_q, cos[None], sin[None])

    def visible(
        idx: torch.Tensor,
    ) -> torch.Tensor:  # rows with < K visible keys pad with (masked) future keys
        return torch.where(idx <= torch.arange(50).view(1, -1, 1), idx, -1).sort(-1).values

    whole = attn.indexer.select(q, k, w, Positions.shared(0, 50), chunk=50)
    for chunk in (1, 7, 16):
        assert torch.equal(
            visible(attn.indexer.select(q, k, w, Positions.shared(0, 50), chunk=chunk)), visible(whole)
        )
    # and the selection is the causal top-k of the unchunked score matrix
    scores = attn.indexer.scores(q, k, w).masked_fill(
        torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf")
    )
    assert torch.equal(visible(whole), visible(scores.topk(CFG.index_topk, dim=-1).indices))


def test_sparse_latent_attention_matches_masked_dense_and_chunks_agree() -> None:
    torch.manual_seed(0)
    B, T, H, r, R, K = 2, 30, 3, 10, 4, 6
    q = torch.randn(B, T, H, r + R)
    kv = torch.randn(B, T, r + R)

    # distinct keys per query, the query itself among them (top-k never repeats a key)
    def pick(t: int) -> torch.Tensor:
        others = torch.randperm(T - 1)[: K - 1]
        return torch.cat([torch.tensor([t]), others + (others >= t).long()])

    idx = torch.stack([torch.stack([pick(t) for t in range(T)]) for _ in range(B)])
    pos = torch.arange(T)[None]
    got = sparse_latent_attention(q, kv, idx, pos, r, 0.3)
    # naive: full score matrix, mask everything except selected & causal keys
    scores = torch.einsum("bthc,bsc->bths", q, kv) * 0.3
    keep = (
        torch.zeros(B, T, T, dtype=torch.bool).scatter_(-1, idx, True)
        & torch.ones(T, T, dtype=torch.bool).tril()
    )
    probs = torch.softmax(scores.masked_fill(~keep[:, :, None], float("-inf")), -1)
    expected = torch.einsum("bths,bsr->bthr", probs, kv[..., :r])
    assert (got - expected).abs().max() <= 1e-5
    assert torch.allclose(sparse_latent_attention(q, kv, idx, pos, r, 0.3, chunk=4), got, atol=1e-6)
    # dense latent attention = sparse attention that selects every key
    everything = torch.arange(T).expand(B, T, T)
    assert torch.allclose(
        dense_latent_attention(q, kv, pos, r, 0.3),
        sparse_latent_attention(q, kv, everything, pos, r, 0.3),
        atol=1e-5,
    )


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [5, 20])  # decode below and above index_topk keys
def test_absorbed_decode_with_cache_equals_expanded_full_forward(prompt_len: int) -> None:
    m, x = model(), ids(2, 30, seed=5)
    m.configure_attention(impl="mask")
    reference = m(x).logits  # expanded attention, no cache
    m.configure_attention(impl="sparse")
    cache = ContiguousLatentCache(CFG, batch_size=2, max_len=30)
    pieces = [m(x[:, :prompt_len], cache).logits]
    for t in range(prompt_len, 30):
        pieces.append(m(x[:, t : t + 1], cache).logits)  # absorbed: attends over the 576-style latent
    assert cache.seq_len == 30
    assert (torch.cat(pieces, 1) - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_later_tokens_never_change_earlier_logits() -> None:
    m = model()
    x = ids(1, 40, seed=7)
    y = x.clone()
    y[0, 25:] = (y[0, 25:] + 1) % CFG.vocab_size
    a, b = m(x).logits, m(y).logits
    assert torch.allclose(a[:, :25], b[:, :25], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_moe_dispatch_equals_per_token_loop() -> None:
    torch.manual_seed(0)
    moe = MoE(CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(37, CFG.hidden_size)
    weights, topk_idx, _ = moe.gate(x)
    fast = moe.experts(x, topk_idx, weights)
    slow = moe.experts.forward_naive(x, topk_idx, weights)
    assert (fast - slow).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("num_tokens", [1, 3, 4])
def test_moe_few_token_paths_equal_per_token_loop(num_tokens: int) -> None:
    torch.manual_seed(0)
    moe = MoE(CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(num_tokens, CFG.hidden_size)
    weights, topk_idx, _ = moe.gate(x)
    slow = moe.experts.forward_naive(x, topk_idx, weights)
    assert topk_idx.numel() <= CFG.n_routed_experts  # the decode dispatch takes the few-token path
    assert torch.equal(moe.experts(x, topk_idx, weights), moe.experts.forward_few(x, topk_idx, weights))
    for path in (moe.experts.forward_few, moe.experts.forward_gathered, moe.experts.forward_sorted):
        assert (path(x, topk_idx, weights) - slow).abs().max() <= 1e-5


def test_rmsnorm_fast_path_equals_reference_bitwise() -> None:
    from glm5.model.layers import RMSNorm

    torch.manual_seed(0)
    for dim in (24, 64, 256):
        norm = RMSNorm(dim, 1e-6)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(3, 5, dim) * 7
        assert torch.equal(norm(x), norm.forward_reference(x))
        half = x.bfloat16()  # bf16 runs the reference arithmetic (cast back before the weight, as HF)
        assert torch.equal(norm(half), norm.forward_reference(half))


def test_per_head_matmul_equals_einsum() -> None:
    from glm5.model.attention import _per_head_matmul

    torch.manual_seed(0)
    w = torch.randn(3, 8, 5)
    for B, T in ((1, 1), (2, 1), (2, 4)):
        x = torch.randn(B, T, 3, 8)
        expected = torch.einsum("bthi,hio->btho", x, w)
        assert (_per_head_matmul(x, w) - expected).abs().max() <= 1e-5


def test_gather_rows_of_one_row_equals_the_batched_gather() -> None:
    from glm5.model.attention import _gather_rows

    torch.manual_seed(0)
    x, idx = torch.randn(2, 30, 6), torch.randint(0, 30, (2, 4, 5))
    both = _gather_rows(x, idx)
    for b in range(2):
        assert torch.equal(_gather_rows(x[b : b + 1], idx[b : b + 1]), both[b : b + 1])


@torch.no_grad()
def test_indexer_selection_of_a_decode_query_is_the_top_k_of_all_its_keys() -> None:
    m, x = model(), ids(1, 50, seed=4)
    attn = m.model.layers[0].self_attn
    h = m.model.layers[0].input_layernorm(m.model.embed_tokens(x))
    cos, sin = m.rotary(torch.arange(50), h.dtype)
    c_q = attn.q_a_layernorm(attn.q_a_proj(h))
    q, k, w = attn.indexer.project(h, c_q, cos[None], sin[None])
    # the last query alone, as a decode step sees it: every key is visible, nothing is masked
    last = attn.indexer.select(q[:, -1:], k, w[:, -1:], Positions.shared(49, 1), chunk=None)
    expected = attn.indexer.scores(q[:, -1:], k, w[:, -1:]).topk(CFG.index_topk, dim=-1).indices
    assert torch.equal(last.sort(-1).values, expected.sort(-1).values)
    # a query in the middle still masks its future keys
    mid = attn.indexer.select(q[:, 20:21], k[:, :30], w[:, 20:21], Positions.shared(20, 1), chunk=None)
    assert (mid <= 20).all()


def test_grouped_mm_matches_reference_with_empty_groups() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 2])
    x, w = torch.randn(10, 8), torch.randn(5, 6, 8)
    expected = torch.cat([x[:3] @ w[0].t(), x[3:8] @ w[2].t(), x[8:] @ w[4].t()])
    assert torch.allclose(grouped_mm(x, w, counts), expected)
    assert torch.allclose(grouped_mm_reference(x, w, counts), expected)


def test_router_bias_changes_choice_but_not_weights() -> None:
    torch.manual_seed(0)
    moe = MoE(CFG)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(16, CFG.hidden_size)
    _, idx0, scores = moe.gate(x)
    moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 now always wins a slot
    weights, idx1, scores1 = moe.gate(x)
    assert torch.equal(scores, scores1)
    assert (idx1 == 5).any(-1).all() and not (idx0 == 5).any(-1).all()
    # weights are the un-biased sigmoid scores of the chosen experts, normalised, times routed_scaling_factor
    chosen = scores.gather(1, idx1)
    expected = chosen / chosen.sum(-1, keepdim=True) * CFG.routed_scaling_factor
    assert torch.allclose(weights, expected)


def test_router_bias_stays_fp32_under_bf16() -> None:
    m = model().to(torch.bfloat16)
    router = m.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.weight.dtype == torch.bfloat16
    assert m(ids(1, 12)).logits.dtype == torch.bfloat16


def test_stats_for_training_and_indexer_gets_only_its_own_gradient() -> None:
    m = model().train()
    x = ids(2, 30, seed=9)
    out = m(x, return_stats=True, mtp_depth=2)
    main = [s for s in out.stats if s.mtp_depth is None]
    mtp = [s for s in out.stats if s.mtp_depth is not None]
    assert [s.layer_idx for s in main] == [0, 1, 2] and [s.mtp_depth for s in mtp] == [0, 1]
    assert all(s.router is not None for s in main[1:] + mtp) and main[0].router is None  # layer 0 is dense
    for s in main[1:]:
        assert s.router.expert_load.sum() == 2 * 30 * CFG.num_experts_per_tok
    assert main[2].indexer_loss is None  # shared layer: no indexer of its own
    losses = [s.indexer_loss for s in out.stats if s.indexer_loss is not None]
    assert len(losses) == 4 and all(loss >= 0 for loss in losses)
    sum(losses).backward()
    for name, p in m.named_parameters():
        if ".indexer." in name:
            continue
        assert p.grad is None, f"indexer loss leaked a gradient into {name}"
    assert m.model.layers[0].self_attn.indexer.wq_b.weight.grad.abs().sum() > 0
    # and the LM loss does not reach the indexer
    m.zero_grad(set_to_none=True)
    m(x).logits.logsumexp(-1).mean().backward()
    assert m.model.layers[0].self_attn.indexer.wq_b.weight.grad is None
    assert m.model.layers[0].self_attn.q_b_proj.weight.grad is not None


def test_mtp_depths_share_parameters_and_stay_causal() -> None:
    m = model()
    x = ids(1, 24, seed=11)
    with torch.no_grad():
        a = m(x, mtp_depth=3).mtp_logits
        y = x.clone()
        y[0, 15] = (y[0, 15] + 1) % CFG.vocab_size
        b = m(y, mtp_depth=3).mtp_logits
    assert len(a) == 3 and len(m.mtp) == 1
    for d in range(3):
        # depth d at position t sees tokens up to t + d + 1
        last_unaffected = 15 - d - 1
        assert torch.allclose(a[d][:, :last_unaffected], b[d][:, :last_unaffected], atol=1e-6, rtol=0)
        assert not torch.allclose(a[d][:, last_unaffected:], b[d][:, last_unaffected:])


def test_dsa_off_means_dense_attention_even_for_long_sequences() -> None:
    m, x = model(), ids(1, 30)
    with torch.no_grad():
        sparse = m(x).logits
        m.configure_attention(dsa=False)
        dense = m(x).logits
        big = m.config.replace(index_topk=64)
        m2 = model(big)
        dense_ref = m2(x).logits  # index_topk > T: dense by definition, same weights (same seed)
    assert torch.allclose(dense, dense_ref, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_bad_inputs_raise_clear_errors() -> None:
    m = model()
    with pytest.raises(ValueError, match="batch, seq_len"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(CFG.replace(max_position_embeddings=8))(ids(1, 9))
    with pytest.raises(ValueError, match="cache holds"):
        cache = ContiguousLatentCache(CFG, 1, 4)
        m(ids(1, 5), cache)
    with pytest.raises(ValueError, match="impl"):
        m.configure_attention(impl="flash")


def test_glm5_preset_builds_on_meta_in_seconds() -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        big = GLM5ForCausalLM(GLM5Config.from_preset("glm-5"))
    elapsed = time.perf_counter() - start
    assert big.num_parameters(include_mtp=False) == 743_911_199_232
    assert big.num_parameters() == 753_864_119_552
    assert elapsed < 30, f"meta build took {elapsed:.1f}s"


class RaggedCache:
    """A minimal LatentCache whose rows hold different lengths (what a paged engine cache does), for tests."""

    def __init__(self, cfg: GLM5Config, lengths_per_row: int) -> None:
        self.rows = [ContiguousLatentCache(cfg, 1, lengths_per_row) for _ in range(2)]
        self.active: list[int] = [0, 1]

    def begin(self, num_new: int) -> tuple[Positions, int]:
        starts = torch.tensor([self.rows[r].seq_len for r in self.active])
        q_pos = starts[:, None] + torch.arange(num_new)
        same = bool((starts == starts[0]).all())
        return Positions(q_pos, int(starts[0]) if same else None), int(starts.max()) + num_new

    def update(self, layer_idx, c_kv, k_pe, index_k):
        parts = [
            self.rows[r].update(
                layer_idx, c_kv[i : i + 1], k_pe[i : i + 1], None if index_k is None else index_k[i : i + 1]
            )
            for i, r in enumerate(self.active)
        ]
        width = max(p[0].shape[1] for p in parts)

        def pad(t):  # garbage past a row's end; attention masks it by position
            return None if t is None else torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]), value=7.0)

        return tuple(None if parts[0][j] is None else torch.cat([pad(p[j]) for p in parts]) for j in range(3))

    def advance(self, num_tokens: int) -> None:
        for r in self.active:
            self.rows[r].advance(num_tokens)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sparse", "mask"])
def test_rows_of_different_lengths_decode_together_as_they_do_alone(impl: str) -> None:
    """Batched decode over ragged rows (one 6 tokens long, one 25: below and above index_topk) equals solo runs."""
    m = model()
    m.configure_attention(impl=impl)
    prompts = [ids(1, 6, seed=1), ids(1, 25, seed=2)]
    cache = RaggedCache(CFG, 40)
    last = []
    for row, prompt in enumerate(prompts):  # prefill each row on its own
        cache.active = [row]
        last.append(m(prompt, cache).logits[:, -1])
    cache.active = [0, 1]
    tokens = torch.stack([lg.argmax(-1) for lg in last])  # [2, 1]
    batched = []
    for _ in range(6):
        logits = m(tokens, cache).logits[:, -1]
        batched.append(logits)
        tokens = logits.argmax(-1, keepdim=True)
    for row, prompt in enumerate(prompts):  # the same greedy continuation, one row at a time, no cache
        seq = prompt
        for step in range(6):
            seq = torch.cat([seq, m(seq).logits[:, -1:].argmax(-1)], dim=1)
            solo = m(seq).logits[:, -1]
            assert (batched[step][row] - solo[0]).abs().max() <= 1e-5, (row, step)


@torch.no_grad()
def test_mtp_forward_with_its_own_cache_equals_the_training_forward() -> None:
    """Speculative decoding's MTP step (incremental, cached) reproduces the MTP logits of the full forward."""
    m = model()
    x = ids(1, 20, seed=13)
    full = m(x, mtp_depth=1, return_hidden=True)
    mtp_cache = ContiguousLatentCache(CFG, 1, 20)
    # positions 0..11 in one go, then one position at a time (as a decoder would after each accepted token)
    h, first = m.mtp_forward(full.hidden_states[:, :12], x[:, 1:13], mtp_cache)
    pieces = [first]
    for t in range(12, 19):
        pieces.append(m.mtp_forward(full.hidden_states[:, t : t + 1], x[:, t + 1 : t + 2], mtp_cache)[1])
    assert (torch.cat(pieces, 1) - full.mtp_logits[0][:, :19]).abs().max() <= 1e-5
