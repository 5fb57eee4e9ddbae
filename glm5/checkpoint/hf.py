"""The one name table between glm5's internal parameter names and the published HF GLM-5 checkpoint names.

Internal names equal the HF names except in two places:
- routed experts are fused 3-D parameters `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and
  `mlp.experts.down_proj` [E, D, F]; the checkpoint stores `mlp.experts.{e}.{gate,up,down}_proj.weight`
  (transformers 5.x keeps the fused form in memory; both are accepted on load);
- MTP module i is `mtp.{i}.*` internally and `model.layers.{num_hidden_layers + i}.*` in the checkpoint,
  without the shared embedding and head (copies of them, as some loaders add, are ignored on load).
Block-FP8 scales follow their weight: `x.weight` -> `x.weight_scale_inv`; fused experts held in FP8
(`glm5.model.fp8`) carry `gate_up_proj_scale_inv` [E, 2*ceil(F/128), ceil(D/128)] (gate rows first) and
`down_proj_scale_inv`, split into the per-expert `...experts.{e}.{gate,up,down}_proj.weight_scale_inv`.
"""

from __future__ import annotations

import re

import torch

from glm5.config import GLM5Config

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?$")
# Copies of shared tensors some MTP loaders write into layer N; glm5 shares the main model's.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def internal_to_hf_name(name: str, cfg: GLM5Config) -> str:
    """Rename one non-expert parameter (`mtp.{i}.x` -> `model.layers.{N+i}.x`; everything else unchanged)."""
    m = _MTP.match(name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return name


def hf_to_internal_name(name: str, cfg: GLM5Config) -> str | None:
    """Inverse of `internal_to_hf_name`; None for checkpoint tensors this config has no place for (MTP layers
    beyond num_nextn_predict_layers, shared-weight copies)."""
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= cfg.num_hidden_layers:
            i = layer - cfg.num_hidden_layers
            if i >= cfg.num_nextn_predict_layers or rest in _MTP_SHARED_COPIES:
                return None
            return f"mtp.{i}.{rest}"
    return name


def layer_index(hf_name: str) -> int | None:
    """`model.layers.{i}.*` -> i (MTP layers count from num_hidden_layers); None for global tensors."""
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def is_shared_copy(hf_name: str, cfg: GLM5Config) -> bool:
    """A copy of the shared embedding / head inside an MTP layer (written by some loaders, never needed)."""
    m = _LAYER.match(hf_name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers and m.group(2) in _MTP_SHARED_COPIES


def to_hf_state_dict(
    sd: dict[str, torch.Tensor], cfg: GLM5Config, fused_experts: bool = False
) -> dict[str, torch.Tensor]:
    """Internal state dict -> HF names. Experts are split into per-expert 2-D views (no copies) unless fused."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        hf = internal_to_hf_name(name, cfg)
        m = _FUSED.match(hf)
        if m is None or fused_experts:
            out[hf] = tensor
            continue
        prefix, kind, scale = m.group(1), m.group(2), m.group(3) or ""
        half = tensor.shape[1] // 2  # gate rows first (for scales: the gate's row blocks first)
        for e in range(tensor.shape[0]):
            if kind == "gate_up_proj":
                out[f"{prefix}.{e}.gate_proj.weight{scale}"] = tensor[e, :half]
                out[f"{prefix}.{e}.up_proj.weight{scale}"] = tensor[e, half:]
            else:
                out[f"{prefix}.{e}.down_proj.weight{scale}"] = tensor[e]
    return out


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor], cfg: GLM5Config, strict: bool = True
) -> dict[str, torch.Tensor]:
    """HF-named tensors (per-expert or fused experts) -> internal names, stacking experts into [E, ...] tensors.

    Raises ValueError naming the tensor when an expert is missing or duplicated, or (strict) for a key that
    is not a GLM-5 parameter name. Block-FP8 expert scales, when present, are stacked the same way.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for hf, tensor in hf_sd.items():
        name = hf_to_internal_name(hf, cfg)
        if name is None:
            continue
        m = _EXPERT.match(name)
        if m:
            prefix, e, kind = m.group(1), int(m.group(2)), m.group(3) + (m.group(4) or "")
            if e >= cfg.n_routed_experts:
                raise ValueError(
                    f"{hf}: expert {e} out of range; the config has n_routed_experts={cfg.n_routed_experts}"
                )
            experts.setdefault(prefix, {}).setdefault(e, {})[kind] = tensor
            continue
        if strict and not _looks_like_glm5_name(name):
            raise ValueError(f"unexpected tensor {hf!r} in the checkpoint: it is not a GLM-5 parameter")
        out[name] = tensor
    for prefix, per_expert in experts.items():
        if f"{prefix}.gate_up_proj" in out:
            raise ValueError(f"{prefix}: both fused and per-expert tensors present; keep one form")
        scaled = any(k.endswith("_scale_inv") for parts in per_expert.values() for k in parts)
        suffixes = ("", "_scale_inv") if scaled else ("",)
        for e in range(cfg.n_routed_experts):
            for kind in ("gate_proj", "up_proj", "down_proj"):
                for suffix in suffixes:
                    if kind + suffix not in per_expert.get(e, {}):
                        hf_name = internal_to_hf_name(f"{prefix}.{e}.{kind}.weight{suffix}", cfg)
                        raise ValueError(
                            f"missing tensor {hf_name!r}: every expert needs gate, up and down weights"
                        )
        for suffix in suffixes:
            experts_in_order = [per_expert[e] for e in range(cfg.n_routed_experts)]
            out[f"{prefix}.gate_up_proj{suffix}"] = torch.stack(
                [torch.cat([p["gate_proj" + suffix], p["up_proj" + suffix]], 0) for p in experts_in_order]
            )
            out[f"{prefix}.down_proj{suffix}"] = torch.stack(
                [p["down_proj" + suffix] for p in experts_in_order]
            )
    return out


_KNOWN = re.compile(
    r"^(model\.(embed_tokens|norm)\.weight|lm_head\.weight|"
    r"(model\.layers|mtp)\.\d+\.("
    r"(input_layernorm|post_attention_layernorm|enorm|hnorm|eh_proj|shared_head\.norm)\.weight|"
    r"self_attn\.(q_a_proj|q_a_layernorm|q_b_proj|kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj|o_proj)\.(weight|bias)|"
    r"self_attn\.indexer\.(wq_b\.weight|wk\.weight|weights_proj\.weight|k_norm\.weight|k_norm\.bias)|"
    r"mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"mlp\.gate\.(weight|e_score_correction_bias)|"
    r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight|"
    r"mlp\.experts\.(gate_up_proj|down_proj)))$"
)


def _looks_like_glm5_name(name: str) -> bool:
    """A GLM-5 parameter, or the block-FP8 scale of a weight or of fused experts."""
    if name.endswith(".weight_scale_inv") or _FUSED.match(name):
        name = name.removesuffix("_scale_inv")
    return _KNOWN.match(name) is not None


def is_glm5_name(hf_name: str, cfg: GLM5Config) -> bool:
    """True for an HF checkpoint name that is a GLM-5 tensor (a parameter, buffer or block-FP8 scale)."""
    name = hf_to_internal_name(hf_name, cfg)
    return name is not None and (_EXPERT.match(name) is not None or _looks_like_glm5_name(name))
