"""Small building blocks shared by the GLM-5 model: RMSNorm, rotary embeddings and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * (x / sqrt(mean(x^2) + eps)), normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one op instead of eight (same arithmetic: x * rsqrt(mean(x^2) + eps) * w); matters at decode
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The HF arithmetic op by op: the slow twin of `forward`, and its path for bf16/fp16 inputs."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for plain RoPE: angle(p, i) = p * theta^(-2i/dim), i < dim/2. Shared by MLA and the indexer."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """Computed on the CPU, then moved to `device` (default: the current default device). On the meta device
        (where loading builds the model) arange runs torch's Python reference, which imports torch._dynamo:
        ~1 s and ~68 MB resident in a process that only loads a checkpoint."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device="cpu") / self.dim
        return (1.0 / self.theta**exponent).to(torch.empty(0).device if device is None else device)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) table, e.g. after building on the meta device and materialising."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> (cos, sin) [..., T, dim/2], computed in fp32 then cast to `dtype`."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., R] by (cos, sin) [..., R/2] (broadcast over any head dims in between).

    interleave=True rotates the pairs (x[2i], x[2i+1]) (GPT-J style, GLM-5's layout) and returns the rotated
    pairs de-interleaved, [evens..., odds...], exactly like HF's `apply_rotary_pos_emb_interleave`: q and k are
    permuted alike, so every dot product equals the one of the interleaved layout, and cached rope keys keep
    HF's layout. interleave=False is the half-split (NeoX) layout.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU MLP without biases: down(silu(gate(x)) * up(x)). The dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
