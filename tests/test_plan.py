"""glm5.plan: parameter, memory and KV-cache accounting against a closed form (docs/model.md § Parameter accounting)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from glm5.config import GLM5Config
from glm5.model import GLM5ForCausalLM
from glm5.plan import (
    COMPONENTS,
    ParamTable,
    TensorEntry,
    format_table,
    human_bytes,
    human_count,
    parameter_table,
)
from glm5.plan.accounting import _component, _fp8_matrix_bytes

GLM5_MAIN = 743_911_199_232
GLM5_WITH_MTP = 753_864_119_552
INDEXER_PARAMS = 9_371_904  # one DSA indexer (docs/model.md § Parameter accounting)


@pytest.fixture(scope="module")
def glm5() -> ParamTable:
    return parameter_table(GLM5Config.from_preset("glm-5"))


@pytest.fixture(scope="module")
def glm52() -> ParamTable:
    return parameter_table(GLM5Config.from_preset("glm-5.2"))


def building_blocks(cfg: GLM5Config) -> dict[str, int]:
    """Per-layer building blocks (docs/model.md § Parameter accounting), written out from the tensor shapes."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    mla = (
        D * cfg.q_lora_rank
        + cfg.q_lora_rank  # q_a_proj + q_a_layernorm
        + cfg.q_lora_rank * H * cfg.qk_head_dim  # q_b_proj
        + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank  # kv_a_proj + its norm
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_b_proj
        + H * cfg.v_head_dim * D  # o_proj
    )
    indexer = (
        cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim  # wq_b
        + D * cfg.index_head_dim
        + 2 * cfg.index_head_dim  # wk + k_norm weight/bias
        + D * cfg.index_n_heads  # weights_proj
    )
    expert = 3 * D * cfg.moe_intermediate_size
    router = cfg.n_routed_experts * D
    shared = cfg.n_shared_experts * expert
    norms = 2 * D
    return {
        "mla": mla,
        "indexer": indexer,
        "expert": expert,
        "router": router,
        "dense_layer_no_indexer": mla + 3 * D * cfg.intermediate_size + norms,
        "moe_layer_no_indexer": mla + cfg.n_routed_experts * expert + shared + router + norms,
        "mtp_glue": 2 * D * D + 3 * D,  # eh_proj + enorm, hnorm, shared_head.norm
    }


def closed_form_total(cfg: GLM5Config, include_mtp: bool) -> int:
    b = building_blocks(cfg)
    dense = cfg.first_k_dense_replace
    layers = dense * b["dense_layer_no_indexer"] + (cfg.num_hidden_layers - dense) * b["moe_layer_no_indexer"]
    layers += cfg.indexer_types.count("full") * b["indexer"]
    total = layers + 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size  # embed + lm_head + final norm
    if include_mtp:
        total += cfg.num_nextn_predict_layers * (b["moe_layer_no_indexer"] + b["indexer"] + b["mtp_glue"])
    return total


def test_closed_form_building_blocks_equal_model_spec_section_13():
    b = building_blocks(GLM5Config.from_preset("glm-5"))
    assert b["mla"] == 165_022_208
    assert b["indexer"] == INDEXER_PARAMS
    assert b["expert"] == 37_748_736
    assert b["router"] == 1_572_864
    assert b["dense_layer_no_indexer"] + b["indexer"] == 400_898_816
    assert b["moe_layer_no_indexer"] + b["indexer"] == 9_877_404_416


def test_glm5_main_model_has_exactly_743_911_199_232_parameters(glm5):
    assert glm5.total_main == GLM5_MAIN
    assert closed_form_total(glm5.config, include_mtp=False) == GLM5_MAIN


def test_glm5_with_mtp_has_753_864_119_552_parameters(glm5):
    assert glm5.total_with_mtp == GLM5_WITH_MTP
    assert glm5.mtp_params == 9_952_920_320
    assert closed_form_total(glm5.config, include_mtp=True) == GLM5_WITH_MTP


def test_glm5_components_match_the_model_spec_table(glm5):
    expected = {
        "routed_experts": 75 * 256 * 37_748_736,
        "attention": 78 * 165_022_208,
        "shared_experts": 75 * 37_748_736,
        "embed_tokens": 154_880 * 6144,
        "lm_head": 154_880 * 6144,
        "indexers": 78 * INDEXER_PARAMS,
        "dense_mlp": 3 * 3 * 6144 * 12_288,
        "routers": 75 * 256 * 6144,
        "norms": (2 * 78 + 1) * 6144,
        "mtp_glue": 0,
    }
    assert {c: glm5.component_params(c) for c in COMPONENTS} == expected
    assert sum(expected.values()) == GLM5_MAIN
    assert glm5.num_router_bias == 76 * 256  # 75 MoE layers + the MTP layer, fp32 buffers, not parameters


def test_glm5_active_parameters_per_token(glm5):
    assert glm5.active_no_embed == 39_881_544_192  # 39.882 B (docs/model.md § Parameter accounting)
    assert glm5.active_with_head == 40_833_126_912  # 40.833 B
    assert glm5.mtp_active == 591_233_792  # 0.591 B per MTP draft step
    routed_inactive = 75 * (256 - 8) * 37_748_736
    assert glm5.active_no_embed == GLM5_MAIN - 2 * 154_880 * 6144 - routed_inactive


def test_glm5_bf16_bytes_match_model_spec(glm5):
    assert glm5.bf16_bytes() == 2 * GLM5_MAIN + 4 * 75 * 256  # params in BF16 + fp32 router biases
    assert round(glm5.bf16_bytes() / 1e9, 1) == 1487.8
    assert round(glm5.bf16_bytes() / 2**30, 1) == 1385.6
    assert glm5.bf16_bytes(include_mtp=True) == 1_507_728_316_928  # docs/model.md § Checkpoint tensor names


def test_glm5_fp8_bytes_reproduce_the_published_split_exactly(glm5):
    assert glm5.fp8_bytes(include_mtp=True) == 756_162_687_872  # docs/model.md § FP8 block format
    assert glm5.fp8_bytes() == 746_130_054_912
    assert round(glm5.fp8_bytes() / 1e9, 1) == 746.1


def test_glm5_kv_cache_per_token(glm5):
    assert glm5.num_indexer_layers == 78
    assert glm5.kv_bytes_per_token() == 78 * (576 * 2 + 128 * 2) == 109_824
    assert glm5.kv_bytes_per_token(fp8_indexer=True) == 78 * (576 * 2 + 128 + 4)
    assert glm5.kv_bytes() == 109_824 * 202_752
    assert glm5.kv_bytes(num_tokens=10) == 1_098_240


def test_glm52_ships_21_indexers_and_is_smaller_by_57_indexers(glm5, glm52):
    assert glm52.num_indexer_layers == 21
    assert glm52.total_main == GLM5_MAIN - 57 * INDEXER_PARAMS
    assert glm52.total_main == closed_form_total(glm52.config, include_mtp=False)
    assert glm52.mtp_params == glm5.mtp_params  # the MTP layer keeps its indexer
    assert glm52.active_no_embed == glm5.active_no_embed - 57 * INDEXER_PARAMS


def test_glm52_fp8_bytes_equal_the_published_total_size(glm52):
    # docs/model.md § FP8 block format: metadata.total_size of GLM-5.2-FP8's model.safetensors.index.json
    assert glm52.fp8_bytes(include_mtp=True) == 755_617_140_416
    assert glm52.kv_bytes_per_token() == 78 * 1152 + 21 * 256


@pytest.mark.parametrize("preset", ["tiny", "bench-tiny", "small"])
def test_small_presets_agree_with_the_real_model_and_the_closed_form(preset):
    cfg = GLM5Config.from_preset(preset)
    table = parameter_table(cfg)
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    assert table.total_main == model.num_parameters(include_mtp=False) == closed_form_total(cfg, False)
    assert table.total_with_mtp == model.num_parameters(include_mtp=True) == closed_form_total(cfg, True)
    assert sum(table.component_params(c) for c in COMPONENTS) == table.total_main


def test_tiny_exact_counts():
    table = parameter_table(GLM5Config.from_preset("tiny"))
    assert (table.total_main, table.total_with_mtp) == (10_226_944, 12_187_392)
    assert table.config.num_nextn_predict_layers == 1 and table.mtp_params == 1_960_448
    # 3 MoE layers of 16 experts, 4 active, each expert 3 * 256 * 128
    assert table.active_no_embed == table.total_main - 2 * 8192 * 256 - 3 * (16 - 4) * 3 * 256 * 128


def test_fp8_scale_grid_rounds_up_edge_blocks():
    assert _fp8_matrix_bytes(576, 6144) == 576 * 6144 + 4 * 5 * 48  # kv_a_proj_with_mqa: 5 x 48 scales
    assert _fp8_matrix_bytes(128, 6144) == 128 * 6144 + 4 * 1 * 48  # indexer wk: 1 x 48


def test_fused_gate_up_gets_one_scale_grid_per_matrix():
    # F = 192: each of gate and up has ceil(192/128) = 2 scale rows; a fused [384, D] grid would have 3.
    entry = TensorEntry(
        "model.layers.1.mlp.experts.gate_up_proj", (4, 384, 256), "routed_experts", False, False
    )
    assert entry.fp8_bytes == 4 * 2 * (192 * 256 + 4 * 2 * 2)
    down = TensorEntry("model.layers.1.mlp.experts.down_proj", (4, 256, 192), "routed_experts", False, False)
    assert down.fp8_bytes == 4 * (256 * 192 + 4 * 2 * 2)


def test_unquantised_tensors_stay_bf16_and_biases_fp32():
    kept = [
        ("model.layers.3.mlp.gate.weight", "routers"),
        ("model.layers.0.self_attn.indexer.weights_proj.weight", "indexers"),
        ("model.embed_tokens.weight", "embed_tokens"),
        ("lm_head.weight", "lm_head"),
        ("mtp.0.eh_proj.weight", "mtp_glue"),
    ]
    for name, component in kept:
        entry = TensorEntry(name, (256, 512), component, name.startswith("mtp."), False)
        assert entry.fp8_bytes == entry.bf16_bytes == 256 * 512 * 2, name
    bias = TensorEntry("model.layers.3.mlp.gate.e_score_correction_bias", (256,), "routers", False, True)
    assert bias.fp8_bytes == bias.bf16_bytes == 1024


def test_an_unknown_parameter_name_is_reported_not_silently_counted():
    with pytest.raises(RuntimeError, match="model.layers.0.mystery.weight"):
        _component("model.layers.0.mystery.weight")


def test_parameter_table_keeps_the_callers_config():
    cfg = GLM5Config.from_preset("tiny")
    assert parameter_table(cfg).config is cfg


def test_human_formats():
    assert human_count(GLM5_WITH_MTP) == "753.9B"
    assert human_count(39_881_544_192) == "39.9B"
    assert human_count(951_582_720) == "951.6M"
    assert human_count(9_952_920_320) == "9.95B"
    assert human_count(512) == "512"
    assert human_bytes(1_487_822_475_264) == "1,488 GB"
    assert human_bytes(746_130_054_912) == "746 GB"
    assert human_bytes(22_267_035_648) == "22.3 GB"
    assert human_bytes(22_267_035_648, binary=True) == "20.7 GiB"
    assert human_bytes(100) == "100 B"


def test_format_table_shows_every_headline_figure(glm5):
    console = Console(record=True, width=120)
    console.print(format_table(glm5, title="glm-5"))
    text = console.export_text()
    for needle in [
        "743,911,199,232",
        "753.9B",
        "39.9B",
        "40.8B",
        "1,488 GB",
        "746 GB",
        "756,162,687,872 B",
        "109,824 B",
        "97.43%",
    ]:
        assert needle in text, needle


def test_format_table_without_mtp_modules_has_no_mtp_rows():
    console = Console(record=True, width=120)
    console.print(format_table(parameter_table(GLM5Config.from_preset("bench-tiny"))))
    text = console.export_text()
    assert "MTP" not in text and "total (main model)" in text


# --- part 2: hardware, memory per device, layout, rooflines (`glm5 plan`) -------------------------------------
import json as _json  # noqa: E402
import math  # noqa: E402

from glm5.cli import main as cli_main  # noqa: E402
from glm5.hardware import HARDWARE, get_hardware, hardware_from_dict, load_hardware_file  # noqa: E402
from glm5.plan import (  # noqa: E402
    PlanSettings,
    choose_layout,
    decode_roofline,
    device_memory,
    expected_distinct_experts,
    min_devices_bound,
    plan,
    prefill_flops_per_token,
    weight_bytes,
)

GLM5_FP8 = 746_130_054_912  # main model (docs/model.md § Parameter accounting)
GLM5_BF16 = 2 * GLM5_MAIN + 4 * 75 * 256
# three 2048x6144 e4m3 matrices + a 16 x 48 grid of fp32 scales each
FP8_EXPERT = 3 * (2048 * 6144 + 4 * 16 * 48)
EMBED_BF16 = 154_880 * 6144 * 2
H200_BW = 4.8e12


def kv_per_token_from_config(cfg: GLM5Config) -> int:
    """BF16 MLA latent (kv_lora_rank + rope dims) in every layer + FP8 indexer key with one fp32 scale."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.num_hidden_layers + (
        cfg.index_head_dim + 4
    ) * 78


def test_published_headline_figures_744b_total_40b_active_1490gb_bf16_half_in_fp8(glm5):
    bf16, fp8 = weight_bytes(glm5, "bf16"), weight_bytes(glm5, "fp8")
    assert round(glm5.total_main / 1e9) == 744 and round(glm5.active_no_embed / 1e9) == 40
    assert bf16.total == GLM5_BF16 and round(bf16.total / 1e9) == 1488  # "~1,490 GB"
    assert fp8.total == GLM5_FP8 and 0.49 < fp8.total / bf16.total < 0.51
    assert fp8.per_expert == FP8_EXPERT and bf16.per_expert == 2 * 37_748_736
    assert fp8.routed == 75 * 256 * FP8_EXPERT and fp8.num_moe_layers == 75
    assert fp8.dense_read == GLM5_FP8 - 75 * 256 * FP8_EXPERT - EMBED_BF16
    assert fp8.mtp_total == 756_162_687_872 - GLM5_FP8


def test_plan_memory_and_devices_for_glm5_fp8_on_h200_at_200k_x_32(glm5):
    s = PlanSettings(dtype="fp8", context=200_000, concurrency=32)
    kv = kv_per_token_from_config(glm5.config)
    assert kv == 100_152
    h200 = HARDWARE["h200"]
    assert min_devices_bound(glm5, h200, s) == math.ceil((GLM5_FP8 + kv * 200_000 * 32) / (141e9 * 0.9)) == 11
    devices, tp, memory = choose_layout(glm5, h200, s)
    assert (devices, tp) == (16, 1)  # 8 devices cannot hold it; DP attention keeps the caches unreplicated
    non_expert = GLM5_FP8 - 75 * 256 * FP8_EXPERT
    assert memory.weights == non_expert + 75 * 16 * FP8_EXPERT  # 256 / 16 experts per device
    assert memory.kv_latent == 2 * 200_000 * 1152 * 78  # 32 sequences over 16 DP groups
    assert memory.kv_indexer == 2 * 200_000 * 132 * 78
    assert memory.margin == pytest.approx(14.1e9) and memory.fits
    assert not any(device_memory(glm5, h200, s, 8, t).fits for t in (1, 2, 4, 8))


def test_devices_grow_with_context_concurrency_and_bf16_and_memory_shrinks_with_devices(glm5):
    h200 = HARDWARE["h200"]

    def devices(**kw) -> int:
        return choose_layout(glm5, h200, PlanSettings(**kw))[0]

    contexts = [devices(context=c, concurrency=8) for c in (8_000, 64_000, 200_000)]
    batches = [devices(context=100_000, concurrency=b) for b in (1, 16, 64, 128)]
    assert contexts == sorted(contexts) and batches == sorted(batches) and batches[-1] > batches[0]
    assert devices(dtype="bf16", concurrency=8) >= devices(dtype="fp8", concurrency=8)
    s = PlanSettings(context=50_000, concurrency=16)
    totals = [device_memory(glm5, h200, s, n, 1).total for n in (8, 16, 32, 64)]
    assert totals == sorted(totals, reverse=True)


def test_decode_roofline_by_hand_for_one_user_on_8_h200_with_tp8(glm5):
    s = PlanSettings(dtype="fp8", context=1024, concurrency=1, bandwidth_efficiency=0.5)
    d = decode_roofline(glm5, HARDWARE["h200"], s, devices=8, attn_tp=8)
    non_expert = GLM5_FP8 - 75 * 256 * FP8_EXPERT - EMBED_BF16  # lm_head is read, the embedding is a lookup
    experts = 75 * 8 * FP8_EXPERT  # one token touches its 8 experts per MoE layer
    latents = 78 * 1024 * 1152  # context <= index_topk: every latent, no indexer pass
    expected_bytes = non_expert + experts + latents
    assert sum(d.step_bytes.values()) == pytest.approx(expected_bytes, rel=1e-12)
    assert d.bound == "bandwidth"
    assert d.per_user(1.0) == pytest.approx(8 * H200_BW / expected_bytes, rel=1e-12)
    assert d.per_user() == pytest.approx(0.5 * 8 * H200_BW / expected_bytes, rel=1e-12)


def test_decode_indexer_scans_the_whole_context_above_top_k_and_mtp_multiplies_by_acceptance(glm5):
    h200 = HARDWARE["h200"]
    d = decode_roofline(glm5, h200, PlanSettings(context=100_000, concurrency=4), 8, 8)
    assert d.step_bytes["indexer keys scanned"] == 4 * 100_000 * 132 * 78
    assert d.step_bytes["KV latents gathered (top-k)"] == 4 * 2048 * 1152 * 78
    mtp = decode_roofline(
        glm5, h200, PlanSettings(context=100_000, concurrency=4, mtp_steps=3, mtp_accept=3.5), 8, 8
    )
    assert mtp.per_user(1.0) == pytest.approx(3.5 * 8 * H200_BW / sum(mtp.step_bytes.values()))
    assert mtp.per_user(1.0) > d.per_user(1.0)  # more bytes per step, but 3.5 tokens for each


def test_expected_distinct_experts():
    assert expected_distinct_experts(256, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(256, 8, 2) == pytest.approx(16 - 64 / 256)  # 256 (1 - (31/32)^2)
    assert expected_distinct_experts(256, 8, 10_000) == pytest.approx(256)


def test_prefill_flops_by_hand(glm5):
    n = 1024  # below index_topk: dense causal attention, position t attends to t keys, no indexer
    mla_per_key = 78 * 64 * 2 * (512 + 64 + 512)
    expected = 2 * 39_881_544_192 + 2 * 154_880 * 6144 / n + mla_per_key * (n + 1) / 2
    assert prefill_flops_per_token(glm5, n) == pytest.approx(expected, rel=1e-12)
    n = 10_000  # above: min(2048, t) MLA keys, t indexer keys
    mla_keys = (2048 * 2049 / 2 + (n - 2048) * 2048) / n
    indexer = 78 * 32 * 128 * 2 * (n + 1) / 2
    expected = 2 * 39_881_544_192 + 2 * 154_880 * 6144 / n + mla_per_key * mla_keys + indexer
    assert prefill_flops_per_token(glm5, n) == pytest.approx(expected, rel=1e-12)


def test_plan_cost_and_implied_efficiencies(glm5):
    p = plan(glm5.config, HARDWARE["h200"], PlanSettings(price_per_hour=2.0), preset="glm-5")
    assert p.cost_per_million(p.decode_aggregate) == pytest.approx(2.0 * 16 / 3600 / p.decode_aggregate * 1e6)
    sglang = [r for r in p.implied if r["what"].startswith("SGLang")]
    assert len(sglang) == 2 and all(0.01 < r["implied_efficiency"] < 1 for r in sglang)
    assert sglang[0]["roofline_per_user"] * sglang[0]["implied_efficiency"] == pytest.approx(120)
    zai = next(r for r in p.implied if r["what"].startswith("Z.ai"))
    lo, hi = zai["implied_efficiency_range"]
    assert lo * zai["roofline_per_user"] == pytest.approx(17) and hi * zai[
        "roofline_per_user"
    ] == pytest.approx(19)


def test_hardware_catalog_and_user_defined_devices(tmp_path):
    assert {"h100", "h200", "b200", "ascend-910b", "ascend-910c", "cloudmatrix-384"} <= set(HARDWARE)
    assert get_hardware("910C") is HARDWARE["ascend-910c"] and HARDWARE["cloudmatrix-384"].scale_up == 384
    assert HARDWARE["ascend-910c"].approximate and not HARDWARE["h200"].approximate
    with pytest.raises(ValueError, match="--hardware-file"):
        get_hardware("tpu-v9")
    good = tmp_path / "gpu.json"
    good.write_text(_json.dumps({"name": "mine", "memory_gb": 96, "bandwidth_tbs": 4, "bf16_tflops": 900}))
    hw = load_hardware_file(str(good))
    assert hw.fp8_tflops == 900 and hw.memory == 96e9 and hw.source == "user-defined"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hardware_file(str(bad))
    with pytest.raises(ValueError, match="missing field"):
        hardware_from_dict({"name": "x"})
    with pytest.raises(ValueError, match="memory_gb must be a positive number"):
        hardware_from_dict({"name": "x", "memory_gb": -1, "bandwidth_tbs": 1, "bf16_tflops": 1})


def test_cli_plan_json_and_errors(capsys, tmp_path):
    args = [
        "plan",
        "--preset",
        "glm-5",
        "--hardware",
        "h200",
        "--dtype",
        "fp8",
        "--context",
        "200000",
        "--concurrency",
        "32",
        "--price-per-hour",
        "3",
    ]
    assert cli_main([*args, "--json"]) == 0
    data = _json.loads(capsys.readouterr().out)
    assert data["devices"] == 16 and data["min_devices"] == 11 and data["kv_bytes_per_token"] == 100_152
    assert data["weights"]["total"] == GLM5_FP8 and data["memory_per_device"]["fits"]
    assert cli_main(["plan", "--preset", "glm-5", "--hardware", "910c", "--concurrency", "8"]) == 0
    text = capsys.readouterr().out
    assert "ascend-910c" in text and "746 GB" in text and "implied" in text
    assert cli_main(["plan", "--hardware", "nope"]) == 2
    assert "unknown hardware" in capsys.readouterr().err
    assert cli_main(["plan", "--concurrency", "0"]) == 2
