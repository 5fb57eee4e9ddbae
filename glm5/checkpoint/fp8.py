"""Block FP8 (DeepSeek / GLM-5-FP8 style): e4m3 weights with one fp32 multiplier per 128x128 block.

The one source of truth for which GLM-5 tensors are quantised in `zai-org/GLM-5-FP8` (docs/model.md § FP8 block format),
for the block quantise / dequantise arithmetic and for the `quantization_config` of config.json.

Format: a quantised weight W [out, in] is stored as `torch.float8_e4m3fn` plus `<name>_scale_inv` (for
`x.weight`: `x.weight_scale_inv`), fp32 [ceil(out/128), ceil(in/128)], and
    W[i, j] = W_fp8[i, j] * scale_inv[i // 128, j // 128].
Despite its name the scale is a multiplier. Edge blocks are ragged: the scale of a partial block is that of
its real elements (zero padding does not change the block max). Leading dimensions (stacked experts) are
allowed: [..., out, in] -> scales [..., ceil(out/128), ceil(in/128)].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from glm5.config import GLM5Config

FP8_BLOCK = 128
"""Side of the square weight block that shares one fp32 `weight_scale_inv` entry."""
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"
"""`x.weight` -> `x.weight_scale_inv` (and, for fused experts in memory, `gate_up_proj` -> `gate_up_proj_scale_inv`)."""

FP8_LEAVES = frozenset(
    {
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "wq_b",
        "wk",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
)
"""Modules whose 2-D `.weight` is block-FP8 in GLM-5-FP8: MLA projections, indexer wq_b / wk, dense MLPs,
shared experts and routed experts (MTP layer included). Everything else stays BF16: all norms, the routers
`mlp.gate` (+ the fp32 `e_score_correction_bias`), indexer `weights_proj` and `k_norm`, `embed_tokens`,
`lm_head` and the MTP `eh_proj`."""

QUANTIZATION_CONFIG_BASE: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
# The published config names the indexer's head-weight projection `self_attn.indexers_proj`, a module that does
# not exist; the tensor is `self_attn.indexer.weights_proj.weight` (which carries no scale).
PUBLISHED_WEIGHTS_PROJ_ALIAS = ("self_attn.indexers_proj", "self_attn.indexer.weights_proj")


# --- the split ------------------------------------------------------------------------------------
def is_quantized(name: str) -> bool:
    """True for a weight stored as e4m3 + scale in GLM-5-FP8. Works on HF and internal names (per-expert
    `mlp.experts.{e}.gate_proj.weight` and the fused `mlp.experts.gate_up_proj` / `down_proj` alike)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in ("gate_up_proj", "down_proj"):
        return True
    return name.endswith(".weight") and len(parts) >= 2 and parts[-2] in FP8_LEAVES


def scale_name(weight_name: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """[..., out, in] -> [..., ceil(out/128), ceil(in/128)]."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))


def fp8_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of one quantised weight: one e4m3 byte per element plus its fp32 block scales."""
    return math.prod(shape) + 4 * math.prod(scale_shape(shape))


# --- arithmetic -----------------------------------------------------------------------------------
def _blocks(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """[..., out, in] fp32 -> zero-padded blocks [..., so, 128, si, 128] and the original (out, in)."""
    *lead, rows, cols = w.shape
    so, si = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    padded = F.pad(w, (0, si * FP8_BLOCK - cols, 0, so * FP8_BLOCK - rows))
    return padded.view(*lead, so, FP8_BLOCK, si, FP8_BLOCK), (rows, cols)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., out, in] (any float dtype) -> (e4m3 W_q of the same shape, fp32 scale_inv [..., so, si]).

    scale_inv = block amax / 448, so the largest element of every block maps to e4m3's largest finite value;
    all-zero blocks get scale 1. The cast rounds to nearest (ties to even); the clamp only guards against
    the fp32 division landing a hair above 448.
    """
    if w.dim() < 2:
        raise ValueError(f"block FP8 needs a matrix, got shape {tuple(w.shape)}")
    blocks, (rows, cols) = _blocks(w.float())
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., so, si]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(*w.shape[:-2], blocks.shape[-4] * FP8_BLOCK, blocks.shape[-2] * FP8_BLOCK)[..., :rows, :cols]
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = W_q * scale_inv[i // 128, j // 128] (computed in fp32, returned in `dtype`)."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"expected a {FP8_DTYPE} weight, got {q.dtype}")
    expected = scale_shape(q.shape)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(q.shape)} weight needs {expected}"
        )
    *lead, rows, cols = q.shape
    s = scale_inv.float()
    if rows % FP8_BLOCK == 0 and cols % FP8_BLOCK == 0:  # whole blocks: broadcast, no expanded scale tensor
        blocks = (
            q.float().view(*lead, s.shape[-2], FP8_BLOCK, s.shape[-1], FP8_BLOCK) * s[..., :, None, :, None]
        )
        return blocks.view(q.shape).to(dtype)
    s = s.repeat_interleave(FP8_BLOCK, -2)[..., :rows, :].repeat_interleave(FP8_BLOCK, -1)[..., :cols]
    return (q.float() * s).to(dtype)


# --- quantization_config --------------------------------------------------------------------------
def modules_to_not_convert(cfg: GLM5Config) -> list[str]:
    """The published `modules_to_not_convert` list for a config (sorted): every norm, router (+ its bias),
    indexer k_norm and `indexers_proj` (the published alias of `indexer.weights_proj`), embed_tokens,
    model.norm, lm_head and the MTP enorm / hnorm / eh_proj / shared_head.norm."""
    names = {"model.embed_tokens", "model.norm", "lm_head"}
    types = cfg.indexer_types
    num_mtp = cfg.num_nextn_predict_layers
    for layer in range(cfg.num_hidden_layers + num_mtp):
        p = f"model.layers.{layer}"
        names |= {
            f"{p}.input_layernorm",
            f"{p}.post_attention_layernorm",
            f"{p}.self_attn.q_a_layernorm",
            f"{p}.self_attn.kv_a_layernorm",
        }
        if cfg.is_moe_layer(layer):
            names |= {f"{p}.mlp.gate", f"{p}.mlp.gate.e_score_correction_bias"}
        if layer >= cfg.num_hidden_layers or types[layer] == "full":
            names |= {
                f"{p}.{PUBLISHED_WEIGHTS_PROJ_ALIAS[0]}",
                f"{p}.self_attn.indexer.k_norm",
                f"{p}.self_attn.indexer.k_norm.bias",
            }
        if layer >= cfg.num_hidden_layers:
            names |= {f"{p}.enorm", f"{p}.hnorm", f"{p}.eh_proj", f"{p}.shared_head.norm"}
    return sorted(names)


def quantization_config(cfg: GLM5Config) -> dict[str, Any]:
    """`quantization_config` as GLM-5-FP8 publishes it."""
    return {**QUANTIZATION_CONFIG_BASE, "modules_to_not_convert": modules_to_not_convert(cfg)}


def parse_quantization_config(qc: Any, source: str = "config.json") -> list[str] | None:
    """Validate a config.json `quantization_config` (None: not quantised) and return its
    modules_to_not_convert with the `indexers_proj` alias mapped to the real module name. Loaders decide
    per tensor by the presence of a scale; this list is informational."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    for key in ("quant_method", "fmt", "weight_block_size"):
        expected = QUANTIZATION_CONFIG_BASE[key]
        if key in qc and qc[key] != expected:
            raise ValueError(
                f"{source}: quantization_config.{key} is {qc[key]!r}; glm5 reads block FP8 with {key}={expected!r}"
            )
    if qc.get("quant_method") != "fp8":
        raise ValueError(
            f"{source}: quantization_config.quant_method must be 'fp8', got {qc.get('quant_method')!r}"
        )
    alias, real = PUBLISHED_WEIGHTS_PROJ_ALIAS
    return [m.replace(alias, real) for m in qc.get("modules_to_not_convert") or []]
