"""The KV-cache protocol the model writes into, and a simple contiguous implementation of it.

Per token and layer MLA caches only the 512-wide latent c_kv and the 64-wide rope key (576 values instead of
64 heads x (256 + 256) for expanded K/V), plus the indexer's 128-wide key. The model calls `update` once per
layer with the new entries and gets back everything cached so far; `begin` tells the model where the new tokens
sit (rows may hold different lengths; attention masks by position, so a shorter row's padding is never
seen), and the model calls `advance` after the forward. The engine's paged cache implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from glm5.config import GLM5Config


@dataclass
class Positions:
    """Where the new tokens sit: absolute positions, plus what the host knows without a device sync."""

    q_pos: torch.Tensor
    """[P, T] positions of the T new tokens; P = 1 when every row shares them, else one row per sequence."""
    start: int | None
    """The common first position when every row shares it (enables causal shortcuts), else None."""

    @classmethod
    def shared(cls, start: int, num_tokens: int, device: torch.device | str | None = None) -> Positions:
        return cls(torch.arange(start, start + num_tokens, device=device)[None], start)


class LatentCache(Protocol):
    def begin(self, num_new_tokens: int) -> tuple[Positions, int]:
        """Positions of the next forward's new tokens, and the longest row's length after it (host int)."""
        ...

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def advance(self, num_tokens: int) -> None: ...


class ContiguousLatentCache:
    """A preallocated [batch, max_len, ...] cache per layer (main layers, then MTP layers). All rows share positions."""

    def __init__(
        self,
        cfg: GLM5Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        full = cfg.indexer_types + ["full"] * cfg.num_nextn_predict_layers

        def alloc(width: int) -> torch.Tensor:
            return torch.zeros(batch_size, max_len, width, dtype=dtype, device=device)

        self.c_kv = [alloc(cfg.kv_lora_rank) for _ in range(num_layers)]
        self.k_pe = [alloc(cfg.qk_rope_head_dim) for _ in range(num_layers)]
        self.index_k = [alloc(cfg.index_head_dim) if full[i] == "full" else None for i in range(num_layers)]
        self.max_len = max_len
        self.seq_len = 0
        self.device = self.c_kv[0].device

    def begin(self, num_new_tokens: int) -> tuple[Positions, int]:
        return Positions.shared(self.seq_len, num_new_tokens, self.device), self.seq_len + num_new_tokens

    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        start, end = self.seq_len, self.seq_len + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} needed. Allocate a longer cache.")
        self.c_kv[layer_idx][:, start:end] = c_kv
        self.k_pe[layer_idx][:, start:end] = k_pe
        idx_cache = self.index_k[layer_idx]
        if index_k is not None and idx_cache is not None:
            idx_cache[:, start:end] = index_k
        return (
            self.c_kv[layer_idx][:, :end],
            self.k_pe[layer_idx][:, :end],
            None if idx_cache is None else idx_cache[:, :end],
        )

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens

    def bytes_per_token(self) -> int:
        per_layer = [
            c.shape[-1] + k.shape[-1] + (0 if i is None else i.shape[-1])
            for c, k, i in zip(self.c_kv, self.k_pe, self.index_k)
        ]
        return sum(per_layer) * self.c_kv[0].element_size()
