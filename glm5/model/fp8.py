"""Weight-only block-FP8 for a built GLM-5 model: e4m3 weights in memory, dequantised layer by layer on the fly.

`quantize_model(model)` swaps the published FP8 split (glm5.checkpoint.fp8.is_quantized) into FP8 modules, in
place: every such `nn.Linear` becomes an `FP8Linear` and every routed-expert bank an `FP8Experts`. Weight memory
drops to about half (one byte per weight plus an fp32 scale per 128x128 block); each forward dequantises one
weight (one expert) at a time into the activation dtype, so the result equals that of the model with the
dequantised weights. The model code stays quantisation-free: the swapped modules keep the attributes and
call signatures the model uses. On the meta device only the structure changes (what
`GLM5ForCausalLM.from_pretrained(..., fp8="keep")` needs before it loads e4m3 tensors straight in).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize, is_quantized, quantize, scale_shape
from glm5.checkpoint.hf import internal_to_hf_name
from glm5.model.moe import Experts


def _apply_keeping_fp8(module: nn.Module, fn, recurse: bool) -> nn.Module:
    """`Module._apply` that lets `fn` move the e4m3 weights and fp32 scales between devices but never change
    their dtype (`model.to(torch.bfloat16)` would otherwise cast them, and a bf16 scale loses precision).
    A dtype change becomes the module's new compute dtype instead."""
    device = module.weight_scale_device
    probes = [
        (dtype, fn(torch.zeros((), dtype=dtype, device=device))) for dtype in (torch.float32, torch.bfloat16)
    ]
    changed = [p for dtype, p in probes if p.dtype != dtype]
    if not changed:
        return nn.Module._apply(module, fn, recurse)
    probe = changed[0]
    module.compute_dtype = probe.dtype
    for key, buf in module._buffers.items():
        if buf is not None:
            module._buffers[key] = buf.to(probe.device)
    for param in module._parameters.values():
        if param is not None:
            param.data = fn(param.data)
    return module


def dequantize_fast(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """glm5.checkpoint.fp8.dequantize(q, scale_inv, dtype) of a 2-D CPU weight, bit for bit, ~5x faster:
    torch widens e4m3 one element at a time, so the codes are moved into float16 bit positions instead (sign to
    bit 15, exponent and mantissa shifted left by 7: exactly q / 256 for every finite e4m3 value, subnormals
    included) and widened from there; q * s == (q / 256) * (256 s) exactly (both powers of two)."""
    rows, cols = q.shape
    if cols % FP8_BLOCK or q.device.type != "cpu" or tuple(scale_inv.shape) != scale_shape(q.shape):
        return dequantize(q, scale_inv, dtype)
    u = q.view(torch.uint8).to(torch.int16)
    h = (u << 7).bitwise_and_(0x3F80).bitwise_or_((u << 8).bitwise_and_(-32768))
    w = h.view(torch.float16).float()
    s = (scale_inv.float() * 256.0).repeat_interleave(FP8_BLOCK, 0)[:rows]
    w.view(rows, cols // FP8_BLOCK, FP8_BLOCK).mul_(s[:, :, None])
    return w.to(dtype)


BLOCK_ROWS = 4 * FP8_BLOCK
"""Weight rows dequantised at a time by `blocked_linear` (whole FP8 blocks)."""


def blocked_linear(
    x: torch.Tensor,
    out_features: int,
    rows: Callable[[int, int], torch.Tensor],
    bias: torch.Tensor | None = None,
    block: int = BLOCK_ROWS,
) -> torch.Tensor:
    """y = x W^T (+ b) for a W held in a compressed format, `rows(r0, r1)` its rows r0:r1 widened into x's dtype:
    `block` rows at a time, so the widened copy is a small cache-sized scratch, never the whole matrix (each
    output column is the same dot product as with the whole matrix, the blocks only split the output)."""
    if out_features <= block:
        return F.linear(x, rows(0, out_features), bias)
    parts = [F.linear(x, rows(r, min(r + block, out_features))) for r in range(0, out_features, block)]
    y = torch.cat(parts, dim=-1)
    return y if bias is None else y.add_(bias)


class FP8Linear(nn.Module):
    """y = x W^T (+ b) with W held as e4m3 + block scales and dequantised into x's dtype at each call.

    The state dict holds `weight` (float8_e4m3fn) and `weight_scale_inv` (fp32), the checkpoint names. The
    attribute `weight` reads as the dequantised matrix, so code written for nn.Linear (MLA's absorbed path
    reads `kv_b_proj.weight`) works unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # Stored under `_buffers["weight"]` directly: the `weight` property below would block register_buffer.
        self._buffers["weight"] = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        scales = scale_shape((out_features, in_features))
        self.register_buffer("weight_scale_inv", torch.ones(scales, dtype=torch.float32, device=device))
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise a Linear's weight (structure only when it lives on the meta device)."""
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        if w.device.type != "meta":
            q, s = quantize(w.detach())
            out._buffers["weight"], out.weight_scale_inv = q, s
            if linear.bias is not None:
                out.bias.data.copy_(linear.bias.detach())
        return out

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return dequantize(self._buffers["weight"], self.weight_scale_inv, self.compute_dtype)

    @property
    def weight_scale_device(self) -> torch.device:
        return self.weight_scale_inv.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = self._buffers["weight"], self.weight_scale_inv

        def rows(r0: int, r1: int) -> torch.Tensor:
            return dequantize_fast(q[r0:r1], s[r0 // FP8_BLOCK : -(-r1 // FP8_BLOCK)], x.dtype)

        return blocked_linear(
            x, self.out_features, rows, None if self.bias is None else self.bias.to(x.dtype)
        )

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp8(self, fn, recurse)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, fp8=e4m3"


class FP8Experts(nn.Module):
    """Routed experts in e4m3: `gate_up_proj` [E, 2F, D] (gate rows first) with `gate_up_proj_scale_inv`
    [E, 2*ceil(F/128), ceil(D/128)] (gate and up are quantised separately, as the checkpoint stores them) and
    `down_proj` [E, D, F] with `down_proj_scale_inv`. Same call as `glm5.model.moe.Experts`; each expert that
    received tokens is dequantised on its own, so the extra memory is one expert's weights."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        E, D, Fi = num_experts, hidden_size, intermediate_size
        self.num_experts, self.intermediate_size = E, Fi
        self.compute_dtype = compute_dtype
        gate_scales = scale_shape((Fi, D))
        self.register_buffer("gate_up_proj", torch.empty(E, 2 * Fi, D, dtype=FP8_DTYPE, device=device))
        self.register_buffer(
            "gate_up_proj_scale_inv",
            torch.ones(E, 2 * gate_scales[0], gate_scales[1], dtype=torch.float32, device=device),
        )
        self.register_buffer("down_proj", torch.empty(E, D, Fi, dtype=FP8_DTYPE, device=device))
        self.register_buffer(
            "down_proj_scale_inv", torch.ones(E, *scale_shape((D, Fi)), dtype=torch.float32, device=device)
        )

    @classmethod
    def from_experts(cls, experts: Experts) -> FP8Experts:
        """Quantise a bank of experts, one expert at a time (structure only on the meta device)."""
        w = experts.gate_up_proj
        E, two_f, D = w.shape
        out = cls(E, D, two_f // 2, w.dtype, w.device)
        if w.device.type != "meta":
            Fi, half = two_f // 2, out.gate_up_proj_scale_inv.shape[1] // 2
            with torch.no_grad():
                for e in range(E):
                    for rows, srows in (
                        (slice(0, Fi), slice(0, half)),
                        (slice(Fi, two_f), slice(half, 2 * half)),
                    ):
                        out.gate_up_proj[e, rows], out.gate_up_proj_scale_inv[e, srows] = quantize(w[e, rows])
                    out.down_proj[e], out.down_proj_scale_inv[e] = quantize(experts.down_proj[e])
        return out

    @property
    def weight_scale_device(self) -> torch.device:
        return self.down_proj_scale_inv.device

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e dequantised: (gate_up [2F, D], down [D, F]) in `dtype`."""
        Fi, half = self.intermediate_size, self.gate_up_proj_scale_inv.shape[1] // 2
        q, s = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        gate_up = torch.cat(
            [dequantize_fast(q[:Fi], s[:half], dtype), dequantize_fast(q[Fi:], s[half:], dtype)]
        )
        return gate_up, dequantize_fast(self.down_proj[e], self.down_proj_scale_inv[e], dtype)

    def forward(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort the N*K (token, expert) pairs by expert, run each used expert once, scatter-add back (the
        arithmetic of Experts.forward's per-expert fallback, on dequantised weights)."""
        top_k = topk_idx.shape[1]
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # one host sync per layer
        parts = []
        for e, x_e in enumerate(x_ND.index_select(0, token_of).split(counts)):
            if counts[e]:
                gate_up, down = self.expert_weights(e, x_ND.dtype)
                gate, up = (x_e @ gate_up.t()).chunk(2, dim=-1)
                parts.append((F.silu(gate) * up) @ down.t())
        y_sorted = torch.cat(parts) if parts else x_ND.new_zeros(0, x_ND.shape[1])
        y_sorted = y_sorted * weights.reshape(-1)[order, None].to(y_sorted.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp8(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, intermediate_size={self.intermediate_size}, fp8=e4m3"


def quantize_model(model: nn.Module) -> nn.Module:
    """Swap the published FP8 split of `model` (a GLM5ForCausalLM) into FP8 modules, in place; returns it."""
    cfg = model.config
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and is_quantized(internal_to_hf_name(f"{name}.weight", cfg)):
                setattr(parent, child_name, FP8Linear.from_linear(child))
            elif isinstance(child, Experts):
                setattr(parent, child_name, FP8Experts.from_experts(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (parameters and persistent buffers, FP8 scales included)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
