"""Parameter, memory and KV-cache accounting of a config (`glm5 info`, and the inputs of `glm5 plan`).

Counts come from the model itself: `parameter_table` builds `GLM5ForCausalLM` on the meta device (no memory,
~4 s for the 744B preset) and sorts every named parameter, plus the fp32 `e_score_correction_bias` buffers,
into components. Nothing is re-derived by hand, so the table stays true when the model changes; the tests
check it against a closed form (docs/model.md § Parameter accounting).

Conventions:
- "main model" = embedding, the `num_hidden_layers` decoder layers, final norm and lm_head; the MTP modules
  (`mtp.*`, stored as layers N, N+1, ... in the checkpoint) are counted apart.
- Parameter counts are `nn.Parameter` entries only; the router bias buffers (fp32, not trained by SGD) are
  listed separately but their bytes are included in every memory figure, as they are in the checkpoint.
- Byte figures are tensor bytes as stored in the published layouts: BF16 (`zai-org/GLM-5`) and block-FP8
  (`zai-org/GLM-5-FP8`, docs/model.md § FP8 block format). GB = 1e9 bytes, GiB = 2**30 bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch

from glm5.checkpoint.fp8 import fp8_nbytes, is_quantized
from glm5.config import GLM5Config
from glm5.model import GLM5ForCausalLM

COMPONENTS: dict[str, str] = {
    "routed_experts": "routed experts",
    "attention": "MLA attention",
    "shared_experts": "shared experts",
    "embed_tokens": "embed_tokens",
    "lm_head": "lm_head",
    "indexers": "DSA indexers",
    "dense_mlp": "dense MLPs",
    "routers": "routers",
    "norms": "RMSNorm weights",
    "mtp_glue": "MTP eh_proj",
}
"""Component key -> display name. MLA's q_a/kv_a layernorms count as attention (docs/model.md § Parameter accounting:
165,022,208 per layer), the indexer's k_norm as indexer; `norms` are the per-layer input/post-attention
norms, `model.norm` and the MTP enorm/hnorm/shared_head.norm."""


@dataclass(frozen=True)
class TensorEntry:
    """One named parameter or buffer of the model."""

    name: str
    """Internal name (`model.layers.3.mlp.experts.gate_up_proj`, `mtp.0.eh_proj.weight`, ...)."""
    shape: tuple[int, ...]
    component: str
    """A key of COMPONENTS (for MTP tensors: the component inside the MTP layer)."""
    in_mtp: bool
    """Lives under `mtp.` (not part of the main model)."""
    is_buffer: bool
    """A buffer (the fp32 router bias), not an nn.Parameter."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bf16_bytes(self) -> int:
        """Bytes in the BF16 checkpoint (buffers are fp32)."""
        return self.numel * (4 if self.is_buffer else 2)

    @property
    def fp8_bytes(self) -> int:
        """Bytes in block FP8: e4m3 + fp32 block scales per quantised 2-D matrix, else BF16 (fp32 bias)."""
        if self.is_buffer:
            return self.numel * 4
        if self.component == "routed_experts":
            num_experts, out_features, in_features = self.shape
            if self.name.endswith("gate_up_proj"):
                # The checkpoint stores gate [F, D] and up [F, D] as separate matrices, each with its scales.
                return 2 * num_experts * _fp8_matrix_bytes(out_features // 2, in_features)
            return num_experts * _fp8_matrix_bytes(out_features, in_features)
        if is_quantized(self.name) and len(self.shape) == 2:  # the published split, glm5.checkpoint.fp8
            return _fp8_matrix_bytes(*self.shape)
        return self.numel * 2


def _fp8_matrix_bytes(out_features: int, in_features: int) -> int:
    """One e4m3 byte per weight + an fp32 scale per 128x128 block (edge blocks padded)."""
    return fp8_nbytes((out_features, in_features))


def _component(name: str) -> str:
    """Component key of a parameter/buffer name with any `mtp.{i}.` prefix removed."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens"
    if name == "lm_head.weight":
        return "lm_head"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "routers"
    if ".self_attn.indexer." in name:
        return "indexers"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    if name.endswith("eh_proj.weight"):
        return "mtp_glue"
    if name.endswith("norm.weight"):
        return "norms"
    raise RuntimeError(
        f"glm5.plan does not know where parameter {name!r} belongs; update glm5.plan.accounting._component"
    )


@dataclass(frozen=True)
class ParamTable:
    """Every parameter of a config, sorted into components, with the derived totals the planner reports."""

    config: GLM5Config
    entries: tuple[TensorEntry, ...]

    # --- parameter counts ------------------------------------------------------------------------
    def _params(self, mtp: bool | None, component: str | None = None) -> int:
        """Parameters (buffers excluded); mtp=None counts both the main model and MTP."""
        return sum(
            e.numel
            for e in self.entries
            if not e.is_buffer
            and (mtp is None or e.in_mtp == mtp)
            and (component is None or e.component == component)
        )

    def component_params(self, component: str, mtp: bool = False) -> int:
        """Parameters of one component in the main model (or, with mtp=True, inside the MTP modules)."""
        return self._params(mtp, component)

    @property
    def total_main(self) -> int:
        return self._params(False)

    @property
    def total_with_mtp(self) -> int:
        return self._params(None)

    @property
    def mtp_params(self) -> int:
        """Unique MTP parameters (the MTP modules share embed_tokens and lm_head with the main model)."""
        return self._params(True)

    @property
    def num_router_bias(self) -> int:
        """Entries of the fp32 `e_score_correction_bias` buffers, main model and MTP."""
        return sum(e.numel for e in self.entries if e.is_buffer)

    def _active(self, mtp: bool) -> int:
        # A token passes through num_experts_per_tok of n_routed_experts routed experts; everything else
        # (shared expert, router, attention, indexer, dense MLP, norms) is used in full.
        k, num_experts = self.config.num_experts_per_tok, self.config.n_routed_experts
        routed = self._params(mtp, "routed_experts")
        assert routed % num_experts == 0, "fused expert tensors hold the same count per expert"
        embed_head = self._params(mtp, "embed_tokens") + self._params(mtp, "lm_head")
        return self._params(mtp) - embed_head - routed + routed // num_experts * k

    @property
    def active_no_embed(self) -> int:
        """Main-model parameters one token uses, without embed_tokens and lm_head."""
        return self._active(False)

    @property
    def active_with_head(self) -> int:
        """`active_no_embed` + lm_head (the embedding is a lookup, not a matmul)."""
        return self.active_no_embed + self._params(False, "lm_head")

    @property
    def mtp_active(self) -> int:
        """Unique MTP parameters one draft step uses (excluding the shared embedding and head)."""
        return self._active(True)

    # --- memory ----------------------------------------------------------------------------------
    def _bytes(self, attr: str, mtp: bool) -> int:
        return sum(getattr(e, attr) for e in self.entries if mtp or not e.in_mtp)

    def bf16_bytes(self, include_mtp: bool = False) -> int:
        """Weight bytes in BF16 (+ the fp32 router biases)."""
        return self._bytes("bf16_bytes", include_mtp)

    def fp8_bytes(self, include_mtp: bool = False) -> int:
        """Weight bytes in the GLM-5-FP8 layout (e4m3 + fp32 block scales; BF16/fp32 where kept)."""
        return self._bytes("fp8_bytes", include_mtp)

    # --- KV cache --------------------------------------------------------------------------------
    @property
    def num_indexer_layers(self) -> int:
        """Main-model layers that run (and cache keys for) their own DSA indexer."""
        layers = {e.name.split(".")[2] for e in self.entries if e.component == "indexers" and not e.in_mtp}
        return len(layers)

    def kv_bytes_per_token(self, fp8_indexer: bool = False) -> int:
        """Cache bytes per token over the main layers: the BF16 MLA latent (kv_lora_rank + rope dims) in every
        layer, plus the indexer key in layers with their own indexer (BF16, or FP8 + one fp32 scale)."""
        cfg = self.config
        latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.num_hidden_layers
        per_key = cfg.index_head_dim + 4 if fp8_indexer else cfg.index_head_dim * 2
        return latent + per_key * self.num_indexer_layers

    def kv_bytes(self, num_tokens: int | None = None, fp8_indexer: bool = False) -> int:
        """Cache bytes for `num_tokens` tokens (default: one sequence of max_position_embeddings)."""
        num_tokens = self.config.max_position_embeddings if num_tokens is None else num_tokens
        return num_tokens * self.kv_bytes_per_token(fp8_indexer)


def parameter_table(cfg: GLM5Config) -> ParamTable:
    """Build the model on the meta device and sort its parameters into components (cached per config)."""
    return dataclasses.replace(_table_for(json.dumps(cfg.to_hf_config(), sort_keys=True)), config=cfg)


@functools.lru_cache(maxsize=8)
def _table_for(config_json: str) -> ParamTable:
    cfg = GLM5Config.from_hf_config(json.loads(config_json))
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    entries = []
    tensors = [(n, t, False) for n, t in model.named_parameters()]
    tensors += [(n, t, True) for n, t in model.named_buffers() if n.endswith("e_score_correction_bias")]
    for name, tensor, is_buffer in tensors:
        in_mtp = name.startswith("mtp.")
        local = "model." + name.split(".", 2)[2] if in_mtp else name  # mtp.0.x -> model.x for classification
        entries.append(TensorEntry(name, tuple(tensor.shape), _component(local), in_mtp, is_buffer))
    return ParamTable(cfg, tuple(entries))
