"""glm5 against the reference, HF transformers' GlmMoeDsaForCausalLM, on identical random weights."""

from __future__ import annotations

import pytest
import torch

from glm5 import GLM5Config, GLM5ForCausalLM

transformers = pytest.importorskip("transformers")

BASE = GLM5Config.from_preset("bench-tiny")

CONFIGS = {
    # IndexCache shared layer + group-limited routing.
    "shared-layer+groups": BASE.replace(
        num_hidden_layers=3, index_topk=16, index_topk_pattern="FSF", n_group=4, topk_group=2
    ),
    # Odd sizes, freq/offset IndexCache rule, 2 shared experts, unnormalised top-k weights.
    "odd-dims+freq": BASE.replace(
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=4,
        intermediate_size=160,
        num_attention_heads=3,
        num_key_value_heads=3,
        q_lora_rank=48,
        kv_lora_rank=40,
        qk_nope_head_dim=24,
        qk_rope_head_dim=8,
        v_head_dim=20,
        index_n_heads=3,
        index_head_dim=16,
        index_topk=8,
        index_topk_freq=2,
        index_skip_topk_offset=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        routed_scaling_factor=1.7,
        rope_theta=10_000.0,
    ),
    # No dense layers, 8 groups keep 3, larger top-k.
    "all-moe+8-groups": BASE.replace(
        num_hidden_layers=2,
        first_k_dense_replace=0,
        index_topk=24,
        n_group=8,
        topk_group=3,
        num_experts_per_tok=6,
    ),
}


def build_pair(cfg: GLM5Config, seed: int = 0):
    torch.manual_seed(seed)
    ours = GLM5ForCausalLM(cfg).eval()
    for module in ours.modules():  # a non-zero router bias, so bias-corrected selection is exercised
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.05)
    hf_cfg = transformers.GlmMoeDsaConfig(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    assert hf_cfg.indexer_types == cfg.indexer_types
    ref = transformers.GlmMoeDsaForCausalLM(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(ours.hf_state_dict(fused_experts=True), strict=False)
    assert not missing and not unexpected
    return ours, ref


def capture_topk(ours, ref):
    """Forward hooks that record each layer's top-k indices (ours: output[1], HF attention: output[2])."""
    got: dict[str, list] = {"ours": [], "ref": []}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, i, o: got["ours"].append(o[1]))
        for layer in ours.model.layers
    ]
    hooks += [
        layer.self_attn.register_forward_hook(lambda m, i, o: got["ref"].append(o[2]))
        for layer in ref.model.layers
    ]
    return got, hooks


def visible_sets(idx: torch.Tensor, b: int, t: int) -> set[int]:
    return {int(i) for i in idx[b, t] if int(i) <= t}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["sparse", "mask"])
def test_logits_and_topk_sets_match_transformers(name: str, impl: str) -> None:
    cfg = CONFIGS[name]
    ours, ref = build_pair(cfg)
    ours.configure_attention(impl=impl)
    # shorter than index_topk (exactly dense), and long enough (> 4 x index_topk) for the sparse-gather path
    for seq_len in (cfg.index_topk - 3, 5 * cfg.index_topk + 5):
        ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
        got, hooks = capture_topk(ours, ref)
        with torch.no_grad():
            ref_logits = ref(ids).logits
            our_logits = ours(ids).logits
        for h in hooks:
            h.remove()
        err = (ref_logits - our_logits).abs().max().item()
        assert err <= 1e-4, f"{name} T={seq_len}: max |logits diff| = {err:.3g}"
        for layer, (mine, theirs) in enumerate(zip(got["ours"], got["ref"])):
            if seq_len <= cfg.index_topk:
                assert mine is None  # every key selected: exactly dense attention, no indexer needed
                continue
            for b in range(2):
                for t in range(seq_len):
                    assert visible_sets(mine, b, t) == visible_sets(theirs, b, t), (name, layer, b, t)


def test_dense_warmup_indexer_loss_matches_kl_of_reference_attention() -> None:
    """With DSA off, p = head-mean of the reference's attention probabilities; KL(p || softmax(I)) by hand."""
    cfg = CONFIGS["shared-layer+groups"]
    ours, ref = build_pair(cfg)
    ours.configure_attention(dsa=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    out = ours(ids, return_stats=True)
    layer0 = ref.model.layers[0]
    with torch.no_grad():
        attn = ref(ids, output_attentions=True).attentions[0]  # [B,H,T,S] (T <= topk: dense)
        p = attn.float().mean(1)
        h = layer0.input_layernorm(ref.model.embed_tokens(ids))
        sa = layer0.self_attn
        c_q = sa.q_a_layernorm(sa.q_a_proj(h))
        # naive indexer scores with interleaved RoPE on the first rope dims
        ix = sa.indexer
        pos = torch.arange(12)
        inv = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.qk_rope_head_dim, 2).float() / cfg.qk_rope_head_dim)
        )
        ang = pos[:, None].float() * inv

        def rope(v):  # v [..., T, (H), R] in interleaved pairs; returns interleaved
            r = v[..., : cfg.qk_rope_head_dim]
            ev, od = r[..., 0::2], r[..., 1::2]
            c, s = ang.cos(), ang.sin()
            if v.dim() == 4:
                c, s = c[:, None], s[:, None]
            rot = torch.stack([ev * c - od * s, od * c + ev * s], -1).flatten(-2)
            return torch.cat([rot, v[..., cfg.qk_rope_head_dim :]], -1)

        q = rope(ix.wq_b(c_q).view(1, 12, cfg.index_n_heads, cfg.index_head_dim))
        k = rope(ix.k_norm(ix.wk(h)))
        w = ix.weights_proj(h) * cfg.index_n_heads**-0.5
        s = torch.relu(torch.einsum("bthd,bsd->bths", q, k) * cfg.index_head_dim**-0.5)
        index = torch.einsum("bth,bths->bts", w, s)
        index = index.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
        log_q = torch.log_softmax(index, -1)
        expected = (torch.xlogy(p, p) - p * log_q.masked_fill(p == 0, 0.0)).sum(-1).mean()
    got = out.stats[0].indexer_loss
    assert torch.allclose(got, expected, atol=1e-5), (got.item(), expected.item())
