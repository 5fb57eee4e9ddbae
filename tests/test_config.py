"""GLM5Config: published values, presets, HF config.json round trips and validation."""

from __future__ import annotations

import json

import pytest
from conftest import require

from glm5 import GLM5Config

# The published GLM-5.1 config.json (same architecture as GLM-5), as transformers writes it, abridged to the
# keys that matter plus some of the keys glm5 does not model.
PUBLISHED = {
    "architectures": ["GlmMoeDsaForCausalLM"],
    "model_type": "glm_moe_dsa",
    "dtype": "bfloat16",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "eos_token_id": [154820, 154827, 154829],
    "first_k_dense_replace": 3,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "index_head_dim": 128,
    "index_n_heads": 32,
    "index_topk": 2048,
    "indexer_rope_interleave": True,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "kv_lora_rank": 512,
    "max_position_embeddings": 202752,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 78,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 1,
    "pad_token_id": 154820,
    "q_lora_rank": 2048,
    "qk_head_dim": 256,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_interleave": True,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "transformers_version": "5.2.0.dev0",
    "use_cache": True,
    "v_head_dim": 256,
    "vocab_size": 154880,
    "id2label": {"0": "LABEL_0"},
}


def test_glm5_preset_has_the_published_values() -> None:
    cfg = GLM5Config.from_preset("glm-5")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (6144, 78, 154_880)
    assert (
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
    ) == (2048, 512, 192, 64, 256)
    assert cfg.rope_theta == 1e6 and cfg.rope_interleave and cfg.indexer_rope_interleave
    assert cfg.softmax_scale == 1 / 16
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (32, 128, 2048)
    assert cfg.indexer_types == ["full"] * 78
    assert cfg.eos_token_id == [154_820, 154_827, 154_829]
    assert GLM5Config.from_hf_config(PUBLISHED).to_hf_config() == GLM5Config.from_preset(
        "glm-5"
    ).to_hf_config() | {
        k: v
        for k, v in PUBLISHED.items()
        if k in ("attention_dropout", "transformers_version", "use_cache", "id2label")
    }


def test_glm5_2_preset_uses_index_cache() -> None:
    cfg = GLM5Config.from_preset("glm-5.2")
    full = [i for i, t in enumerate(cfg.indexer_types) if t == "full"]
    assert full == [0, 1, 2] + list(range(6, 78, 4)) and len(full) == 21
    assert cfg.rope_theta == 8e6 and cfg.max_position_embeddings == 1_048_576


def test_indexer_types_agree_with_transformers_rule() -> None:
    transformers = require("transformers", "the HF config reference")
    for preset in ("glm-5", "glm-5.2"):
        cfg = GLM5Config.from_preset(preset)
        assert transformers.GlmMoeDsaConfig(**cfg.to_hf_config()).indexer_types == cfg.indexer_types


def test_published_config_round_trips_and_keeps_unknown_keys(tmp_path) -> None:
    cfg = GLM5Config.from_hf_config(PUBLISHED)
    assert cfg.extra == {
        "attention_dropout": 0.0,
        "transformers_version": "5.2.0.dev0",
        "use_cache": True,
        "id2label": {"0": "LABEL_0"},
    }
    out = cfg.to_hf_config()
    for key, value in PUBLISHED.items():
        if key == "rope_parameters":
            assert out[key] == {"rope_theta": 1e6, "rope_type": "default"}
        else:
            assert out[key] == value, key
    cfg.save(tmp_path)
    again = GLM5Config.from_hf_config(tmp_path)  # a folder with config.json
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "glm_moe_dsa"


def test_every_preset_round_trips() -> None:
    for name in ("glm-5", "glm-5.2", "tiny", "bench-tiny", "small"):
        cfg = GLM5Config.from_preset(name)
        assert GLM5Config.from_hf_config(cfg.to_hf_config()) == cfg, name


def test_indexer_types_list_from_transformers_is_read_back() -> None:
    d = dict(PUBLISHED, num_hidden_layers=4, indexer_types=["full", "shared", "shared", "full"])
    assert GLM5Config.from_hf_config(d).indexer_types == ["full", "shared", "shared", "full"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -4}, "kv_lora_rank"),
        ({"q_lora_rank": 12.5}, "q_lora_rank"),
        ({"num_attention_heads": "64"}, "num_attention_heads"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"index_topk": 0}, "index_topk"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"rope_interleave": "yes"}, "rope_interleave"),
        ({"index_topk_pattern": "FSX"}, "index_topk_pattern"),
        ({"index_head_dim": 32}, "index_head_dim"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ],
)
def test_invalid_values_raise_naming_the_field(change, field) -> None:
    with pytest.raises(ValueError, match=field):
        GLM5Config.from_hf_config(dict(PUBLISHED, **change))


def test_bad_files_and_presets_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        GLM5Config.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GLM5Config.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        GLM5Config.from_preset("glm-6")
    with pytest.raises(ValueError, match="model_type"):
        GLM5Config.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="rope_type"):
        GLM5Config.from_hf_config(dict(PUBLISHED, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="qk_head_dim"):
        GLM5Config.from_hf_config(dict(PUBLISHED, qk_head_dim=192))
