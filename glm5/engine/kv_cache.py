"""Paged MLA latent cache: fixed-size blocks of [c_kv; k_pe] and indexer keys per layer, prefix caching, accounting.

Storage is one flat tensor of slots per layer (`num_blocks * block_size` rows): `kv_lora_rank +
qk_rope_head_dim` values per token (the 576-wide latent of GLM-5) and, on layers with their own indexer,
`index_head_dim` indexer-key values. A sequence owns a block table (block ids in position order); blocks are
reference counted, so sequences share them (n > 1 completions, identical prompt prefixes).

Prefix caching: when a block fills up it is registered under a hash of its tokens chained with the previous
block's hash (plus a per-cache seed token, see `hash_seed`), so a later prompt with the same prefix reuses the
block -- latent and indexer keys alike -- instead of recomputing it. Freed registered blocks stay cached
(least recently used evicted first) until the space is needed. A block is copied before a write whenever
others share it or it is registered (copy-on-write), so cached content never changes under a reader.

Accounting and storage are separable, so the engine's scheduler can own the first and its model runner the
second (they may live in different processes): `BlockManager` is the accounting alone (pool, block tables,
prefix hashes; no tensors); `PagedLatentCache` adds the storage and runs stand-alone (it allocates as it
writes); `RunnerLatentCache` is the storage of a runner whose block tables come from a `BlockManager` elsewhere
(`take_table_update` / `take_copies` there, `set_block_table` / `copy_blocks` here).

`PagedLatentCache` implements the model's `LatentCache` protocol for a batch of sequences set by `prepare`.
`update` scatters the new entries into their slots and gathers each row's blocks into the padded
[B, S_max, ...] tensors the model attends over. That gather costs one copy of the batch's whole context per
layer and step (B * S_max * (r + R + Di) values), fine on CPU but the first thing a fused paged-attention
kernel would remove; a single sequence whose blocks are consecutive (the allocator prefers that) gets views of
the storage instead, with no copy at all.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from glm5.config import GLM5Config
from glm5.model.cache import Positions

NULL_BLOCK = 0
"""Block 0 is never allocated and always zero: padded rows of a ragged batch read it."""


class BlockPool:
    """Block ids with reference counts, free lists, and the hash table of cached (registered) blocks.

    Never-used blocks are a counter (`fresh`), so a pool of millions of blocks costs nothing until used; released
    blocks go to a min-heap and are reused first (low ids first, which keeps a sequence's blocks consecutive).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"a paged cache needs at least 2 blocks (one is the null block), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.fresh = 1
        """Blocks >= fresh were never handed out (block 0 is the null block)."""
        self._released: set[int] = set()
        self._heap: list[int] = []  # may hold stale ids of blocks taken via `prefer`
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; LRU first
        self.hash_of: dict[int, int] = {}
        self.tokens_of: dict[int, tuple[int, ...]] = {}
        self._by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks available to allocate (free plus evictable cached ones)."""
        return self.num_blocks - self.fresh + len(self._released) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered blocks nobody references: kept for prefix hits until evicted."""
        return len(self._evictable)

    def allocate(self, prefer: int | None = None) -> tuple[int, bool]:
        """-> (a block with refcount 1, whether it is fresh). `prefer` (the block after a sequence's last one)
        is taken when it is free, so sequences tend to own consecutive blocks."""
        fresh = False
        if prefer is not None and prefer in self._released:
            self._released.discard(prefer)
            block = prefer
        elif prefer is not None and prefer == self.fresh and prefer < self.num_blocks:
            block, fresh, self.fresh = prefer, True, self.fresh + 1
        elif self._released:
            while (block := heapq.heappop(self._heap)) not in self._released:
                pass
            self._released.discard(block)
        elif self.fresh < self.num_blocks:
            block, fresh, self.fresh = self.fresh, True, self.fresh + 1
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self.unregister(block)
            self._released.discard(block)
        else:
            raise RuntimeError("paged KV cache is out of blocks")  # callers check num_free first
        self.refcount[block] = 1
        return block, fresh

    def incref(self, block: int) -> None:
        if self.refcount[block] == 0:
            self._evictable.pop(block, None)
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        assert self.refcount[block] > 0, f"block {block} freed twice"
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self.hash_of:
                self._evictable[block] = None
            else:
                self._release(block)

    def _release(self, block: int) -> None:
        self._released.add(block)
        heapq.heappush(self._heap, block)

    def register(self, block: int, h: int, tokens: tuple[int, ...]) -> bool:
        """Make `block` findable under hash `h`; False if another block already holds that content."""
        if h in self._by_hash or block in self.hash_of:
            return False
        self._by_hash[h] = block
        self.hash_of[block] = h
        self.tokens_of[block] = tokens
        return True

    def unregister(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self._by_hash[h]
            del self.tokens_of[block]
            if block in self._evictable:
                del self._evictable[block]
                self._release(block)

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        block = self._by_hash.get(h)
        return block if block is not None and self.tokens_of[block] == tokens else None

    def clear_cached(self) -> None:
        """Forget every registered block (their content is stale, e.g. after a weight update)."""
        for block in list(self._by_hash.values()):
            self.unregister(block)


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    """Entries written (positions 0 .. length-1)."""
    tokens: list[int] = field(default_factory=list)
    """The id fed at each written position (what block hashes are computed from)."""
    hashes: list[int] = field(default_factory=list)
    """Chained hash of each full block so far."""
    registered: int = 0
    """Full blocks whose hash has been computed (and registered when possible)."""
    seed: int = 0
    contiguous: bool = True
    """blocks[i] == blocks[0] + i for all i (enables the zero-copy path)."""
    cacheable: bool = True
    """False once the weights changed under it: its later blocks mix old and new weights, never registered."""
    unsent: int | None = 0
    """Blocks from this index on changed since `take_table_update` last sent the table (None: nothing did)."""

    def changed(self, index: int) -> None:
        self.unsent = index if self.unsent is None else min(self.unsent, index)


def _chain(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    """Block accounting of a paged cache (see the module docstring): who holds which blocks, how many are free,
    which are cached under a prefix hash. No tensors: the engine's scheduler keeps one per cache and tells the
    runner, which holds the data, what changed (`take_table_update`, `take_copies`).

    A write of positions [length, new_length) is `reserve(seq, new_length)` (blocks, and a private copy of a
    shared block about to be written) then, once written, `commit(seq, tokens)` (length, prefix hashes).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        *,
        enable_prefix_caching: bool = True,
        bytes_per_block: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.seqs: dict[int, _Seq] = {}
        self._bytes_per_block = bytes_per_block
        self._copies: list[tuple[int, int]] = []

    # --- accounting ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self._bytes_per_block

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - 1 - self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    def usage(self) -> dict[str, int | float]:
        return {
            "num_blocks": self.num_blocks - 1,
            "used_blocks": self.num_used_blocks,
            "free_blocks": self.num_free_blocks,
            "cached_blocks": self.num_cached_blocks,
            "block_size": self.block_size,
            "bytes_per_block": self.bytes_per_block,
            "used_bytes": self.num_used_blocks * self.bytes_per_block,
            "total_bytes": (self.num_blocks - 1) * self.bytes_per_block,
        }

    def blocks_needed(self, seq_id: int | None, new_length: int) -> int:
        """Blocks a sequence must allocate to hold `new_length` positions (a new sequence when seq_id is None),
        counting the copy of a shared partly-filled last block (after an n > 1 fork or a prefix hit) that its
        first write makes."""
        if seq_id is None:
            return -(-new_length // self.block_size)
        seq = self.seqs[seq_id]
        need = max(0, -(-new_length // self.block_size) - len(seq.blocks))
        partial = seq.length // self.block_size
        if (
            new_length > seq.length
            and seq.length % self.block_size
            and partial < len(seq.blocks)
            and self.pool.refcount[seq.blocks[partial]] > 1
        ):
            need += 1
        return need

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether `num_blocks` more blocks are available (free or evictable)."""
        return num_blocks <= self.pool.num_free

    def num_unreferenced(self, blocks: Sequence[int]) -> int:
        """How many of these (prefix-matched) blocks nobody references: attaching them takes them off the free
        pool, so an admission must count them as allocations."""
        return sum(self.pool.refcount[b] == 0 for b in blocks)

    # --- sequences -------------------------------------------------------------------------------
    def add_sequence(self, seq_id: int, hash_seed: int = 0) -> None:
        """Start an empty sequence. hash_seed enters every block hash: the MTP cache passes the first token,
        because its entry at position p depends on the tokens 0 .. p + 1 while it is fed tokens 1 .. p + 1."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already exists in the cache")
        self.seqs[seq_id] = _Seq(seed=hash_seed)

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].blocks)

    def match_prefix(
        self, tokens: Sequence[int], hash_seed: int = 0, max_blocks: int | None = None
    ) -> list[int]:
        """Cached blocks holding the longest prefix of `tokens` made of full blocks (not referenced yet)."""
        if not self.enable_prefix_caching:
            return []
        bs, out, h = self.block_size, [], hash_seed
        limit = len(tokens) // bs if max_blocks is None else min(max_blocks, len(tokens) // bs)
        for i in range(limit):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = _chain(h, chunk)
            block = self.pool.lookup(h, chunk)
            if block is None:
                break
            out.append(block)
        return out

    def attach_prefix(self, seq_id: int, tokens: Sequence[int], blocks: list[int]) -> int:
        """Give an empty sequence the cached `blocks` (from `match_prefix`) for the first tokens; returns the
        number of positions it now holds."""
        seq = self.seqs[seq_id]
        assert seq.length == 0 and not seq.blocks
        for block in blocks:
            self.pool.incref(block)
            seq.hashes.append(self.pool.hash_of[block])
        seq.blocks = list(blocks)
        seq.length = len(blocks) * self.block_size
        seq.registered = len(blocks)  # counts blocks, not positions
        seq.tokens = list(tokens[: seq.length])
        seq.contiguous = all(b == blocks[0] + i for i, b in enumerate(blocks))
        seq.changed(0)
        return seq.length

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write on the first divergent write)."""
        parent = self.seqs[parent_id]
        for block in parent.blocks:
            self.pool.incref(block)
        self.seqs[child_id] = _Seq(
            list(parent.blocks),
            parent.length,
            list(parent.tokens),
            list(parent.hashes),
            parent.registered,
            parent.seed,
            parent.contiguous,
            parent.cacheable,
            parent.unsent,  # a runner forks its copy of the parent's table too
        )

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll a sequence back to its first `length` positions (rejected speculative tokens, padding)."""
        seq = self.seqs[seq_id]
        if length >= seq.length:
            return
        seq.length = length
        del seq.tokens[length:]
        full = length // self.block_size
        del seq.hashes[full:]
        seq.registered = min(seq.registered, full)
        self._drop_blocks(seq, -(-length // self.block_size))

    def release_unused(self, seq_id: int) -> None:
        """Give back blocks reserved past the sequence's length (e.g. for draft entries rolled back)."""
        seq = self.seqs[seq_id]
        self._drop_blocks(seq, -(-seq.length // self.block_size))

    def _drop_blocks(self, seq: _Seq, keep: int) -> None:
        if keep >= len(seq.blocks):
            return
        for block in seq.blocks[keep:]:
            self.pool.decref(block)
        del seq.blocks[keep:]
        seq.changed(keep)
        if not seq.contiguous:
            seq.contiguous = all(b == seq.blocks[0] + i for i, b in enumerate(seq.blocks))

    def free(self, seq_id: int) -> None:
        """Release a finished or aborted sequence: its blocks go back to the pool (registered ones stay cached)."""
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            for block in seq.blocks:
                self.pool.decref(block)

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry (after a weight update the cached latents are stale)."""
        self.pool.clear_cached()
        for seq in self.seqs.values():
            seq.cacheable = False

    # --- writes ----------------------------------------------------------------------------------
    def reserve(self, seq_id: int, new_length: int) -> None:
        """Blocks for positions up to new_length, and a private copy of the block receiving the next write (a
        block others share is copied first; one registered for prefix hits is unregistered)."""
        seq = self.seqs[seq_id]
        needed = -(-new_length // self.block_size) - len(seq.blocks)
        if needed > 0 and needed > self.pool.num_free:
            raise RuntimeError(f"paged KV cache needs {needed} more blocks, {self.pool.num_free} free")
        self._reserve(seq, new_length)

    def commit(self, seq_id: int, tokens: Sequence[int], register: bool = True) -> None:
        """Positions [length, length + len(tokens)) now hold the entries of `tokens`: the sequence grows, and
        (register=True) its newly full blocks become prefix-cache entries."""
        self._commit(self.seqs[seq_id], tokens, register)

    def take_table_update(self, seq_id: int) -> tuple[int, list[int]] | None:
        """What changed in the sequence's block table since the last call, as (start, block ids from start on):
        a holder of the old table replaces its entries from `start` with these. None when nothing changed."""
        seq = self.seqs[seq_id]
        if seq.unsent is None:
            return None
        start, seq.unsent = seq.unsent, None
        return start, seq.blocks[start:]

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write decisions since the last call: (source block, destination block), in order. The holder
        of the data applies them before writing anything of the step that reserved them."""
        copies, self._copies = self._copies, []
        return copies

    def _on_fresh(self, block: int) -> None:
        """A never-used block was handed out (the storage zeroes it)."""

    def _on_copy(self, src: int, dst: int) -> None:
        """Copy-on-write: dst must become a copy of src (the storage copies; the accounting alone records it)."""
        self._copies.append((src, dst))

    def _new_block(self, seq: _Seq) -> int:
        prefer = seq.blocks[-1] + 1 if seq.blocks else None
        block, fresh = self.pool.allocate(prefer)
        if fresh:
            self._on_fresh(block)  # uninitialised memory may hold NaNs; padded rows read past their end
        return block

    def _reserve(self, seq: _Seq, new_length: int) -> None:
        bs = self.block_size
        partial = seq.length // bs
        if seq.length % bs and partial < len(seq.blocks):
            block = seq.blocks[partial]
            if self.pool.refcount[block] > 1:  # shared (fork / prefix): copy before writing
                copy = self._new_block(seq)
                self._on_copy(block, copy)
                self.pool.decref(block)
                seq.blocks[partial] = copy
                seq.changed(partial)
                seq.contiguous = all(b == seq.blocks[0] + i for i, b in enumerate(seq.blocks))
            elif block in self.pool.hash_of:  # registered content is about to change
                self.pool.unregister(block)
        while len(seq.blocks) * bs < new_length:
            block = self._new_block(seq)
            seq.contiguous = seq.contiguous and (not seq.blocks or block == seq.blocks[-1] + 1)
            seq.changed(len(seq.blocks))
            seq.blocks.append(block)

    def _commit(self, seq: _Seq, tokens: Sequence[int], register: bool) -> None:
        seq.length += len(tokens)
        seq.tokens.extend(tokens)
        if register and seq.cacheable and self.enable_prefix_caching:
            self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: _Seq) -> None:
        bs = self.block_size
        while seq.registered < seq.length // bs:
            i = seq.registered
            chunk = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = _chain(seq.hashes[i - 1] if i else seq.seed, chunk)
            if len(seq.hashes) == i:
                seq.hashes.append(h)
            else:
                seq.hashes[i] = h
            self.pool.register(seq.blocks[i], h, chunk)
            seq.registered += 1


class PagedLatentCache(BlockManager):
    """A paged latent + indexer-key cache over a set of layers, shared by many sequences (see module docstring):
    the accounting of `BlockManager` plus the storage, allocating as `prepare` asks for room.

    layers: the checkpoint layer indices stored here (default: the main model's layers; speculative decoding
    keeps the MTP layer, index num_hidden_layers, in a cache of its own).
    """

    def __init__(
        self,
        cfg: GLM5Config,
        num_blocks: int,
        block_size: int = 16,
        *,
        layers: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.cfg = cfg
        self.layers = list(range(cfg.num_hidden_layers) if layers is None else layers)
        self._local = {layer: i for i, layer in enumerate(self.layers)}
        has_indexer = cfg.indexer_types + ["full"] * cfg.num_nextn_predict_layers
        self.kv_width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.rank = cfg.kv_lora_rank
        slots = num_blocks * block_size
        self.kv = [torch.empty(slots, self.kv_width, dtype=dtype, device=device) for _ in self.layers]
        self.index_k = [
            torch.empty(slots, cfg.index_head_dim, dtype=dtype, device=device)
            if has_indexer[layer] == "full"
            else None
            for layer in self.layers
        ]
        self.device = self.kv[0].device if self.kv else torch.device(device or "cpu")
        self.dtype = dtype
        self._zero_block(NULL_BLOCK)
        self._batch: _Batch | None = None

    @property
    def bytes_per_block(self) -> int:
        per_token = sum(self.kv_width + (0 if k is None else k.shape[1]) for k in self.index_k)
        return per_token * self.block_size * torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def block_bytes(cfg: GLM5Config, block_size: int, layers: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes one block takes for these layers (for sizing a cache before building it)."""
        has_indexer = cfg.indexer_types + ["full"] * cfg.num_nextn_predict_layers
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        per_token = sum(width + (cfg.index_head_dim if has_indexer[i] == "full" else 0) for i in layers)
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    # --- storage ---------------------------------------------------------------------------------
    def _on_fresh(self, block: int) -> None:
        self._zero_block(block)

    def _on_copy(self, src: int, dst: int) -> None:
        self._copy_block(src, dst)

    def _zero_block(self, block: int) -> None:
        lo, hi = block * self.block_size, (block + 1) * self.block_size
        for kv, idx in zip(self.kv, self.index_k):
            kv[lo:hi].zero_()
            if idx is not None:
                idx[lo:hi].zero_()

    def _copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        for kv, idx in zip(self.kv, self.index_k):
            kv[dst * bs : (dst + 1) * bs] = kv[src * bs : (src + 1) * bs]
            if idx is not None:
                idx[dst * bs : (dst + 1) * bs] = idx[src * bs : (src + 1) * bs]

    # --- the LatentCache protocol ----------------------------------------------------------------
    def prepare(
        self, seq_ids: Sequence[int], new_tokens: Sequence[Sequence[int]], register: bool = True
    ) -> None:
        """Set the batch of the next forward: row b is sequence seq_ids[b], fed new_tokens[b] (rows may differ in
        length; the forward's T is the longest, shorter rows are right-padded). register=False keeps these
        entries out of the prefix cache (speculative drafts computed from approximate hidden states); they must
        be truncated away before the sequence is written with register=True again."""
        if len(seq_ids) != len(new_tokens) or not seq_ids:
            raise ValueError("prepare needs one non-empty token list per sequence")
        needed = sum(self.blocks_needed(s, self.seqs[s].length + len(t)) for s, t in zip(seq_ids, new_tokens))
        if needed > self.pool.num_free:
            raise RuntimeError(f"paged KV cache needs {needed} more blocks, {self.pool.num_free} free")
        for s, toks in zip(seq_ids, new_tokens):
            seq = self.seqs[s]
            self._reserve(seq, seq.length + len(toks))
        self._batch = _Batch.build(self, list(seq_ids), [len(t) for t in new_tokens], register)
        self._batch_tokens = [list(t) for t in new_tokens]

    def begin(self, num_new_tokens: int) -> tuple[Positions, int]:
        batch = self._require_batch(num_new_tokens)
        return batch.positions, batch.end

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        kv_all, idx_all = self.update_latent(layer_idx, torch.cat([c_kv, k_pe], dim=-1), index_k)
        return kv_all[..., : self.rank], kv_all[..., self.rank :], idx_all

    def update_latent(
        self, layer_idx: int, latent: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`update` with the latent already joined: latent [B, T, r+R] -> (every row's [c_kv; k_pe] [B, S, r+R],
        indexer keys [B, S, Di] or None). The fused decode step (glm5.engine.fused) writes through this."""
        b = self._batch
        assert b is not None, "call prepare() before the forward"
        local = self._local[layer_idx]
        B, T, _ = latent.shape
        kv_all = b.write_and_gather(self.kv[local], latent.reshape(B * T, self.kv_width).to(self.dtype))
        idx_store = self.index_k[local]
        idx_all = None
        if idx_store is not None and index_k is not None:
            idx_all = b.write_and_gather(idx_store, index_k.reshape(B * T, -1).to(self.dtype))
        return kv_all, idx_all

    def decode_tables(self, num_new_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a prepared batch of T new tokens per row, one kernel row per new token (row-major): (slot of its
        entry [B*T], slots of its sequence's key positions [B*T, S] (rows past their length point at the null
        block), keys it sees, itself included [B*T]), all int64. What a fused kernel needs to write and read the
        cache itself (glm5/kernels/decode_layer.c)."""
        T = num_new_tokens
        b = self._require_batch(T)
        B = len(b.seq_ids)
        if b.src_rows is not None:
            raise ValueError("decode_tables needs the same number of new tokens in every row")
        if b.write_slots is None:  # one sequence whose slots are one run
            write = torch.arange(b.write_start, b.write_start + T, device=self.device)
            gather = torch.arange(b.gather_start, b.gather_start + b.end, device=self.device)[None]
        else:
            write, gather = b.write_slots, b.gather_slots
        if T > 1:
            gather = gather.repeat_interleave(T, dim=0) if gather.shape[0] > 1 else gather.expand(B * T, -1)
        lengths = (b.positions.q_pos + 1).expand(B, T).reshape(B * T)
        return write, gather.contiguous(), lengths.contiguous()

    def stores(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flat storage of a layer: latents [slots, r+R] and indexer keys [slots, Di] (None: shared layer)."""
        local = self._local[layer_idx]
        return self.kv[local], self.index_k[local]

    def advance(self, num_tokens: int) -> None:
        b = self._batch
        assert b is not None and num_tokens == b.T
        for s, toks in zip(b.seq_ids, self._batch_tokens):
            self._commit(self.seqs[s], toks, b.register)
        self._batch = None

    def _require_batch(self, T: int) -> _Batch:
        b = self._batch
        if b is None:
            raise RuntimeError("PagedLatentCache.prepare(seq_ids, new_tokens) must precede the forward")
        if T != b.T:
            raise ValueError(f"forward of {T} tokens per row, but prepare() set {b.T}")
        return b


class RunnerLatentCache(PagedLatentCache):
    """The storage of a model runner whose block accounting lives in a `BlockManager` elsewhere (the engine's
    scheduler, possibly in another process): tables arrive as `set_block_table` updates, copy-on-write as
    `copy_blocks`; it never allocates, frees or hashes a block itself. Forwards, `truncate` (rollback of
    speculative entries) and `fork` change only its own view of lengths and tables, mirroring what the
    scheduler's manager does to its tables once it learns the step's outcome. A block is zeroed the first time
    a table holds it (what the manager's fresh allocation would zero)."""

    def __init__(self, cfg: GLM5Config, num_blocks: int, block_size: int = 16, **kwargs: object) -> None:
        super().__init__(cfg, num_blocks, block_size, enable_prefix_caching=False, **kwargs)
        self._zeroed = bytearray(num_blocks)
        self._zeroed[NULL_BLOCK] = 1

    def set_block_table(self, seq_id: int, start: int, blocks: Sequence[int]) -> None:
        """Replace the sequence's table from index `start` on (a `BlockManager.take_table_update`); a sequence
        not seen yet starts empty."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            seq = self.seqs[seq_id] = _Seq()
        appended = start == len(seq.blocks)
        seq.blocks[start:] = blocks
        for b in blocks:
            if not self._zeroed[b]:
                self._zeroed[b] = 1
                self._zero_block(b)
        if appended and seq.contiguous:
            first = seq.blocks[0] if seq.blocks else 0
            seq.contiguous = all(seq.blocks[i] == first + i for i in range(start, len(seq.blocks)))
        else:
            seq.contiguous = all(b == seq.blocks[0] + i for i, b in enumerate(seq.blocks))

    def set_length(self, seq_id: int, length: int) -> None:
        """Positions the sequence holds (a prefill chunk's start: prefix-cache hits make it > 0 at admission)."""
        self.seqs[seq_id].length = length

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        for src, dst in copies:
            self._copy_block(src, dst)

    def fork(self, parent_id: int, child_id: int) -> None:
        parent = self.seqs[parent_id]
        self.seqs[child_id] = _Seq(list(parent.blocks), parent.length, contiguous=parent.contiguous)

    def truncate(self, seq_id: int, length: int) -> None:
        seq = self.seqs[seq_id]
        if length >= seq.length:
            return
        seq.length = length
        del seq.blocks[-(-length // self.block_size) :]

    def free(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    def prepare(
        self, seq_ids: Sequence[int], new_tokens: Sequence[Sequence[int]], register: bool = True
    ) -> None:
        """`PagedLatentCache.prepare` without allocation: the scheduler reserved every position written."""
        if len(seq_ids) != len(new_tokens) or not seq_ids:
            raise ValueError("prepare needs one non-empty token list per sequence")
        for s, toks in zip(seq_ids, new_tokens):
            seq = self.seqs[s]
            self._reserve(seq, seq.length + len(toks))
        self._batch = _Batch.build(self, list(seq_ids), [len(t) for t in new_tokens], register)
        self._batch_tokens = [list(t) for t in new_tokens]

    def _reserve(self, seq: _Seq, new_length: int) -> None:
        if len(seq.blocks) * self.block_size < new_length:
            raise RuntimeError(
                f"the scheduler reserved {len(seq.blocks)} blocks, but {new_length} positions are written"
            )

    def _commit(self, seq: _Seq, tokens: Sequence[int], register: bool) -> None:
        seq.length += len(tokens)


@dataclass
class _Batch:
    """Index tensors of one forward, built once and used by every layer."""

    seq_ids: list[int]
    T: int
    positions: Positions
    end: int
    register: bool
    write_slots: torch.Tensor | None
    """[N] slots of the valid new tokens (None: one contiguous run starting at write_start)."""
    write_start: int
    src_rows: torch.Tensor | None
    """[N] rows of the flattened [B*T] new entries that are real (None: all are)."""
    gather_slots: torch.Tensor | None
    """[B, S] slots of every key position (None: one contiguous run starting at gather_start)."""
    gather_start: int

    @classmethod
    def build(cls, cache: PagedLatentCache, seq_ids: list[int], counts: list[int], register: bool) -> _Batch:
        bs, dev = cache.block_size, cache.device
        seqs = [cache.seqs[s] for s in seq_ids]
        starts = [s.length for s in seqs]
        T = max(counts)
        B = len(seqs)
        end = max(st + T for st in starts)
        same = all(st == starts[0] for st in starts)
        q_pos = torch.arange(T, device=dev)[None] + (
            starts[0] if same else torch.tensor(starts, device=dev)[:, None]
        )
        positions = Positions(q_pos, starts[0] if same else None)
        if B == 1 and seqs[0].contiguous:  # zero-copy path: the sequence's slots are one run
            first = seqs[0].blocks[0] * bs
            return cls(seq_ids, T, positions, end, register, None, first + starts[0], None, None, first)
        writes: list[int] = []
        for seq, st, n in zip(seqs, starts, counts):
            blocks = seq.blocks
            writes.extend(blocks[p // bs] * bs + p % bs for p in range(st, st + n))
        src = None
        if any(n != T for n in counts):
            src = torch.tensor([b * T + t for b, n in enumerate(counts) for t in range(n)], device=dev)
        width = -(-end // bs)
        table = torch.zeros(B, width, dtype=torch.long)
        for b, seq in enumerate(seqs):
            n = min(len(seq.blocks), width)
            table[b, :n] = torch.tensor(seq.blocks[:n])
        slots = (table[:, :, None] * bs + torch.arange(bs)).view(B, width * bs)[:, :end].to(dev)
        return cls(seq_ids, T, positions, end, register, torch.tensor(writes, device=dev), 0, src, slots, 0)

    def write_and_gather(self, store: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write the batch's new rows into `store` [slots, W] and return every row's keys [B, S, W]."""
        if self.src_rows is not None:
            new = new.index_select(0, self.src_rows)
        if self.write_slots is None:
            store[self.write_start : self.write_start + new.shape[0]] = new
            return store[self.gather_start : self.gather_start + self.end].unsqueeze(0)
        store.index_copy_(0, self.write_slots, new)
        B, S = self.gather_slots.shape
        return store.index_select(0, self.gather_slots.reshape(-1)).view(B, S, store.shape[1])
