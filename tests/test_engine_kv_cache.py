"""The paged latent cache: the model over it equals the contiguous cache, block accounting, prefix hashing,
copy-on-write, rollback and eviction."""

from __future__ import annotations

import pytest
import torch
from configs import MICRO

from glm5 import GLM5ForCausalLM
from glm5.engine.kv_cache import BlockPool, PagedLatentCache
from glm5.model import ContiguousLatentCache

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = MICRO


def model() -> GLM5ForCausalLM:
    torch.manual_seed(0)
    return GLM5ForCausalLM(CFG).eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_bytes_per_block_counts_latent_and_indexer_keys_of_each_layer() -> None:
    cache = PagedLatentCache(CFG, num_blocks=8, block_size=4)
    # 3 layers x (kv_lora 24 + rope 8) + 2 layers with their own indexer x 16 ("FFS"), fp32, 4 tokens
    assert cache.bytes_per_block == (3 * 32 + 2 * 16) * 4 * 4
    assert cache.bytes_per_block == PagedLatentCache.block_bytes(CFG, 4, [0, 1, 2], torch.float32)
    mtp = PagedLatentCache(CFG, num_blocks=8, block_size=4, layers=[3])
    assert mtp.bytes_per_block == (32 + 16) * 4 * 4
    assert cache.usage()["free_blocks"] == 7  # block 0 is the null block


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sparse", "mask"])
def test_ragged_rows_over_fragmented_blocks_equal_contiguous_caches(impl: str) -> None:
    m = model()
    m.configure_attention(impl=impl)
    cache = PagedLatentCache(CFG, num_blocks=32, block_size=4)
    prompts = [ids(13, 1), ids(25, 2)]  # around index_topk and far above it
    for s in (0, 1):
        cache.add_sequence(s)
    last = {}
    for lo in range(0, 25, 4):  # prefill both rows a block at a time, alternating: their blocks interleave
        for s, p in enumerate(prompts):
            if lo < len(p):
                cache.prepare([s], [p[lo : lo + 4]])
                last[s] = m(torch.tensor([p[lo : lo + 4]]), cache).logits[:, -1]
    assert not cache.seqs[0].contiguous and not cache.seqs[1].contiguous
    refs = [ContiguousLatentCache(CFG, 1, 40) for _ in prompts]
    ref_last = [m(torch.tensor([p]), c).logits[:, -1] for p, c in zip(prompts, refs)]
    tokens = [int(last[s].argmax()) for s in (0, 1)]
    for s in (0, 1):
        assert (last[s] - ref_last[s]).abs().max() <= 1e-5
    for _ in range(5):
        cache.prepare([0, 1], [[t] for t in tokens])
        logits = m(torch.tensor([[t] for t in tokens]), cache).logits[:, -1]
        for s in (0, 1):
            ref = m(torch.tensor([[tokens[s]]]), refs[s]).logits[:, -1]
            assert (logits[s] - ref[0]).abs().max() <= 1e-5
        tokens = logits.argmax(-1).tolist()
    assert cache.length(0) == 18 and cache.length(1) == 30


def test_full_blocks_are_registered_matched_and_shared() -> None:
    cache = PagedLatentCache(CFG, num_blocks=16, block_size=4)
    tokens = list(range(10))
    cache.add_sequence(0)
    _write(cache, 0, tokens)
    assert cache.seqs[0].registered == 2  # two full blocks hashed, the partial third is not
    blocks = cache.match_prefix(tokens)
    assert blocks == cache.seqs[0].blocks[:2]
    assert cache.match_prefix([0, 1, 2, 3, 9, 9, 9, 9]) == blocks[:1]  # diverges in the second block
    assert cache.match_prefix(tokens, hash_seed=5) == []  # the seed enters every hash (the MTP cache's use)
    cache.add_sequence(1)
    assert cache.attach_prefix(1, tokens, blocks) == 8
    assert [cache.pool.refcount[b] for b in blocks] == [2, 2]
    cache.free(0)
    cache.free(1)
    assert cache.num_used_blocks == 0 and cache.num_cached_blocks == 2  # kept for later hits
    assert cache.match_prefix(tokens) == blocks


def test_fork_copies_a_shared_partial_block_before_writing() -> None:
    cache = PagedLatentCache(CFG, num_blocks=16, block_size=4)
    cache.add_sequence(0)
    _write(cache, 0, [1, 2, 3, 4, 5, 6])
    parent_blocks = list(cache.seqs[0].blocks)
    before = cache.kv[0][parent_blocks[1] * 4 : parent_blocks[1] * 4 + 2].clone()
    cache.fork(0, 1)
    _write(cache, 1, [7])
    child = cache.seqs[1].blocks
    # shared full block, copied partial one
    assert child[0] == parent_blocks[0] and child[1] != parent_blocks[1]
    assert torch.equal(cache.kv[0][child[1] * 4 : child[1] * 4 + 2], before)  # the copy kept positions 4, 5
    assert torch.equal(cache.kv[0][parent_blocks[1] * 4 : parent_blocks[1] * 4 + 2], before)
    assert cache.pool.refcount[parent_blocks[0]] == 2 and cache.pool.refcount[parent_blocks[1]] == 1


def test_truncate_rolls_back_and_a_rewritten_registered_block_leaves_the_cache() -> None:
    cache = PagedLatentCache(CFG, num_blocks=16, block_size=4)
    cache.add_sequence(0)
    _write(cache, 0, list(range(9)))
    used = cache.num_used_blocks
    cache.truncate(0, 6)
    assert cache.length(0) == 6 and cache.num_used_blocks == used - 1 and cache.seqs[0].registered == 1
    second = cache.seqs[0].blocks[1]
    assert second in cache.pool.hash_of  # registered while it was full...
    _write(cache, 0, [42])
    assert second not in cache.pool.hash_of  # ...and forgotten once position 6 is overwritten
    assert cache.match_prefix(list(range(8))) == cache.seqs[0].blocks[:1]


def test_eviction_takes_the_least_recently_used_cached_block() -> None:
    pool = BlockPool(4)  # 3 usable blocks
    a, b, c = (pool.allocate()[0] for _ in range(3))
    for block, h in ((a, 10), (b, 11), (c, 12)):
        pool.register(block, h, (h,))
    for block in (b, a, c):
        pool.decref(block)
    assert pool.num_free == 3 and pool.num_cached == 3
    assert pool.allocate()[0] == b  # freed first, evicted first
    assert pool.lookup(11, (11,)) is None and pool.lookup(10, (10,)) == a


def test_prepare_refuses_when_the_blocks_run_out_and_reset_forgets_cached_prefixes() -> None:
    cache = PagedLatentCache(CFG, num_blocks=3, block_size=4)  # 8 token slots
    cache.add_sequence(0)
    with pytest.raises(RuntimeError, match="needs 3 more blocks"):
        cache.prepare([0], [list(range(9))])
    _write(cache, 0, list(range(8)))
    cache.free(0)
    assert cache.num_cached_blocks == 2
    cache.reset_prefix_cache()
    assert (
        cache.num_cached_blocks == 0
        and cache.num_free_blocks == 2
        and cache.match_prefix(list(range(8))) == []
    )


def _write(cache: PagedLatentCache, seq: int, tokens: list[int]) -> None:
    """Append entries for `tokens` through the LatentCache protocol, with recognisable values."""
    cache.prepare([seq], [tokens])
    T = len(tokens)
    positions, _ = cache.begin(T)
    value = positions.q_pos.float().view(1, T, 1)
    for layer in range(CFG.num_hidden_layers):
        idx = value.expand(1, T, CFG.index_head_dim) if layer < 2 else None
        cache.update(layer, value.expand(1, T, 24), value.expand(1, T, 8), idx)
    cache.advance(T)


def test_the_cache_latent_views_join_without_a_copy_and_equal_the_concatenation() -> None:
    from glm5.model.attention import _join_latent

    cache = PagedLatentCache(CFG, num_blocks=16, block_size=4)
    for s in (0, 1):
        cache.add_sequence(s)
        _write(cache, s, list(range(5 + s)))
    for rows in ([0], [0, 1]):  # one contiguous sequence (views of the storage) and a gathered batch
        cache.prepare(rows, [[1]] * len(rows))
        T = 1
        cache.begin(T)
        c_kv, k_pe, _ = cache.update(2, torch.ones(len(rows), T, 24), torch.ones(len(rows), T, 8), None)
        joined = _join_latent(c_kv, k_pe)
        assert torch.equal(joined, torch.cat([c_kv, k_pe], -1)) and joined.data_ptr() == c_kv.data_ptr()
        cache.advance(T)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 2)  # unrelated tensors are concatenated
    assert torch.equal(_join_latent(a, b), torch.cat([a, b], -1))
