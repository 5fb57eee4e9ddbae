"""MLA attention with DeepSeek Sparse Attention: the lightning indexer, top-k selection and three attention paths.

Paths (docs/model.md § Attention paths):
- expanded dense: per-head K/V from the latent, causal SDPA. Used when every key is selected (S <= index_topk,
  where DSA is exactly dense attention) or when DSA is switched off (the indexer warm-up stage).
- absorbed sparse (the default above index_topk): W_UK is folded into the query, so every head attends over
  the same 576-wide latent [c_kv; k_pe]; only the top-k latent entries of each query are gathered, so time
  and memory grow with T*k instead of T^2. Decode uses the absorbed form too (dense or sparse).
- dense mask ("mask"): the reference, as HF computes it: a T x S score matrix with causal and top-k masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm5.config import GLM5Config
from glm5.model.cache import LatentCache, Positions
from glm5.model.layers import RMSNorm, apply_rope

ATTENTION_IMPLS = ("sparse", "mask")
DENSE_SCORES_MAX_RATIO = 4
"""Up to this many keys per selected key (S <= ratio x index_topk), the training-time indexer loss scores every
key with one GEMM and takes the selected columns, instead of gathering each query's selected keys (a copy of
T x K latent rows and, for the indexer's keys, an index_add in backward); the same products (measured on CPU:
6x faster for the attention side, 2x for the indexer side at S = 256, K = 64). 0 forces the gathers."""


@dataclass
class AttentionOptions:
    """Run-time choices that do not change the model's parameters."""

    impl: str = "sparse"
    """"sparse": gather the top-k latents (fast path); "mask": dense scores + top-k mask (the reference)."""
    dsa: bool = True
    """False: plain causal attention over every key (DSA dense warm-up); the indexer still runs for its loss."""
    query_chunk: int | None = None
    """Queries per chunk for the indexer and sparse attention; None picks one that bounds memory."""
    absorb_max_tokens: int = 64
    """With a cache, forwards of at most this many new tokens use the absorbed (latent) form."""

    def __post_init__(self) -> None:
        if self.impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {self.impl!r} is unknown; choose one of {ATTENTION_IMPLS}")


def _chunk_len(total: int, per_query: int, requested: int | None, budget: int = 1 << 24) -> int:
    """Queries per chunk so that a chunk's largest temporary holds about `budget` elements."""
    if requested is not None:
        return max(1, min(requested, total))
    return max(16, min(total, budget // max(per_query, 1)))


class Indexer(nn.Module):
    """The DSA lightning indexer: I(t,s) = sum_j w_tj * ReLU(q_tj . k_s / sqrt(d)), with w_t = W_w x_t / sqrt(H)."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.interleave = cfg.indexer_rope_interleave
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(cfg.index_head_dim, eps=cfg.indexer_norm_eps)
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)
        self.scale = cfg.index_head_dim**-0.5

    def project(
        self, x: torch.Tensor, c_q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q [B,T,Hi,Di], k [B,T,Di], head weights [B,T,Hi] (fp32). RoPE sits on the FIRST rope_dim dims."""
        B, T, _ = x.shape
        q = self.wq_b(c_q).view(B, T, self.num_heads, self.head_dim)
        q = torch.cat(
            [
                apply_rope(q[..., : self.rope_dim], cos[:, :, None], sin[:, :, None], self.interleave),
                q[..., self.rope_dim :],
            ],
            dim=-1,
        )
        k = self.k_norm(self.wk(x))
        k = torch.cat(
            [apply_rope(k[..., : self.rope_dim], cos, sin, self.interleave), k[..., self.rope_dim :]], dim=-1
        )
        # weights_proj is kept in fp32 by the reference; the product is the same for bf16-representable weights.
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.num_heads**-0.5
        return q, k, w

    def scores(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q [B,C,Hi,Di], k [B,S,Di], w [B,C,Hi] -> index scores [B,C,S] in fp32 (same op order as HF)."""
        s = _scores_vs_shared_keys(q.float(), k.float()) * self.scale  # [B,C,Hi,S]
        return torch.matmul(w.unsqueeze(-2), F.relu(s)).squeeze(-2)

    def scores_at(self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Scores at chosen keys only: idx [B,C,K] -> [B,C,K] fp32 (O(C*K) work)."""
        k_sel = _gather_rows(k.float(), idx)  # [B,C,K,Di] (cast S rows, not C*K: the same values)
        s = torch.matmul(q.float(), k_sel.transpose(-1, -2)) * self.scale  # [B,C,Hi,K]
        return torch.matmul(w.unsqueeze(-2), F.relu(s)).squeeze(-2)

    @torch.no_grad()
    def select(
        self, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, pos: Positions, chunk: int | None
    ) -> torch.Tensor:
        """Causal top-k keys per query: [B,T,K] with K = min(index_topk, S). Rows with fewer than K visible keys
        also return some future keys; attention masks them again (docs/model.md § Top-k selection). Exactly equal scores
        (in practice only toy configs with a few indexer heads, where every ReLU can be 0) are broken
        arbitrarily, as torch.topk and the reference do.

        Same arithmetic as `scores`, arranged for speed: the 1/sqrt(d) scale is folded into the head weights
        (ReLU is positively homogeneous), all heads of a chunk are one GEMM, ReLU runs in place, the head sum
        is a batched GEMV, and the two large temporaries are allocated once per call.
        """
        B, T, H, D = q.shape
        S = k.shape[1]
        K = min(self.topk, S)
        step = _chunk_len(T, H * S, chunk, budget=1 << 22)
        q32, k32 = q.float(), k.float().transpose(1, 2)  # [B,T,H,D], [B,D,S]
        w32 = w.float() * self.scale
        out = torch.empty(B, T, K, dtype=torch.long, device=q.device)
        head_buf = torch.empty(B * step * H * S, dtype=torch.float32, device=q.device)
        score_buf = torch.empty(B * step * S, dtype=torch.float32, device=q.device)
        for s0 in range(0, T, step):
            s1 = min(s0 + step, T)
            C = s1 - s0
            # keys past the chunk's last query are never visible (known on the host when rows share positions)
            k_end = S if pos.start is None else min(S, max(pos.start + s1, K))
            per_head = head_buf[: B * C * H * k_end].view(B, C * H, k_end)
            torch.bmm(q32[:, s0:s1].reshape(B, C * H, D), k32[:, :, :k_end], out=per_head).relu_()
            scores = score_buf[: B * C * k_end].view(B * C, 1, k_end)
            torch.bmm(w32[:, s0:s1].reshape(B * C, 1, H), per_head.view(B * C, H, k_end), out=scores)
            scores = scores.view(B, C, k_end)
            # earlier keys: visible to the whole chunk
            first_hidden = 0 if pos.start is None else pos.start + s0
            # with shared positions, key first_hidden is visible to every query too: a decode step (one query
            # at the end of its context) has nothing to mask
            if first_hidden + (pos.start is not None) < k_end:
                keys = torch.arange(first_hidden, k_end, device=q.device)
                hidden = keys.view(1, 1, -1) > pos.q_pos[:, s0:s1, None]  # [P, C, keys]
                scores[:, :, first_hidden:].masked_fill_(hidden, float("-inf"))
            out[:, s0:s1] = scores.topk(K, dim=-1).indices
        return out


def _scores_vs_shared_keys(q_BCHD: torch.Tensor, k_BSD: torch.Tensor) -> torch.Tensor:
    """q [B,C,H,D] . k [B,S,D] for every (query, head, key) -> [B,C,H,S], as one bmm. A broadcast matmul against
    k.unsqueeze(1) would first copy the keys once per query (measured: ~20% of a dense-stage training step)."""
    B, C, H, D = q_BCHD.shape
    return torch.bmm(q_BCHD.reshape(B, C * H, D), k_BSD.transpose(1, 2)).view(B, C, H, -1)


def _gather_rows(x_BSC: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """x [B,S,C], idx [B,T,K] -> x[b, idx[b,t,k]] as [B,T,K,C] (index_select: its backward is an index_add)."""
    B, S, C = x_BSC.shape
    if B == 1:  # decode of one sequence: no per-row offsets
        return x_BSC[0].index_select(0, idx_BTK.reshape(-1)).view(*idx_BTK.shape, C)
    flat = idx_BTK + (torch.arange(B, device=idx_BTK.device) * S).view(B, 1, 1)
    return x_BSC.reshape(B * S, C).index_select(0, flat.reshape(-1)).view(*idx_BTK.shape, C)


def sparse_latent_attention(
    q_lat: torch.Tensor,
    kv_lat: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    rank: int,
    scale: float,
    chunk: int | None = None,
) -> torch.Tensor:
    """Absorbed-MLA attention over each query's selected keys.

    q_lat [B,T,H,r+R] (= [q_nope W_UK ; q_pe]), kv_lat [B,S,r+R] (= [c_kv ; k_pe]), topk_idx [B,T,K],
    q_pos [P,T] positions of the queries (P = 1 or B). Returns the latent outputs [B,T,H,r] (values = c_kv).
    """
    B, T, H, Dc = q_lat.shape
    K = topk_idx.shape[-1]
    step = _chunk_len(T, K * (Dc + H), chunk, budget=1 << 21)  # small chunks stay in cache (measured)
    use_ckpt = torch.is_grad_enabled() and (q_lat.requires_grad or kv_lat.requires_grad) and step < T

    def one_chunk(
        q_c: torch.Tensor, idx_c: torch.Tensor, pos_c: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        lat = _gather_rows(kv, idx_c)  # [B,C,K,Dc]
        scores = torch.matmul(q_c, lat.transpose(-1, -2)) * scale  # [B,C,H,K]
        hidden = (idx_c > pos_c[..., None]).unsqueeze(2)  # [B,C,1,K]
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_c.dtype)
        return torch.matmul(probs, lat[..., :rank])  # [B,C,H,r]

    outs = []
    for s0 in range(0, T, step):
        args = (q_lat[:, s0 : s0 + step], topk_idx[:, s0 : s0 + step], q_pos[:, s0 : s0 + step], kv_lat)
        outs.append(checkpoint(one_chunk, *args, use_reentrant=False) if use_ckpt else one_chunk(*args))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def dense_latent_attention(
    q_lat: torch.Tensor, kv_lat: torch.Tensor, q_pos: torch.Tensor, rank: int, scale: float
) -> torch.Tensor:
    """Absorbed-MLA attention over every visible key (decode with S <= index_topk, or DSA off). -> [B,T,H,r]."""
    scores = torch.matmul(q_lat.transpose(1, 2), kv_lat.unsqueeze(1).transpose(-1, -2)) * scale  # [B,H,T,S]
    future = torch.arange(kv_lat.shape[1], device=q_lat.device).view(1, 1, -1) > q_pos[..., None]  # [P,T,S]
    scores = scores.masked_fill(future[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)
    return torch.matmul(probs, kv_lat[..., :rank].unsqueeze(1)).transpose(1, 2)


def _per_head_matmul(x_BTHI: torch.Tensor, w_HIO: torch.Tensor) -> torch.Tensor:
    """x [B,T,H,I] @ w [H,I,O] per head -> [B,T,H,O]: einsum("bthi,hio->btho") as one bmm, which on CPU
    costs less than half of einsum's dispatch at decode sizes (same products and sums)."""
    B, T, H, I = x_BTHI.shape
    out = torch.bmm(x_BTHI.reshape(B * T, H, I).transpose(0, 1), w_HIO)  # [H, B*T, O]
    return out.transpose(0, 1).reshape(B, T, H, w_HIO.shape[-1])


def _join_latent(c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """[c_kv ; k_pe] along the last dim. Engine hook: the paged cache (glm5.engine.kv_cache) returns the two as
    adjacent column views of one [B, S, r+R] tensor; then this is a view of it, saving a copy of the whole
    context per layer and decode step. Any other pair of tensors is concatenated."""
    r = c_kv.shape[-1]
    adjacent = (
        c_kv.stride() == k_pe.stride()
        and c_kv.stride(-1) == 1
        and c_kv.stride(-2) == r + k_pe.shape[-1]
        and k_pe.data_ptr() == c_kv.data_ptr() + r * c_kv.element_size()
    )
    if adjacent:
        return c_kv.as_strided((*c_kv.shape[:-1], r + k_pe.shape[-1]), c_kv.stride(), c_kv.storage_offset())
    return torch.cat([c_kv, k_pe], dim=-1)


class MLAttention(nn.Module):
    """Multi-head Latent Attention with a DSA indexer (or, on IndexCache "shared" layers, the previous layer's
    top-k)."""

    def __init__(self, cfg: GLM5Config, layer_idx: int, has_indexer: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.topk = cfg.index_topk
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.num_attention_heads * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias
        )
        self.indexer = Indexer(cfg) if has_indexer else None

    # --- pieces ----------------------------------------------------------------------------------
    def absorbed_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj for the weight-absorbed form: (W_UK [H, nope, r], W_UV [H, v, r]), views of its (dequantised)
        weight. Public for the fused decode step (glm5/engine/fused.py)."""
        return self._kv_b()

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj as W_UK [H, nope, r] and W_UV [H, v, r] (rows per head: 192 k_nope then 256 v)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent [B,S,r] + rope key [B,S,R] -> per-head keys [B,H,S,nope+R] and values [B,H,S,v]."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.num_heads, -1)], dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _expanded_attention(
        self, q, c_kv, k_pe, pos: Positions, topk_idx, use_mask_path: bool
    ) -> torch.Tensor:
        """Per-head attention over all S keys (causal, plus the top-k mask when given). -> [B,T,H,v]."""
        k, v = self._expand(c_kv, k_pe)
        q = q.transpose(1, 2)  # [B,H,T,D]
        q_pos, causal_from_zero = pos.q_pos, pos.start == 0
        T, S = q.shape[2], k.shape[2]
        if not use_mask_path and topk_idx is None and T == S and causal_from_zero:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            return out.transpose(1, 2)
        blocked = torch.arange(S, device=q.device).view(1, 1, -1) > q_pos[..., None]  # [P,T,S] future keys
        if topk_idx is not None:
            not_selected = torch.ones(q.shape[0], T, S, dtype=torch.bool, device=q.device)
            blocked = blocked | not_selected.scatter_(-1, topk_idx, False)
        blocked = blocked[:, None]  # [P or B,1,T,S]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2)

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        pos: Positions,
        opts: AttentionOptions,
        cache: LatentCache | None = None,
        prev_topk: torch.Tensor | None = None,
        want_stats: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [B,T,D] (normalised) -> (output [B,T,D], top-k indices [B,T,K] or None when dense, indexer loss or
        None)."""
        B, T, _ = x.shape
        cos, sin = rope
        c_q = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(c_q).view(B, T, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], self.interleave)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : self.kv_rank])
        k_pe = apply_rope(kv[..., self.kv_rank :], cos, sin, self.interleave)

        idx_q = idx_k = idx_w = None
        if self.indexer is not None:
            # The indexer sees detached inputs: it is trained only by its own loss (docs/model.md § Training stages).
            with torch.set_grad_enabled(want_stats and torch.is_grad_enabled()):
                idx_q, idx_k, idx_w = self.indexer.project(x.detach(), c_q.detach(), cos, sin)
        if cache is not None:
            if want_stats:
                raise ValueError(
                    "indexer/router statistics are computed on full sequences, not with a KV cache"
                )
            c_kv, k_pe, idx_k = cache.update(
                self.layer_idx, c_kv, k_pe, None if idx_k is None else idx_k.detach()
            )
        S = c_kv.shape[1]

        topk_idx = None
        if opts.dsa and S > self.topk:  # at most index_topk keys: DSA is exactly dense attention
            if self.indexer is not None:
                topk_idx = self.indexer.select(idx_q, idx_k, idx_w, pos, opts.query_chunk)
            elif prev_topk is None:
                raise ValueError(
                    f"layer {self.layer_idx} shares the top-k of a previous layer, but none was given"
                )
            else:
                topk_idx = prev_topk

        absorbed = cache is not None and T <= opts.absorb_max_tokens
        # Gathering pays off only when the selection is much smaller than the context: up to 4 x index_topk
        # keys (and a score matrix that fits in memory) the masked dense form is faster (measured on CPU).
        small = topk_idx is not None and S <= 4 * self.topk and B * self.num_heads * T * S <= (1 << 26)
        if opts.impl == "mask" or (small and not absorbed):
            out = self._expanded_attention(torch.cat([q_nope, q_pe], -1), c_kv, k_pe, pos, topk_idx, True)
        elif topk_idx is None and not absorbed:
            out = self._expanded_attention(torch.cat([q_nope, q_pe], -1), c_kv, k_pe, pos, None, False)
        else:
            w_uk, w_uv = self._kv_b()
            q_lat = torch.cat([_per_head_matmul(q_nope, w_uk), q_pe], dim=-1)
            kv_lat = _join_latent(c_kv, k_pe)
            if topk_idx is None:
                o_lat = dense_latent_attention(q_lat, kv_lat, pos.q_pos, self.kv_rank, self.scale)
            else:
                o_lat = sparse_latent_attention(
                    q_lat, kv_lat, topk_idx, pos.q_pos, self.kv_rank, self.scale, opts.query_chunk
                )
            out = _per_head_matmul(o_lat, w_uv.transpose(1, 2))
        out = self.o_proj(out.reshape(B, T, self.num_heads * self.v_dim))

        loss = None
        if want_stats and self.indexer is not None:
            loss = self._indexer_loss(
                q_nope, q_pe, c_kv, k_pe, idx_q, idx_k, idx_w, topk_idx, pos.q_pos, opts
            )
        return out, topk_idx, loss

    def _indexer_loss(
        self, q_nope, q_pe, c_kv, k_pe, idx_q, idx_k, idx_w, topk_idx, q_pos, opts
    ) -> torch.Tensor:
        """Mean over queries of KL(p_t || softmax(I_t)), p_t = head-averaged attention probabilities (detached).

        Over the selected keys when DSA is on (sparse stage), over every visible key otherwise (dense warm-up).
        Gradients reach only the indexer's parameters.
        """
        with torch.no_grad():
            w_uk, _ = self._kv_b()
            q_lat = torch.cat([_per_head_matmul(q_nope, w_uk), q_pe], dim=-1)
            kv_lat = torch.cat([c_kv, k_pe], dim=-1)
        B, T = q_lat.shape[:2]
        S = kv_lat.shape[1]
        # score all S keys, then take the selected columns (see DENSE_SCORES_MAX_RATIO), or gather the K keys
        every_key = topk_idx is None or S <= DENSE_SCORES_MAX_RATIO * topk_idx.shape[-1]
        width = S if every_key else topk_idx.shape[-1]
        step = _chunk_len(T, width * (self.num_heads + idx_q.shape[2]), opts.query_chunk)
        total = q_lat.new_zeros((), dtype=torch.float32)
        kv_lat32 = kv_lat.float()  # cast once (under bf16 autocast), not per gathered key
        for s0 in range(0, T, step):
            s1 = min(s0 + step, T)
            pos = q_pos[:, s0:s1]  # [P,C]
            idx_c = None if topk_idx is None else topk_idx[:, s0:s1]  # [B,C,K]
            with torch.no_grad():
                q_c = q_lat[:, s0:s1].float()
                if every_key:
                    scores = _scores_vs_shared_keys(q_c, kv_lat32) * self.scale  # [B,C,H,S]
                if topk_idx is None:
                    visible = (torch.arange(S, device=pos.device).view(1, 1, -1) <= pos[..., None]).expand(
                        B, -1, -1
                    )
                else:
                    visible = idx_c <= pos[..., None]
                    if every_key:
                        scores = scores.gather(-1, idx_c[:, :, None].expand(-1, -1, scores.shape[2], -1))
                    else:
                        keys = _gather_rows(kv_lat32, idx_c)  # [B,C,K,Dc]
                        scores = torch.matmul(q_c, keys.transpose(-1, -2)) * self.scale
                scores = scores.masked_fill(~visible[:, :, None], float("-inf"))
                p = torch.softmax(scores, dim=-1).mean(dim=2)  # [B,C,width]
            if every_key:
                logits = self.indexer.scores(idx_q[:, s0:s1], idx_k, idx_w[:, s0:s1])  # [B,C,S]
                logits = logits if idx_c is None else logits.gather(-1, idx_c)
            else:
                logits = self.indexer.scores_at(idx_q[:, s0:s1], idx_k, idx_w[:, s0:s1], idx_c)
            log_q = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            kl = torch.xlogy(p, p) - p * log_q.masked_fill(~visible, 0.0)
            total = total + kl.sum()
        return total / (B * T)
