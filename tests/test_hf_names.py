"""The one name table between glm5 and the published HF checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from configs import CHECKPOINT

from glm5 import GLM5ForCausalLM
from glm5.checkpoint.hf import from_hf_state_dict, hf_to_internal_name, internal_to_hf_name

CFG = CHECKPOINT


@pytest.fixture(scope="module")
def model() -> GLM5ForCausalLM:
    torch.manual_seed(0)
    return GLM5ForCausalLM(CFG)


def test_per_expert_layout_matches_the_published_names(model) -> None:
    sd = model.hf_state_dict()
    layer = "model.layers.1"
    for e in range(CFG.n_routed_experts):
        assert sd[f"{layer}.mlp.experts.{e}.gate_proj.weight"].shape == (
            CFG.moe_intermediate_size,
            CFG.hidden_size,
        )
        assert sd[f"{layer}.mlp.experts.{e}.up_proj.weight"].shape == (
            CFG.moe_intermediate_size,
            CFG.hidden_size,
        )
        assert sd[f"{layer}.mlp.experts.{e}.down_proj.weight"].shape == (
            CFG.hidden_size,
            CFG.moe_intermediate_size,
        )
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(sd[f"{layer}.mlp.experts.2.gate_proj.weight"], fused[2, : CFG.moe_intermediate_size])
    assert torch.equal(sd[f"{layer}.mlp.experts.2.up_proj.weight"], fused[2, CFG.moe_intermediate_size :])
    # MTP is layer num_hidden_layers, without its own embedding or head
    mtp = [k for k in sd if k.startswith("model.layers.3.")]
    assert "model.layers.3.eh_proj.weight" in mtp and "model.layers.3.shared_head.norm.weight" in mtp
    assert "model.layers.3.enorm.weight" in mtp and "model.layers.3.hnorm.weight" in mtp
    assert not any("embed_tokens" in k or "shared_head.head" in k for k in mtp)
    # shared IndexCache layer 2 ships no indexer
    assert not any(k.startswith("model.layers.2.self_attn.indexer") for k in sd)
    assert not any(k.startswith("mtp.") for k in sd)


def test_tensor_count_follows_the_published_formula(model) -> None:
    """Dense layer 17 tensors, MoE layer 3E + 19 (787 for E = 256), shared-index MoE 3E + 14, MTP +4, globals 3
    (docs/model.md § Checkpoint tensor names)."""
    E = CFG.n_routed_experts
    attention, indexer, norms, router, shared = 7, 5, 2, 2, 3
    dense = norms + attention + indexer + 3
    moe_full = 3 * E + router + shared + norms + attention + indexer
    moe_shared = moe_full - indexer
    assert 3 * 256 + router + shared + norms + attention + indexer == 787
    expected = 3 + dense + moe_full + moe_shared + (moe_full + 4)
    assert len(model.hf_state_dict()) == expected


def test_round_trip_per_expert_and_fused_forms(model) -> None:
    for fused in (False, True):
        torch.manual_seed(1)
        other = GLM5ForCausalLM(CFG)
        other.load_hf_state_dict(model.hf_state_dict(fused_experts=fused))
        for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name


def test_names_map_both_ways() -> None:
    assert (
        internal_to_hf_name("mtp.0.self_attn.q_a_proj.weight", CFG)
        == "model.layers.3.self_attn.q_a_proj.weight"
    )
    assert hf_to_internal_name("model.layers.3.eh_proj.weight", CFG) == "mtp.0.eh_proj.weight"
    assert hf_to_internal_name("model.layers.2.mlp.gate.weight", CFG) == "model.layers.2.mlp.gate.weight"
    # copies of the shared embedding/head some MTP loaders write, and MTP layers the config lacks, are skipped
    assert hf_to_internal_name("model.layers.3.embed_tokens.weight", CFG) is None
    assert hf_to_internal_name("model.layers.3.shared_head.head.weight", CFG) is None
    assert hf_to_internal_name("model.layers.4.eh_proj.weight", CFG) is None
    no_mtp = CFG.replace(num_nextn_predict_layers=0)
    assert hf_to_internal_name("model.layers.3.eh_proj.weight", no_mtp) is None


def test_loading_into_a_model_without_mtp_ignores_layer_n(model) -> None:
    target = GLM5ForCausalLM(CFG.replace(num_nextn_predict_layers=0))
    target.load_hf_state_dict(model.hf_state_dict())
    assert torch.equal(target.lm_head.weight, model.lm_head.weight)


def test_bad_checkpoints_raise_naming_the_tensor(model) -> None:
    sd = model.hf_state_dict()
    missing = dict(sd)
    del missing["model.layers.1.mlp.experts.3.down_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight"):
        from_hf_state_dict(missing, CFG)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.fancy.weight'"):
        from_hf_state_dict(dict(sd, **{"model.layers.0.mlp.fancy.weight": torch.zeros(1)}), CFG)
    with pytest.raises(ValueError, match="out of range"):
        from_hf_state_dict(dict(sd, **{"model.layers.1.mlp.experts.9.up_proj.weight": torch.zeros(1)}), CFG)
    incomplete = {k: v for k, v in sd.items() if k != "model.layers.0.self_attn.o_proj.weight"}
    with pytest.raises(ValueError, match="o_proj"):
        GLM5ForCausalLM(CFG).load_hf_state_dict(incomplete)
