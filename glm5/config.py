"""GLM5Config: every hyper-parameter of a GLM-5-shaped model, its HF `config.json` form, and named presets.

The field names follow the published `zai-org/GLM-5` `config.json` (model_type `glm_moe_dsa`) so that a
config read from a checkpoint folder maps one-to-one. Keys this class does not model (transformers writes
many: `architectures`, `id2label`, `transformers_version`, ...) are kept in `extra` and written back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "glm_moe_dsa"
ARCHITECTURE = "GlmMoeDsaForCausalLM"


@dataclass
class GLM5Config:
    """Architecture of a GLM-5 model (MLA + DSA lightning indexer + sigmoid MoE + MTP).

    Defaults are the published GLM-5 values (docs/model.md § Presets); `from_preset` gives other sizes.
    """

    # --- sizes -----------------------------------------------------------------------------------
    vocab_size: int = 154_880
    """Rows of the embedding and the LM head."""
    hidden_size: int = 6144
    """Residual stream width."""
    num_hidden_layers: int = 78
    """Decoder layers of the main model (the MTP layers are stored after them)."""
    intermediate_size: int = 12_288
    """Width of the dense SwiGLU MLP in the first `first_k_dense_replace` layers."""
    max_position_embeddings: int = 202_752
    """Longest context the model was trained for."""

    # --- MLA attention ---------------------------------------------------------------------------
    num_attention_heads: int = 64
    """Query heads of MLA."""
    num_key_value_heads: int = 64
    """Nominal; MLA shares one latent across heads. Kept for config round-trips."""
    q_lora_rank: int = 2048
    """Rank of the low-rank query projection (also the indexer's query input width)."""
    kv_lora_rank: int = 512
    """Width of the cached KV latent c_kv."""
    qk_nope_head_dim: int = 192
    """Per-head query/key dims without position encoding."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dims carrying RoPE (one shared rope key per token)."""
    v_head_dim: int = 256
    """Per-head value dims."""
    attention_bias: bool = False
    """Biases on the attention projections (GLM-5: none)."""

    # --- RoPE ------------------------------------------------------------------------------------
    rope_theta: float = 1_000_000.0
    """RoPE base (GLM-5: 1e6; transformers' class default differs)."""
    rope_interleave: bool = True
    """Main MLA RoPE pairs (x[2i], x[2i+1]) (GPT-J style) instead of half-split (NeoX)."""
    indexer_rope_interleave: bool = True
    """DSA indexer RoPE layout; interleaved for GLM-5 (unlike DeepSeek-V3.2)."""

    # --- DSA lightning indexer -------------------------------------------------------------------
    index_n_heads: int = 32
    """Indexer query heads."""
    index_head_dim: int = 128
    """Indexer head width (RoPE on its first `qk_rope_head_dim` dims)."""
    index_topk: int = 2048
    """Keys each query attends to under sparse attention."""
    index_topk_freq: int | None = None
    """IndexCache: every `freq`-th layer (after the offset) runs its own indexer; None = all layers."""
    index_skip_topk_offset: int | None = None
    """IndexCache: first layer index from which sharing can start (HF rule, docs/model.md § IndexCache layer types)."""
    index_topk_pattern: str | None = None
    """IndexCache override: one letter per layer, F = full indexer, S = reuse the previous full layer."""

    # --- MoE -------------------------------------------------------------------------------------
    first_k_dense_replace: int = 3
    """The first k layers use the dense MLP; the rest use MoE."""
    moe_layer_freq: int = 1
    """Every layer after the dense ones is MoE (only 1 is supported)."""
    n_routed_experts: int = 256
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 8
    """Routed experts chosen per token (top-k)."""
    n_shared_experts: int = 1
    """Always-on shared experts (fused into one MLP of width n_shared * moe_intermediate_size)."""
    moe_intermediate_size: int = 2048
    """Width of each expert's SwiGLU MLP."""
    routed_scaling_factor: float = 2.5
    """Multiplier on the normalised routed-expert weights."""
    norm_topk_prob: bool = True
    """Normalise the chosen experts' sigmoid scores to sum to one."""
    n_group: int = 1
    """Expert groups for group-limited routing (1 = no limit)."""
    topk_group: int = 1
    """Groups kept per token when n_group > 1."""
    scoring_func: str = "sigmoid"
    """Router score function (GLM-5: sigmoid)."""
    topk_method: str = "noaux_tc"
    """Router selection rule: bias-corrected top-k (aux-loss-free balancing)."""

    # --- MTP -------------------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1
    """Multi-token-prediction modules (stored as layers num_hidden_layers, num_hidden_layers+1, ...)."""

    # --- norms, init, tokens ---------------------------------------------------------------------
    rms_norm_eps: float = 1e-5
    """Eps of the input / post-attention / final / MTP RMSNorms."""
    latent_norm_eps: float = 1e-6
    """Eps of q_a_layernorm and kv_a_layernorm. HF builds them with the class default 1e-6, not
    rms_norm_eps (docs/model.md § Decisions where sources disagree); we follow the reference so logits match it."""
    indexer_norm_eps: float = 1e-6
    """Eps of the indexer's k_norm LayerNorm."""
    hidden_act: str = "silu"
    """Activation of every SwiGLU MLP."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear / embedding weights."""
    tie_word_embeddings: bool = False
    """GLM-5 keeps lm_head separate from the embedding."""
    bos_token_id: int | None = None
    """Unused by GLM (the chat template writes [gMASK]<sop>)."""
    eos_token_id: list[int] = field(default_factory=lambda: [154_820, 154_827, 154_829])
    """Stop ids: <|endoftext|>, <|user|>, <|observation|>."""
    pad_token_id: int | None = 154_820
    """Padding id (<|endoftext|>)."""
    torch_dtype: str = "bfloat16"
    """Dtype of the published weights (HF key `dtype`)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """config.json keys glm5 does not model; carried along unchanged."""

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.validate()

    # --- derived values --------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # Plain RoPE (no YaRN), so no mscale correction: 1/sqrt(256) = 1/16 for GLM-5.
        return self.qk_head_dim**-0.5

    @property
    def indexer_types(self) -> list[str]:
        """Per-layer indexer mode: "full" runs its own indexer, "shared" reuses the previous full layer's."""
        if self.index_topk_pattern is not None:
            return [{"F": "full", "S": "shared"}[c] for c in self.index_topk_pattern]
        freq = max(self.index_topk_freq or 1, 1)
        offset = 2 if self.index_skip_topk_offset is None else self.index_skip_topk_offset
        return [
            "full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(self.num_hidden_layers)
        ]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP layers included) uses MoE rather than the dense MLP."""
        return layer_idx >= self.first_k_dense_replace

    # --- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "max_position_embeddings",
            "num_attention_heads",
            "num_key_value_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "n_group",
            "topk_group",
            "moe_layer_freq",
        ]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"GLM5Config.{name} must be an integer, got {value!r} ({type(value).__name__})"
                )
            if value < 1:
                raise ValueError(f"GLM5Config.{name} must be >= 1, got {value}")
        non_negative = ["first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"]
        for name in non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GLM5Config.{name} must be a non-negative integer, got {value!r}")
        for name in [
            "rope_theta",
            "routed_scaling_factor",
            "rms_norm_eps",
            "latent_norm_eps",
            "indexer_norm_eps",
            "initializer_range",
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GLM5Config.{name} must be a finite number, got {value!r}")
            if value <= 0:
                raise ValueError(f"GLM5Config.{name} must be > 0, got {value}")
        for name in [
            "rope_interleave",
            "indexer_rope_interleave",
            "norm_topk_prob",
            "tie_word_embeddings",
            "attention_bias",
        ]:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GLM5Config.{name} must be true or false, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"GLM5Config.num_experts_per_tok ({self.num_experts_per_tok}) is larger than "
                f"n_routed_experts ({self.n_routed_experts}); choose at most {self.n_routed_experts}"
            )
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"GLM5Config.n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"GLM5Config.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                "GLM5Config.n_group: each expert group needs at least 2 experts (group score = top-2 sum)"
            )
        if (
            self.n_group > 1
            and self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok
        ):
            raise ValueError(
                "GLM5Config.topk_group keeps fewer experts than num_experts_per_tok; raise topk_group"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"GLM5Config.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}"
            )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(
                f"GLM5Config.index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                f"({self.qk_rope_head_dim}): the indexer applies RoPE to its first qk_rope_head_dim dims"
            )
        if self.moe_layer_freq != 1:
            raise ValueError(
                "GLM5Config.moe_layer_freq: only 1 (every layer after the dense ones is MoE) is supported"
            )
        if self.scoring_func != "sigmoid":
            raise ValueError(
                f"GLM5Config.scoring_func: only 'sigmoid' is supported, got {self.scoring_func!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"GLM5Config.hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.index_topk_freq is not None and (
            not isinstance(self.index_topk_freq, int) or self.index_topk_freq < 1
        ):
            raise ValueError(
                f"GLM5Config.index_topk_freq must be a positive integer, got {self.index_topk_freq!r}"
            )
        if self.index_topk_pattern is not None:
            pattern = self.index_topk_pattern
            if (
                not isinstance(pattern, str)
                or set(pattern) - {"F", "S"}
                or len(pattern) != self.num_hidden_layers
            ):
                raise ValueError(
                    f"GLM5Config.index_topk_pattern must be a string of {self.num_hidden_layers} letters F/S, "
                    f"got {pattern!r}"
                )
        if self.indexer_types[0] != "full":
            raise ValueError(
                "GLM5Config: layer 0 must run its own indexer (index_topk_pattern/offset gives 'shared')"
            )
        if not isinstance(self.eos_token_id, list) or not all(isinstance(i, int) for i in self.eos_token_id):
            raise ValueError(
                f"GLM5Config.eos_token_id must be an int or a list of ints, got {self.eos_token_id!r}"
            )

    # --- HF config.json --------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | dict[str, Any]) -> GLM5Config:
        """Build from a config.json path, a checkpoint folder or an already parsed dict."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise ValueError(
                    f"no config.json at {path}: pass a checkpoint folder or a config file"
                ) from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download the file") from None
            if not isinstance(config, dict):
                raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
        d = copy.deepcopy(config)
        model_type = d.pop("model_type", MODEL_TYPE)
        d.pop("architectures", None)  # always written back as [GlmMoeDsaForCausalLM]
        if model_type not in (MODEL_TYPE, "deepseek_v32"):
            raise ValueError(f"config model_type is {model_type!r}; glm5 reads {MODEL_TYPE!r} checkpoints")
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        if "rope_theta" in rope and "rope_theta" not in d:
            d["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_type {rope_type!r} is not supported (GLM-5 uses plain RoPE, rope_type 'default')"
            )
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")
        if "num_experts" in d and "n_routed_experts" not in d:
            d["n_routed_experts"] = d.pop("num_experts")
        # Values HF recomputes from others; accept them, check them, do not store them twice.
        derived = {
            "qk_head_dim": None,
            "head_dim": None,
            "indexer_types": None,
            "mlp_layer_types": None,
            "layer_types": None,
        }
        for key in derived:
            derived[key] = d.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        unknown = {k: v for k, v in d.items() if k not in names}
        if isinstance(known.get("rope_theta"), int):
            known["rope_theta"] = float(known["rope_theta"])
        if "eos_token_id" in known and isinstance(known["eos_token_id"], int):
            known["eos_token_id"] = [known["eos_token_id"]]
        if derived["indexer_types"] is not None and "index_topk_pattern" not in known:
            types = derived["indexer_types"]
            if not isinstance(types, list) or set(types) - {"full", "shared"}:
                raise ValueError(f"config indexer_types must be a list of 'full'/'shared', got {types!r}")
            if types != cls(**{**known, "index_topk_pattern": None}).indexer_types:
                known["index_topk_pattern"] = "".join("F" if t == "full" else "S" for t in types)
        cfg = cls(**known, extra=unknown)
        if derived["qk_head_dim"] is not None and derived["qk_head_dim"] != cfg.qk_head_dim:
            raise ValueError(
                f"config qk_head_dim {derived['qk_head_dim']} != "
                f"qk_nope_head_dim + qk_rope_head_dim = {cfg.qk_head_dim}"
            )
        return cfg

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict in the published layout (keys HF does not know are written only when set)."""
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_theta", "torch_dtype"):
                continue
            value = getattr(self, f.name)
            optional = ("index_topk_freq", "index_skip_topk_offset", "index_topk_pattern", "bos_token_id")
            if f.name in optional and value is None:
                continue
            if f.name in ("latent_norm_eps", "indexer_norm_eps") and value == f.default:
                continue  # not a published key; only written when changed
            d[f.name] = copy.deepcopy(value)
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim
        d["dtype"] = self.torch_dtype
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        for k, v in self.extra.items():
            d.setdefault(k, copy.deepcopy(v))
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (to `path`, or `path/config.json` for a folder)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_config(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def replace(self, **changes: Any) -> GLM5Config:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # --- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> GLM5Config:
        """A named configuration: see `PRESETS` (glm-5, glm-5.2, tiny, small, bench-tiny, ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**copy.deepcopy(PRESETS[name]))


# Small models keep GLM-5's proportions where it matters (MLA ranks < hidden, rope dims, 1 shared expert,
# sigmoid top-k routing with scaling 2.5) and shrink everything else to fit a laptop CPU.
_TINY = dict(
    vocab_size=8192,
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=512,
    max_position_embeddings=32_768,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=64,
    first_k_dense_replace=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
    moe_intermediate_size=128,
    eos_token_id=[0],
    pad_token_id=0,
    torch_dtype="float32",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The published zai-org/GLM-5 (and GLM-5.1) architecture.
    "glm-5": {},
    # GLM-5.2: IndexCache (21 full indexers + MTP), rope theta 8e6, 1M context; same tensor shapes.
    "glm-5.2": dict(
        rope_theta=8_000_000.0,
        max_position_embeddings=1_048_576,
        index_topk_freq=4,
        index_skip_topk_offset=3,
        extra={"index_share_for_mtp_iteration": True},
    ),
    # ~10M parameters (+2.0M MTP): the CPU workhorse. bench-tiny plus MTP (docs/performance.md § The bench-tiny config).
    "tiny": dict(_TINY),
    # The config both glm5 and HF are benchmarked on, no MTP (docs/performance.md § The bench-tiny config).
    "bench-tiny": dict(_TINY, num_nextn_predict_layers=0),
    # ~100M parameters in total (~30M active): trains on a CPU in hours, on a GPU in minutes.
    "small": dict(
        vocab_size=32_768,
        hidden_size=512,
        num_hidden_layers=8,
        intermediate_size=1536,
        max_position_embeddings=65_536,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=256,
        first_k_dense_replace=1,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        moe_intermediate_size=256,
        eos_token_id=[0],
        pad_token_id=0,
        torch_dtype="float32",
    ),
}
