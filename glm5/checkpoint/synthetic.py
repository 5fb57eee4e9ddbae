"""The published GLM-5 tensor layout of any config, listed without allocating, and random checkpoints in it.

`list_tensors` derives every tensor of `zai-org/GLM-5` (BF16) or `zai-org/GLM-5-FP8` from the config alone
(docs/model.md § Checkpoint tensor names, § FP8 block format): no model is built (744B: < 1 s). The tests check it
against the model's own `hf_state_dict` on small configs, and against the published counts and byte totals
for the glm-5 / glm-5.2 presets. `write_random_checkpoint` streams a random checkpoint in that layout,
tensor by tensor, for loader tests and benchmarks at any size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from glm5.checkpoint import fp8 as fp8_format
from glm5.checkpoint.files import TensorSpec, dtype_name, write_checkpoint
from glm5.config import GLM5Config

TensorListing = list[tuple[str, tuple[int, ...], torch.dtype]]


def _layer_weights(cfg: GLM5Config, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of one decoder layer (MTP extras included for layers >= num_hidden_layers)."""
    D, p = cfg.hidden_size, f"model.layers.{layer}"
    H, is_mtp = cfg.num_attention_heads, layer >= cfg.num_hidden_layers
    out = [(f"{p}.input_layernorm.weight", (D,))]
    a = f"{p}.self_attn"
    out += [(f"{a}.q_a_proj.weight", (cfg.q_lora_rank, D))]
    out += [(f"{a}.q_a_proj.bias", (cfg.q_lora_rank,))] if cfg.attention_bias else []
    out += [
        (f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,)),
        (f"{a}.q_b_proj.weight", (H * cfg.qk_head_dim, cfg.q_lora_rank)),
        (f"{a}.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)),
    ]
    out += (
        [(f"{a}.kv_a_proj_with_mqa.bias", (cfg.kv_lora_rank + cfg.qk_rope_head_dim,))]
        if cfg.attention_bias
        else []
    )
    out += [
        (f"{a}.kv_a_layernorm.weight", (cfg.kv_lora_rank,)),
        (f"{a}.kv_b_proj.weight", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
        (f"{a}.o_proj.weight", (D, H * cfg.v_head_dim)),
    ]
    out += [(f"{a}.o_proj.bias", (D,))] if cfg.attention_bias else []
    if is_mtp or cfg.indexer_types[layer] == "full":
        i, Hi, Di = f"{a}.indexer", cfg.index_n_heads, cfg.index_head_dim
        out += [
            (f"{i}.wq_b.weight", (Hi * Di, cfg.q_lora_rank)),
            (f"{i}.wk.weight", (Di, D)),
            (f"{i}.k_norm.weight", (Di,)),
            (f"{i}.k_norm.bias", (Di,)),
            (f"{i}.weights_proj.weight", (Hi, D)),
        ]
    out += [(f"{p}.post_attention_layernorm.weight", (D,))]
    if cfg.is_moe_layer(layer):
        E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
        out += [(f"{p}.mlp.gate.weight", (E, D)), (f"{p}.mlp.gate.e_score_correction_bias", (E,))]
        for e in range(E):
            x = f"{p}.mlp.experts.{e}"
            out += [
                (f"{x}.gate_proj.weight", (F, D)),
                (f"{x}.up_proj.weight", (F, D)),
                (f"{x}.down_proj.weight", (D, F)),
            ]
        if cfg.n_shared_experts:
            S = F * cfg.n_shared_experts
            x = f"{p}.mlp.shared_experts"
            out += [
                (f"{x}.gate_proj.weight", (S, D)),
                (f"{x}.up_proj.weight", (S, D)),
                (f"{x}.down_proj.weight", (D, S)),
            ]
    else:
        I = cfg.intermediate_size  # noqa: E741
        out += [
            (f"{p}.mlp.gate_proj.weight", (I, D)),
            (f"{p}.mlp.up_proj.weight", (I, D)),
            (f"{p}.mlp.down_proj.weight", (D, I)),
        ]
    if is_mtp:
        out += [
            (f"{p}.enorm.weight", (D,)),
            (f"{p}.hnorm.weight", (D,)),
            (f"{p}.eh_proj.weight", (D, 2 * D)),
            (f"{p}.shared_head.norm.weight", (D,)),
        ]
    return out


def _dtype(cfg: GLM5Config) -> torch.dtype:
    dtype = getattr(torch, cfg.torch_dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config dtype {cfg.torch_dtype!r} is not a floating-point torch dtype")
    return dtype


def list_tensors(cfg: GLM5Config, fp8: bool = False) -> TensorListing:
    """Every tensor of the published checkpoint of `cfg`: (HF name, shape, dtype), in layer order.

    BF16 layout: weights in the config dtype, `e_score_correction_bias` fp32; MTP layers as layers
    num_hidden_layers.. without the shared embedding and head. FP8 layout: the weights `fp8.is_quantized`
    selects become e4m3, each followed by its fp32 `weight_scale_inv`.
    """
    dtype = _dtype(cfg)
    D, V = cfg.hidden_size, cfg.vocab_size
    weights = [("model.embed_tokens.weight", (V, D))]
    for layer in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        weights += _layer_weights(cfg, layer)
    weights += [("model.norm.weight", (D,))]
    weights += [] if cfg.tie_word_embeddings else [("lm_head.weight", (V, D))]
    out: TensorListing = []
    for name, shape in weights:
        if name.endswith("e_score_correction_bias"):
            out.append((name, shape, torch.float32))
        elif fp8 and fp8_format.is_quantized(name):
            out.append((name, shape, fp8_format.FP8_DTYPE))
            out.append((fp8_format.scale_name(name), fp8_format.scale_shape(shape), torch.float32))
        else:
            out.append((name, shape, dtype))
    return out


def total_bytes(listing: TensorListing) -> int:
    """Sum of the tensor bytes (what `metadata.total_size` of the index reports)."""
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in listing)


def _random(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Deterministic per (seed, name): ones for norm weights, zeros for biases, N(0, std) for matrices,
    small N(0, 0.01) for the router bias (so bias-corrected routing is exercised)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name)) % 2**63)
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.01
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * std


def random_specs(cfg: GLM5Config, fp8: bool = False, seed: int = 0) -> list[TensorSpec]:
    """TensorSpecs that produce random values for every tensor of `list_tensors(cfg, fp8)`."""
    specs: list[TensorSpec] = []
    pending: dict[str, torch.Tensor] = {}  # scale of the weight just quantised, until its spec is written

    def make(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        if name.endswith(fp8_format.SCALE_SUFFIX):
            return lambda: pending.pop(name)
        if dtype == fp8_format.FP8_DTYPE:

            def quantized() -> torch.Tensor:
                q, pending[fp8_format.scale_name(name)] = fp8_format.quantize(_random(name, shape, std, seed))
                return q

            return quantized
        return lambda: _random(name, shape, std, seed).to(dtype)

    std = cfg.initializer_range
    for name, shape, dtype in list_tensors(cfg, fp8):
        specs.append(TensorSpec(name, shape, dtype, make(name, shape, dtype)))
    return specs


def write_random_checkpoint(
    cfg: GLM5Config,
    path: str | os.PathLike,
    fp8: bool = False,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Write config.json and random weights for `cfg` in the published layout (streaming; returns the index)."""
    config = cfg.to_hf_config()
    config["dtype"] = dtype_name(_dtype(cfg))
    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = fp8_format.quantization_config(cfg)
    return write_checkpoint(path, config, random_specs(cfg, fp8, seed), max_shard_size)
