"""Grouped matmul for MoE experts: rows of `x` sorted by expert, each group multiplied by its expert's weight.

`torch._grouped_mm` runs it as one kernel on CUDA (bf16, SM90+). Elsewhere (CPU, NPU, older GPUs, fp32) the
fallback loops over experts, not tokens: one host sync to read the group sizes, then one GEMM per expert
that received tokens (the approach of torchtitan's for-loop path).
"""

from __future__ import annotations

import torch

from glm5.device import has_grouped_mm


def grouped_mm_reference(x: torch.Tensor, w_EOI: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, I] grouped by expert (counts [E] rows each, in expert order) -> [N, O], row n times w[e(n)]^T."""
    # split/unbind rather than slicing: their backward is one cat/stack, while each slice's backward would
    # allocate (and zero) a gradient as large as the whole input or weight.
    sizes = counts.tolist()  # one host sync per call, none per token
    xs, ws = x.split(sizes), w_EOI.unbind(0)
    parts = [xs[e] @ ws[e].t() for e, n in enumerate(sizes) if n]
    if not parts:
        return x.new_zeros(x.shape[0], w_EOI.shape[1])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _can_use_native(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.shape[1] % 16 == 0
        and w.shape[1] % 16 == 0
        and has_grouped_mm(x.device)
    )


def grouped_mm(x: torch.Tensor, w_EOI: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Same contract as `grouped_mm_reference`; uses the fused kernel where the hardware has one."""
    if _can_use_native(x, w_EOI):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w_EOI.transpose(-2, -1), offs=offsets)
    return grouped_mm_reference(x, w_EOI, counts)
