"""Weight-only storage formats for CPU decoding: bf16 and an int8 with per-group scales, beside block FP8.

`LLM(path, weights=...)` picks how the weight matrices are held in memory; activations, norms, biases, routers,
embeddings and the KV cache stay float32, so every format computes the same model on its stored values:

- "fp32": as the checkpoint dequantised (the default for non-FP8 checkpoints);
- "bf16": every matrix (MLA and indexer projections, MLPs, experts, lm_head, MTP eh_proj) as bfloat16;
- "int8": every matrix as int8 with one fp32 scale per group of `INT8_GROUP` = 32 inputs along each row
  (llama.cpp's Q8_0 layout: scale = group amax / 127, codes rounded to nearest);
- "fp8": the published GLM-5-FP8 split in e4m3 with its 128x128 `weight_scale_inv` (kept exactly as an FP8
  checkpoint stores it; an fp32 checkpoint is quantised by glm5.checkpoint.fp8.quantize), the other matrices
  (indexer weights_proj, lm_head, eh_proj) in bf16, as GLM-5-FP8 publishes them.

The native decode kernel (decode_layer.c) reads every format as stored and widens it in registers; the model's
own forward (prefill, the torch back end) dequantises one matrix (one expert) at a time, like glm5's FP8 modules.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint.files import release_free_memory
from glm5.kernels import native
from glm5.model.fp8 import FP8Experts, FP8Linear, _apply_keeping_fp8, blocked_linear, quantize_model
from glm5.model.moe import Experts

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "fp8")
INT8_GROUP = 32
"""Inputs per int8 scale (along each weight row)."""
_RELEASE_BYTES = 32 << 20
"""Source bytes converted between two hand-backs of freed memory and read shard pages (convert_model)."""
_CHUNK = 1 << 20
"""Elements converted at a time (bounds the float temporaries of a conversion to a few MB)."""


def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (int8 codes [..., out, in], fp32 scales [..., out, ceil(in/32)]): per group of 32 inputs,
    scale = amax / 127 (1 for an all-zero group), code = round(w / scale) (half to even). fp32 / bf16 CPU tensors
    go through the native kernel library's loop (the same bits, no float temporaries: converting a bf16 checkpoint
    at load holds only the codes and scales); others through torch ops a chunk of rows at a time."""
    *lead, rows, cols = w.shape
    groups = math.ceil(cols / INT8_GROUP)
    flat = w.reshape(-1, cols)
    q = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(flat.shape[0], groups, dtype=torch.float32, device=w.device)
    lib = native.load() if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16) else None
    if lib is not None and flat.numel():
        flat = flat.contiguous()
        lib.glm5_int8_quantize(
            flat.data_ptr(),
            int(w.dtype == torch.bfloat16),
            flat.shape[0],
            cols,
            q.data_ptr(),
            scale.data_ptr(),
        )
        return q.view(*lead, rows, cols), scale.view(*lead, rows, groups)
    # rows at a time: the float temporaries stay small (no whole-bank copy)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, flat.shape[0], step):
        g = F.pad(flat[r : r + step].float(), (0, groups * INT8_GROUP - cols)).view(-1, groups, INT8_GROUP)
        amax = g.abs().amax(-1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        codes = torch.round(g / s[..., None]).clamp_(-127, 127).to(torch.int8)
        q[r : r + step] = codes.view(-1, groups * INT8_GROUP)[:, :cols]
        scale[r : r + step] = s
    return q.view(*lead, rows, cols), scale.view(*lead, rows, groups)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes x their group's scale (one fp32 rounding, as the kernel widens them), in `dtype`."""
    cols = q.shape[-1]
    if scale.shape[-1] != math.ceil(cols / INT8_GROUP) or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"int8 scales of shape {tuple(scale.shape)} do not fit codes {tuple(q.shape)} "
            f"(one per {INT8_GROUP} inputs: {(*q.shape[:-1], math.ceil(cols / INT8_GROUP))})"
        )
    if cols % INT8_GROUP == 0:  # whole groups: broadcast the scales, no expanded scale tensor
        w = q.float().view(*q.shape[:-1], -1, INT8_GROUP).mul_(scale.float()[..., None])
        return w.view(q.shape).to(dtype)
    s = scale.float().repeat_interleave(INT8_GROUP, -1)[..., :cols]
    return (q.float() * s).to(dtype)


def _encode(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fmt == "bf16":
        return w.detach().to(torch.bfloat16).contiguous(), None
    return int8_quantize(w.detach())


def _decode(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if scale is None else int8_dequantize(w, scale, dtype)


class WeightOnlyLinear(nn.Module):
    """y = x W^T (+ b) with W held as bf16 or int8 (+ group scales) and widened into x's dtype at each call.
    `weight` reads as the widened matrix (code written for nn.Linear keeps working); `stored` and
    `weight_scale` are what the kernel reads."""

    def __init__(self, linear: nn.Linear, fmt: str) -> None:
        super().__init__()
        if fmt not in ("bf16", "int8"):
            raise ValueError(f"WeightOnlyLinear holds bf16 or int8, not {fmt!r}")
        self.fmt, self.in_features, self.out_features = fmt, linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        stored, scale = _encode(linear.weight, fmt)
        self.register_buffer("stored", stored)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return _decode(self.stored, self.weight_scale, self.compute_dtype)

    @property
    def weight_scale_device(self) -> torch.device:
        return self.stored.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored, scale = self.stored, self.weight_scale

        def rows(r0: int, r1: int) -> torch.Tensor:
            return _decode(stored[r0:r1], None if scale is None else scale[r0:r1], x.dtype)

        return blocked_linear(
            x, self.out_features, rows, None if self.bias is None else self.bias.to(x.dtype)
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        return _apply_keeping_fp8(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt}"


class WeightOnlyExperts(nn.Module):
    """Routed experts [E, 2F, D] / [E, D, F] held as bf16 or int8 (+ group scales); the call of
    glm5.model.moe.Experts, each used expert widened on its own (as FP8Experts)."""

    def __init__(self, experts: Experts, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        E, two_f, _ = experts.gate_up_proj.shape
        self.num_experts, self.intermediate_size = E, two_f // 2
        self.compute_dtype = experts.gate_up_proj.dtype
        for name in ("gate_up_proj", "down_proj"):
            stored, scale = _encode(getattr(experts, name), fmt)
            self.register_buffer(f"{name}_stored", stored)
            self.register_buffer(f"{name}_scale", scale)

    @property
    def weight_scale_device(self) -> torch.device:
        return self.gate_up_proj_stored.device

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        def one(name: str) -> torch.Tensor:
            scale = getattr(self, f"{name}_scale")
            return _decode(getattr(self, f"{name}_stored")[e], None if scale is None else scale[e], dtype)

        return one("gate_up_proj"), one("down_proj")

    forward = FP8Experts.forward

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        return _apply_keeping_fp8(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, intermediate_size={self.intermediate_size}, {self.fmt}"


def weight_format(model: nn.Module) -> str:
    """The format a model's matrices are held in: "fp8" (any FP8 module), "bf16" / "int8", else "fp32"."""
    modules = list(model.modules())
    if any(isinstance(m, (FP8Linear, FP8Experts)) for m in modules):
        return "fp8"
    for m in modules:
        if isinstance(m, (WeightOnlyLinear, WeightOnlyExperts)):
            return m.fmt
    return "fp32"


def resolve_weights(
    folder: str, weights: str | None, fp8: str | None, dtype: torch.dtype | str | None
) -> tuple[str | None, str | None]:
    """LLM's `weights` and `fp8` options for the checkpoint at `folder` -> (format to convert to or None, the
    loader's fp8 mode or None). An FP8 checkpoint keeps FP8 by default; conflicting options are refused."""
    with open(os.path.join(folder, "config.json")) as f:
        is_fp8 = json.load(f).get("quantization_config") is not None
    if weights is None:
        return ("fp8", "keep") if fp8 is None and is_fp8 else (None, fp8)
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if dtype is not None and dtype not in (torch.float32, "float32"):
        raise ValueError(f"weights={weights!r} computes in float32; drop dtype={dtype!r}")
    if (weights == "fp8" and fp8 == "dequantize") or (weights != "fp8" and fp8 == "keep"):
        raise ValueError(f"weights={weights!r} contradicts fp8={fp8!r}: give one of them")
    if weights == "fp8":
        return weights, "keep" if is_fp8 else fp8
    return weights, "dequantize" if is_fp8 else fp8


def converting_loader(weights: str | None):  # noqa: ANN201
    """For `load_pretrained(on_filled=...)`: each routed-expert bank converted to `weights` ("bf16" / "int8") as
    soon as its experts are read, so the unconverted banks (most of a GLM-5's bytes) never sit in memory
    together; None for the other formats. `convert_model` converts the rest after loading."""
    if weights not in ("bf16", "int8"):
        return None
    converted = 0

    @torch.no_grad()
    def on_filled(model: nn.Module, path: str) -> None:
        nonlocal converted
        bank = model.get_submodule(path)
        if type(bank) is not Experts:
            return
        parent, _, name = path.rpartition(".")
        converted += sum(t.numel() * t.element_size() for t in bank.parameters())
        setattr(model.get_submodule(parent), name, WeightOnlyExperts(bank, weights))
        del bank
        if converted >= _RELEASE_BYTES:
            release_free_memory()
            converted = 0

    return on_filled


@torch.no_grad()
def _widen_large_bf16(model: nn.Module) -> None:
    """bf16 parameters of at least _RELEASE_BYTES (the embedding) to fp32 a chunk at a time, handing back the
    pages a mapped source was read from as it goes (`model.float()` would hold the whole source next to the
    whole copy). Tied parameters stay tied."""
    done: dict[
        int, tuple[nn.Parameter, nn.Parameter]
    ] = {}  # id(old) -> (old, kept alive: ids stay unique; new)
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if (
                p is None
                or p.dtype != torch.bfloat16
                or p.numel() * 2 < _RELEASE_BYTES
                or not p.is_contiguous()
            ):
                continue
            if id(p) not in done:
                out = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                src, dst, step = p.detach().view(-1), out.view(-1), _RELEASE_BYTES // 8  # 8 MB of source
                for i in range(0, src.numel(), step):
                    dst[i : i + step] = src[i : i + step]
                    release_free_memory()
                done[id(p)] = (p, nn.Parameter(out, requires_grad=p.requires_grad))
            m._parameters[name] = done[id(p)][1]


@torch.no_grad()
def convert_model(model: nn.Module, weights: str) -> nn.Module:
    """Hold `model`'s matrices (a float32 or bfloat16 GLM5ForCausalLM, or one with FP8 modules already) in
    `weights` format with float32 activations, in place; returns it. bf16 weights become "bf16" without a copy."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    current = weight_format(model)
    if current not in ("fp32", weights):
        raise ValueError(
            f"the model's weights are held as {current}; converting them to {weights} would round twice "
            f"(load the checkpoint with weights={weights!r} instead)"
        )
    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"weights={weights!r} converts float32 or bfloat16 models, not {dtype}")
    if weights != "fp32":
        if weights == "fp8" and current != "fp8":
            quantize_model(model)
        fmt = "bf16" if weights == "fp8" else weights  # GLM-5-FP8 holds its other matrices in bf16
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        # module by module, holding no reference to a replaced one: its source weights are freed before the
        # next is converted (never a whole second copy of the model); every _RELEASE_BYTES of sources the
        # shard pages they were read from are handed back too (a mapped source's pages would otherwise stay
        # resident until the end: int8 from a bf16 checkpoint peaked at 1.80x the weights + cache, 1.51x after;
        # with the expert banks converted while loading (converting_loader) and the embedding widened in chunks
        # (_widen_large_bf16), 1.25x)
        converted = 0
        for path in [n for n, _ in model.named_modules()]:
            parent = model.get_submodule(path)
            for name in [n for n, _ in parent.named_children()]:
                child = getattr(parent, name)
                if type(child) is nn.Linear and not (tied and child is model.lm_head):
                    converted += child.weight.numel() * child.weight.element_size()
                    setattr(parent, name, WeightOnlyLinear(child, fmt))
                elif type(child) is Experts:
                    converted += sum(t.numel() * t.element_size() for t in child.parameters())
                    setattr(parent, name, WeightOnlyExperts(child, fmt))
                del child
                if converted >= _RELEASE_BYTES:
                    release_free_memory()
                    converted = 0
        release_free_memory()  # the shard pages the last conversions read, before the float copies below
    _widen_large_bf16(model)
    model.float()  # activations, norms, biases, embeddings; the stored formats stay
    release_free_memory()
    return model
