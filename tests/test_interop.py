"""Checkpoint interop with HF transformers (GlmMoeDsaForCausalLM, a test-only reference), both directions."""

from __future__ import annotations

import warnings

import torch
from conftest import require

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.checkpoint.files import CheckpointFolder

transformers = require("transformers", "the HF reference implementation")

# Two MoE layers (one IndexCache-shared), a dense layer, MTP, odd widths; index_topk below the test length so
# the sparse path runs.
CFG = GLM5Config.from_preset("tiny").replace(
    vocab_size=160,
    hidden_size=48,
    num_hidden_layers=3,
    intermediate_size=80,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=24,
    kv_lora_rank=20,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    index_n_heads=2,
    index_head_dim=8,
    index_topk=6,
    index_topk_pattern="FFS",
    n_routed_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)


def _ours(seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(CFG).eval()
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def _ids(length: int = 14) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))


def _hf_reference(model: GLM5ForCausalLM):
    """transformers' model on the same weights, loaded from memory (not through any file)."""
    config = transformers.GlmMoeDsaConfig(**CFG.to_hf_config())
    ref = transformers.GlmMoeDsaForCausalLM(config).eval()
    mtp = f"model.layers.{CFG.num_hidden_layers}."  # transformers has no MTP module
    sd = {k: v for k, v in model.hf_state_dict(fused_experts=True).items() if not k.startswith(mtp)}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    return ref


@torch.no_grad()
def test_glm5_save_pretrained_loads_in_transformers_with_identical_logits(tmp_path) -> None:
    ours = _ours()
    ours.save_pretrained(tmp_path, max_shard_size="40KB")  # sharded, experts across shards
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = _ids()
    from_disk = hf(x).logits
    assert torch.equal(from_disk, _hf_reference(ours)(x).logits)  # the files hold exactly our weights
    assert torch.equal(
        hf.model.layers[1].mlp.gate.e_score_correction_bias,
        ours.model.layers[1].mlp.gate.e_score_correction_bias,
    )
    err = (from_disk - ours(x).logits).abs().max().item()
    assert err <= 1e-5, err


@torch.no_grad()
def test_transformers_save_pretrained_loads_in_glm5_with_identical_logits(tmp_path) -> None:
    ref = _hf_reference(_ours(seed=1))
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = GLM5ForCausalLM.from_pretrained(tmp_path)
    # transformers does not keep the MTP layer: glm5 says so and loads the main model
    assert any("no MTP layer" in str(w.message) for w in caught)
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
    x = _ids()
    err = (ours(x).logits - ref(x).logits).abs().max().item()
    assert err <= 1e-5, err
    # and glm5 writes it back in the published layout transformers reads again, bit for bit
    ours.save_pretrained(tmp_path / "again")
    again = transformers.GlmMoeDsaForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    assert torch.equal(again(x).logits, ref(x).logits)


def test_transformers_and_glm5_write_the_same_tensor_names_shapes_and_dtypes(tmp_path) -> None:
    ours = _ours()
    ours.save_pretrained(tmp_path / "glm5")
    _hf_reference(ours).save_pretrained(tmp_path / "hf")
    mine = CheckpointFolder(tmp_path / "glm5").tensors
    theirs = CheckpointFolder(tmp_path / "hf").tensors
    main_model = {
        n: (t.shape, t.dtype)
        for n, t in mine.items()
        if not n.startswith(f"model.layers.{CFG.num_hidden_layers}.")
    }
    assert main_model == {n: (t.shape, t.dtype) for n, t in theirs.items()}
