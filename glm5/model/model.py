"""GLM5ForCausalLM: the GLM-5 decoder (MLA + DSA + MoE) and its multi-token-prediction module, on one device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint import pretrained
from glm5.checkpoint.hf import from_hf_state_dict, to_hf_state_dict
from glm5.config import GLM5Config
from glm5.model.attention import AttentionOptions, MLAttention, Positions
from glm5.model.cache import LatentCache
from glm5.model.fp8 import quantize_model
from glm5.model.layers import MLP, RMSNorm, RotaryEmbedding
from glm5.model.loss import linear_cross_entropy
from glm5.model.moe import MoE, RouterStats


@dataclass
class LayerStats:
    """Training statistics of one decoder layer call (main layers, then MTP depths)."""

    layer_idx: int
    """Checkpoint layer index (MTP layers are num_hidden_layers + i)."""
    mtp_depth: int | None = None
    """None for main layers, else the MTP step (0, 1, ...) that produced these stats."""
    router: RouterStats | None = None
    """Router scores, choices and per-expert load (MoE layers only)."""
    indexer_loss: torch.Tensor | None = None
    """KL(attention || indexer), differentiable w.r.t. the indexer only (layers with their own indexer)."""


@dataclass
class GLM5Output:
    logits: torch.Tensor | None
    """[B, T, vocab] (or the last `num_logits_to_keep` positions); None when the forward was given `targets`."""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """Depth d: [B, T, vocab]; position t predicts token t + d + 2 (positions past the end are padding)."""
    lm_loss_sum: torch.Tensor | None = None
    """With `targets`: the summed cross-entropy of the LM head (fp32 scalar), in place of the logits."""
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)
    """With `mtp_targets`: the summed cross-entropy of each MTP depth, in place of its logits."""
    hidden_states: torch.Tensor | None = None
    """Final-norm output of the main model [B, T, D] (what the MTP module consumes), when asked."""
    stats: list[LayerStats] = field(default_factory=list)
    """Per-layer router/indexer statistics, when asked."""


class DecoderLayer(nn.Module):
    """Pre-norm block: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)); FFN is MoE after the first dense layers."""

    def __init__(self, cfg: GLM5Config, layer_idx: int, has_indexer: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx, has_indexer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, rope, pos, opts, cache=None, prev_topk=None, want_stats=False):
        a, topk_idx, idx_loss = self.self_attn(
            self.input_layernorm(h), rope, pos, opts, cache, prev_topk, want_stats
        )
        h = h + a
        x = self.post_attention_layernorm(h)
        router = None
        if isinstance(self.mlp, MoE):
            m, router = self.mlp(x, want_stats)
        else:
            m = self.mlp(x)
        stats = LayerStats(self.layer_idx, router=router, indexer_loss=idx_loss) if want_stats else None
        return h + m, topk_idx, stats


class SharedHead(nn.Module):
    """The MTP module's final norm (`shared_head.norm`); the head matrix itself is the main model's lm_head."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    """Multi-token prediction (DeepSeek-V3 style): u = Layer(eh_proj([RMSNorm(emb(t+1)); RMSNorm(h_t)])).

    A complete decoder layer (MLA with its own indexer + MoE) plus enorm, hnorm, eh_proj and shared_head.norm;
    the embedding and the LM head are shared with the main model. Applied recursively (shared parameters)
    for depth > 1, as GLM-5 trains it.
    """

    def __init__(self, cfg: GLM5Config, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, has_indexer=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, next_emb, rope, pos, opts, cache=None, want_stats=False):
        u = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h_prev)], dim=-1))  # embedding first
        return super().forward(u, rope, pos, opts, cache, None, want_stats)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim); on the meta device (loading builds the model there) without its own normal_
    init, which on meta goes through torch._refs and imports torch._dynamo: ~1 s and ~68 MB of resident
    Python modules in a process that only loads a checkpoint. Elsewhere unchanged (same random stream)."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class GLM5Model(nn.Module):
    """Embedding, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size)
        types = cfg.indexer_types
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, types[i] == "full") for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GLM5ForCausalLM(nn.Module):
    """GLM-5 causal LM on a single device. Parallelism, compilation and quantisation wrap it from outside."""

    def __init__(self, cfg: GLM5Config, attention: AttentionOptions | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.attention = attention or AttentionOptions()
        self.model = GLM5Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + i) for i in range(cfg.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # --- set-up ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases (no-op on the meta device)."""
        if self.lm_head.weight.is_meta:  # nothing to fill (and normal_ on meta would import torch._dynamo)
            return
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, MoE):
                module.gate.weight.normal_(0.0, std)
                module.gate.e_score_correction_bias.zero_()
                module.experts.gate_up_proj.normal_(0.0, std)
                module.experts.down_proj.normal_(0.0, std)
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()

    def configure_attention(self, **changes) -> AttentionOptions:
        """Change run-time attention options (impl="sparse"|"mask", dsa=True|False, query_chunk=...)."""
        self.attention = AttentionOptions(**{**self.attention.__dict__, **changes})
        return self.attention

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self, include_mtp: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if include_mtp or not n.startswith("mtp."))

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LatentCache | None = None,
        *,
        mtp_depth: int = 0,
        return_stats: bool = False,
        return_hidden: bool = False,
        num_logits_to_keep: int = 0,
        targets: torch.Tensor | None = None,
        mtp_targets: list[torch.Tensor] | None = None,
    ) -> GLM5Output:
        """input_ids [B, T] -> GLM5Output.

        cache: a LatentCache; it places the new tokens (per row: after what it holds) and advances by T.
        mtp_depth: run the MTP module this many steps (shared parameters) and return their logits.
        return_stats: router and indexer statistics for training (full sequences only, no cache).
        num_logits_to_keep: only the last N positions get main-model logits (0 = all).
        targets, mtp_targets: [B, T] token ids (-100: no loss) for the LM head and for each MTP depth: the
        forward returns the summed cross-entropies (lm_loss_sum, mtp_loss_sums) instead of logits, the head
        fused with the loss in chunks of rows (glm5.model.loss) so the [B, T, vocab] logits never exist.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if mtp_depth and not len(self.mtp):
            raise ValueError("mtp_depth > 0 but this config has num_nextn_predict_layers = 0")
        if (targets is None) != (mtp_targets is None) or (
            mtp_targets is not None and len(mtp_targets) != mtp_depth
        ):
            raise ValueError(
                "pass targets and mtp_targets together, with one mtp_targets entry per MTP depth"
            )
        if targets is not None and (cache is not None or num_logits_to_keep):
            raise ValueError(
                "targets (a fused training loss) take full sequences: no cache, no num_logits_to_keep"
            )
        if mtp_depth and cache is not None:
            raise ValueError(
                "MTP with a KV cache is the engine's job (speculative decoding); call without a cache"
            )
        B, T = input_ids.shape
        if cache is None:
            pos = Positions.shared(0, T, input_ids.device)
            end = T
        else:
            pos, end = cache.begin(T)
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {end} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        opts = self.attention
        h = self.model.embed_tokens(input_ids)
        rope = self.rotary(pos.q_pos, h.dtype)  # [P, T, R/2]: broadcast over batch (and heads)

        stats: list[LayerStats] = []
        topk_idx = None
        for layer in self.model.layers:
            h, topk_idx, layer_stats = layer(h, rope, pos, opts, cache, topk_idx, return_stats)
            if layer_stats is not None:
                stats.append(layer_stats)
        hidden = self.model.norm(h)
        out = GLM5Output(logits=None, hidden_states=hidden if return_hidden else None, stats=stats)
        if targets is not None:
            out.lm_loss_sum = linear_cross_entropy(hidden, self.lm_head.weight, targets)
        else:
            out.logits = self.lm_head(hidden[:, -num_logits_to_keep:] if num_logits_to_keep else hidden)

        # MTP depth d at position t sees h_t and the embedding of token t+d+1, and predicts token t+d+2.
        # Depth 0 takes the main model's final-norm output (as vLLM feeds it); later depths take the
        # previous depth's output before shared_head.norm.
        h_prev = hidden
        for d in range(mtp_depth):
            shifted = F.pad(input_ids[:, d + 1 :], (0, min(d + 1, T)), value=self.config.pad_token_id or 0)
            target = None if mtp_targets is None else mtp_targets[d]
            h_prev, head, layer_stats = self._mtp_step(
                d, h_prev, shifted, rope, pos, None, return_stats, target
            )
            (out.mtp_logits if target is None else out.mtp_loss_sums).append(head)
            if layer_stats is not None:
                layer_stats.mtp_depth = d
                stats.append(layer_stats)
        if cache is not None:
            cache.advance(T)
        return out

    def _mtp_step(self, depth, h_prev, next_ids, rope, pos, cache, want_stats, target=None):
        """-> (MTP output, its logits or, given `target`, their summed cross-entropy, layer stats)."""
        # one module, applied recursively (shared parameters)
        module = self.mtp[min(depth, len(self.mtp) - 1)]
        h, _, stats = module(
            h_prev, self.model.embed_tokens(next_ids), rope, pos, self.attention, cache, want_stats
        )
        normed = module.shared_head.norm(h)
        if target is not None:
            return h, linear_cross_entropy(normed, self.lm_head.weight, target), stats
        return h, self.lm_head(normed), stats

    def mtp_forward(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache | None = None, depth: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP step for speculative decoding: (h_t, token t+1) -> (MTP output h'_t, logits for token t+2).

        hidden [B,T,D]: the main model's final-norm output (depth 0) or the previous step's MTP output;
        next_ids [B,T]: the token following each position. `cache` holds the MTP layer's own latent entries
        (layer index num_hidden_layers + i), separate from the main model's cache, and advances by T.
        """
        if not len(self.mtp):
            raise ValueError("this config has num_nextn_predict_layers = 0: there is no MTP module")
        T = next_ids.shape[1]
        pos = Positions.shared(0, T, next_ids.device) if cache is None else cache.begin(T)[0]
        rope = self.rotary(pos.q_pos, hidden.dtype)
        h, logits, _ = self._mtp_step(depth, hidden, next_ids, rope, pos, cache, False)
        if cache is not None:
            cache.advance(T)
        return h, logits

    # --- checkpoints (names and files live in glm5.checkpoint) --------------------------------------
    def hf_state_dict(self, fused_experts: bool = False) -> dict[str, torch.Tensor]:
        """This model's weights under the published HF names (per-expert keys unless fused_experts)."""
        return to_hf_state_dict(self.state_dict(), self.config, fused_experts=fused_experts)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        fp8: str = "dequantize",
        on_filled: Callable[[nn.Module, str], None] | None = None,
    ) -> GLM5ForCausalLM:
        """Load a checkpoint folder (config.json + safetensors shards, BF16 or block-FP8), streaming.

        dtype: of the weights (default: config.json's); routers stay fp32. fp8: "dequantize" (e4m3 weights
        become `dtype`) or "keep" (e4m3 weights stay in memory, about half the bytes; see glm5.model.fp8).
        on_filled(model, module_path): called as each module's tensors are all read (see load_pretrained).
        Raises glm5.checkpoint.files.CheckpointError (a ValueError) naming the file and tensor on bad input.
        """
        prepare = quantize_model if fp8 == "keep" else None
        return pretrained.load_pretrained(
            path, cls, dtype=dtype, device=device, fp8=fp8, prepare=prepare, on_filled=on_filled
        )

    def save_pretrained(self, path: str, fp8: bool = False, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and size-limited safetensors shards in the published layout (atomically);
        fp8=True writes GLM-5-FP8's block-FP8 split and quantization_config."""
        pretrained.save_pretrained(
            self.state_dict(), self.config, path, fp8=fp8, max_shard_size=max_shard_size
        )

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights named as in the HF checkpoint (per-expert or fused `gate_up_proj` experts)."""
        sd = from_hf_state_dict(hf_sd, self.config, strict=strict)
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("rotary.")]
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
