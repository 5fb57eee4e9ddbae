"""Block FP8 (e4m3, 128x128, fp32 multiplier scales): arithmetic, the published split, and FP8 models.

Error bound of dequant(quant(W)), per element, with s = block amax / 448 (the block's scale_inv):
- W/s lies in [-448, 448]. e4m3 has 3 mantissa bits, so round-to-nearest in the normal range (|W/s| >= 2^-6)
  errs by at most half a unit in the last place: 2^-4 of the value, i.e. |W - W'| <= 2^-4 |W|.
- Below 2^-6 (subnormals) the spacing is 2^-9, so the error is at most 2^-10 in W/s units: 2^-10 s.
So |W - W'| <= 2^-4 |W| + 2^-10 s (+ fp32 rounding of the divide and multiply, ~2^-23 relative).
Per block the worst case is the largest binade of W/s, [256, 448], where the spacing is 32: the error is at
most 16 s = 16 amax / 448 = amax / 28 (~3.6% of the block max, tighter than 2^-4 of it).
"""

from __future__ import annotations

import json

import pytest
import torch

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.checkpoint import fp8
from glm5.checkpoint.files import CheckpointFolder
from glm5.model.fp8 import FP8Experts, FP8Linear, quantize_model, weight_bytes

# Routed experts dominate (~94% of the weights) and every matrix is a whole number of 128x128 blocks.
EXPERT_HEAVY = GLM5Config.from_preset("tiny").replace(
    vocab_size=256,
    hidden_size=256,
    num_hidden_layers=2,
    first_k_dense_replace=0,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=128,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=64,
    index_n_heads=2,
    index_head_dim=64,
    index_topk=16,
    n_routed_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
)
# Every matrix ragged (not a multiple of 128), small enough to run fast.
RAGGED = GLM5Config.from_preset("tiny").replace(
    vocab_size=200,
    hidden_size=160,
    num_hidden_layers=2,
    intermediate_size=200,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=96,
    kv_lora_rank=72,
    qk_nope_head_dim=24,
    qk_rope_head_dim=8,
    v_head_dim=20,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=136,
)


def _model(cfg: GLM5Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg).eval()
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.05)
    return model.to(dtype)


def _ids(cfg: GLM5Config, length: int = 12) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))


# --- arithmetic -----------------------------------------------------------------------------------
def test_dequantised_weights_are_within_the_e4m3_bound_per_block_including_ragged_edges() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)  # 3 x 2 blocks, the last row/column blocks ragged
    w[:128, :128] *= 1e-3  # blocks of very different magnitude, each scaled on its own
    w[256:, 128:] *= 50.0
    w[5, 7] = 0.0
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2)
    back = fp8.dequantize(q, s, torch.float32)
    err = (back - w).abs()
    for bi in range(3):
        for bj in range(2):
            rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            block, block_err = w[rows, cols], err[rows, cols]
            amax = block.abs().max()
            assert torch.allclose(s[bi, bj], amax / 448, rtol=1e-6)  # the scale sees only real elements
            assert block_err.max() <= amax / 28 * (1 + 1e-6)
            bound = 2**-4 * block.abs() + 2**-10 * s[bi, bj] + 2**-22 * amax
            assert (block_err <= bound).all()
    assert back[5, 7] == 0.0


def test_scale_inv_is_a_multiplier_and_edges_are_cropped() -> None:
    q = torch.full((130, 129), 2.0).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5, 3.0], [4.0, 0.25]])
    w = fp8.dequantize(q, scale, torch.float32)
    assert w.shape == (130, 129)
    assert w[0, 0] == 1.0 and w[0, 128] == 6.0 and w[129, 0] == 8.0 and w[129, 128] == 0.5
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        fp8.dequantize(q, torch.ones(1, 1))


def test_stacked_experts_quantise_like_separate_matrices_and_zero_blocks_get_scale_one() -> None:
    w = torch.randn(3, 136, 72, generator=torch.Generator().manual_seed(1))
    w[1] = 0.0
    q, s = fp8.quantize(w)
    assert s.shape == (3, 2, 1)
    for e in range(3):
        qe, se = fp8.quantize(w[e])
        assert torch.equal(q[e].float(), qe.float()) and torch.equal(s[e], se)
    assert torch.equal(s[1], torch.ones(2, 1)) and not fp8.dequantize(q[1], s[1]).any()


def test_the_published_split_of_quantised_and_bf16_tensors() -> None:
    quantised = [
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.5.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.indexer.wq_b.weight",
        "model.layers.0.self_attn.indexer.wk.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.shared_experts.down_proj.weight",
        "model.layers.3.mlp.experts.255.up_proj.weight",
        "model.layers.78.mlp.experts.0.gate_proj.weight",
        "model.layers.78.self_attn.o_proj.weight",
        "model.layers.3.mlp.experts.gate_up_proj",
    ]
    kept = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.indexer.weights_proj.weight",
        "model.layers.0.self_attn.indexer.k_norm.weight",
        "model.layers.0.self_attn.indexer.k_norm.bias",
        "model.layers.78.eh_proj.weight",
        "model.layers.78.enorm.weight",
        "model.layers.78.hnorm.weight",
        "model.layers.78.shared_head.norm.weight",
        "model.layers.0.self_attn.q_a_proj.bias",
    ]
    assert all(fp8.is_quantized(n) for n in quantised)
    assert not any(fp8.is_quantized(n) for n in kept)


# --- checkpoints ----------------------------------------------------------------------------------
def test_quantization_config_is_written_as_published_and_read_back(tmp_path) -> None:
    model = _model(RAGGED)
    model.save_pretrained(tmp_path, fp8=True)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qc.items() if k != "modules_to_not_convert"} == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    listed = qc["modules_to_not_convert"]
    assert "model.layers.0.self_attn.indexers_proj" in listed  # the published (mislabelled) name
    assert not any("indexer.weights_proj" in m for m in listed)
    assert {
        "lm_head",
        "model.embed_tokens",
        "model.norm",
        "model.layers.1.mlp.gate",
        "model.layers.2.eh_proj",
        "model.layers.2.shared_head.norm",
    } <= set(listed)
    read_back = fp8.parse_quantization_config(qc)
    assert "model.layers.0.self_attn.indexer.weights_proj" in read_back
    # The list agrees with the files: a listed module has no scale, a scaled weight is not listed.
    tensors = CheckpointFolder(tmp_path).tensors
    for name, info in tensors.items():
        module = name.rsplit(".", 1)[0]
        scaled = fp8.scale_name(name) in tensors
        assert scaled == (info.dtype == torch.float8_e4m3fn)
        if module in read_back:
            assert not scaled, name
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8.parse_quantization_config({**qc, "weight_block_size": [64, 64]})


def test_fp8_checkpoint_of_an_expert_heavy_config_is_about_half_the_bf16_bytes(tmp_path) -> None:
    model = _model(EXPERT_HEAVY, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    bf16_bytes = sum(t.nbytes for t in CheckpointFolder(tmp_path / "bf16").tensors.values())
    fp8_bytes = sum(t.nbytes for t in CheckpointFolder(tmp_path / "fp8").tensors.values())
    files = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # headers included
    assert 0.5 < files(tmp_path / "fp8") / files(tmp_path / "bf16") < 0.55
    ratio = fp8_bytes / bf16_bytes
    print(f"FP8 / BF16 checkpoint bytes: {fp8_bytes:,} / {bf16_bytes:,} = {ratio:.4f}")
    assert 0.5 < ratio < 0.54


def test_fp8_loaded_logits_are_close_to_the_original_model(tmp_path) -> None:
    model = _model(RAGGED)
    model.save_pretrained(tmp_path, fp8=True)
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32  # dequantised
    x = _ids(RAGGED)
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    rel = ((got - ref).norm() / ref.norm()).item()
    max_rel = ((got - ref).abs().max() / ref.abs().max()).item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"FP8 vs fp32 logits: relative L2 error {rel:.4f}, max |diff| / max |logit| {max_rel:.4f}, top-1 {top1:.3f}"
    )
    # e4m3 rounding alone costs ~2.6% (relative L2) per Gaussian weight matrix; through the layers that
    # compounds to a few percent of the logits. A wrong scale layout or orientation would give ~100%.
    assert rel < 0.1 and max_rel < 0.25
    assert top1 >= 0.9


def test_kept_fp8_model_matches_the_dequantised_model_with_half_the_weight_memory(tmp_path) -> None:
    _model(EXPERT_HEAVY, dtype=torch.bfloat16).save_pretrained(tmp_path, fp8=True)
    dequantised = GLM5ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    kept = GLM5ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, fp8="keep")  # fp32 activations
    assert isinstance(kept.model.layers[0].mlp.experts, FP8Experts)
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, FP8Linear)
    assert isinstance(kept.mtp[0].eh_proj, torch.nn.Linear) and not isinstance(kept.lm_head, FP8Linear)
    assert kept.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    x = _ids(EXPERT_HEAVY, 20)
    with torch.no_grad():
        a, b = dequantised(x, mtp_depth=1), kept(x, mtp_depth=1)
    # Both multiply the same dequantised weights: equal up to float rounding (in practice bit-identical).
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert (a.mtp_logits[0] - b.mtp_logits[0]).abs().max() <= 1e-5
    # Memory, both in the checkpoint's bfloat16: e4m3 + scales for the quantised split, BF16 for the rest.
    bf16_bytes = weight_bytes(GLM5ForCausalLM.from_pretrained(tmp_path))
    ratio = weight_bytes(GLM5ForCausalLM.from_pretrained(tmp_path, fp8="keep")) / bf16_bytes
    print(f"kept-FP8 / BF16 weight memory: {ratio:.4f}")
    assert 0.5 < ratio < 0.55


def test_loading_bf16_weights_with_fp8_keep_quantises_them_like_an_fp8_checkpoint(tmp_path) -> None:
    model = _model(RAGGED, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    a = GLM5ForCausalLM.from_pretrained(tmp_path / "bf16", fp8="keep").state_dict()
    b = GLM5ForCausalLM.from_pretrained(tmp_path / "fp8", fp8="keep").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].float(), b[name].float()), name


def test_fp8_modules_keep_e4m3_and_fp32_scales_through_dtype_casts() -> None:
    model = quantize_model(_model(RAGGED))
    linear, experts = model.model.layers[0].self_attn.q_b_proj, model.model.layers[1].mlp.experts
    before = linear.weight.clone()
    model.to(torch.bfloat16)
    assert linear.state_dict()["weight"].dtype == torch.float8_e4m3fn
    assert (
        linear.weight_scale_inv.dtype == torch.float32 and experts.down_proj_scale_inv.dtype == torch.float32
    )
    assert linear.weight.dtype == torch.bfloat16 and torch.equal(linear.weight, before.to(torch.bfloat16))
    model.float()
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and linear.weight.dtype == torch.float32


def test_a_kept_fp8_model_saves_its_e4m3_weights_unchanged_or_dequantised(tmp_path) -> None:
    _model(RAGGED, dtype=torch.bfloat16).save_pretrained(tmp_path / "src", fp8=True)
    kept = GLM5ForCausalLM.from_pretrained(tmp_path / "src", fp8="keep")
    kept.save_pretrained(tmp_path / "fp8", fp8=True)
    kept.save_pretrained(tmp_path / "bf16")
    src, again = CheckpointFolder(tmp_path / "src"), CheckpointFolder(tmp_path / "fp8")
    assert src.tensors.keys() == again.tensors.keys()
    with src.reader() as a, again.reader() as b:
        assert all(torch.equal(a.get(n).float(), b.get(n).float()) for n in src.tensors)
    dequantised = GLM5ForCausalLM.from_pretrained(tmp_path / "src").state_dict()
    from_bf16 = GLM5ForCausalLM.from_pretrained(tmp_path / "bf16").state_dict()
    assert all(torch.equal(dequantised[k], from_bf16[k]) for k in dequantised)
    # the name table carries the per-expert scales both ways (split on save, stacked on load)
    other = quantize_model(_model(RAGGED, seed=5, dtype=torch.bfloat16))
    other.load_hf_state_dict(kept.hf_state_dict())
    assert all(
        torch.equal(a.float(), b.float())
        for a, b in zip(other.state_dict().values(), kept.state_dict().values())
    )


# --- an independent reference: one 128x128 block at a time ----------------------------------------------
# GLM-5 shapes (docs/model.md § FP8 block format), scaled down where real ones are slow, always with non-square scale
# grids (a transposed grid then reads the wrong scale, or fails) and both whole-block and ragged matrices.
GLM5_LIKE = GLM5Config.from_preset("tiny").replace(
    vocab_size=256,
    hidden_size=384,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    intermediate_size=640,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    index_n_heads=2,
    index_head_dim=64,
    index_topk=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
)
"""Scale grids: experts gate/up 2x3 and down 3x2, dense MLP 5x3 / 3x5, o_proj 3x1, kv_b 2x1, indexer wq_b 1x2
(whole blocks); kv_a 160x384 -> 2x3, q_b 192x256 -> 2x2, indexer wk 64x384 -> 1x3 (ragged)."""


def dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[..., rows of block i, cols of block j] = W_fp8[...] * scale_inv[..., i, j], block by block (fp32)."""
    B = 128
    out = torch.full(q.shape, float("nan"))
    for i in range(scale_inv.shape[-2]):
        for j in range(scale_inv.shape[-1]):
            rows, cols = slice(i * B, (i + 1) * B), slice(j * B, (j + 1) * B)  # the last ones may be ragged
            out[..., rows, cols] = q[..., rows, cols].float() * scale_inv[..., i, j, None, None]
    assert not out.isnan().any()
    return out


def _random_fp8(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(fp8.scale_shape(shape), generator=g) * 4 + 0.05  # every block its own multiplier
    return q, scale


@pytest.mark.parametrize(
    "shape",
    [
        (3 * 128 + 40, 5 * 128 + 72),  # 4 x 6 grid, ragged in both directions
        (2 * 128, 5 * 128),  # 2 x 5 grid of whole blocks (the path every real GLM-5 expert takes)
        (5 * 128, 2 * 128),
        (3 * 128, 3 * 128),  # square grid: a transposed grid has the right shape and wrong values
        (3, 2 * 128, 3 * 128),  # stacked experts, whole blocks
        (2, 136, 3 * 128),  # stacked experts, ragged rows
        (576, 6144),  # GLM-5 kv_a_proj_with_mqa: 5 x 48, ragged rows
        (128, 6144),  # GLM-5 indexer wk: 1 x 48
        (2048, 6144),  # GLM-5 routed expert gate_proj: 16 x 48
    ],
    ids=lambda s: "x".join(map(str, s)),
)
def test_dequantize_equals_the_per_block_reference(shape: tuple[int, ...]) -> None:
    q, scale = _random_fp8(shape, seed=sum(shape))
    ref = dequantize_by_blocks(q, scale)
    torch.testing.assert_close(fp8.dequantize(q, scale, torch.float32), ref, rtol=0, atol=0)
    torch.testing.assert_close(
        fp8.dequantize(q, scale, torch.bfloat16), ref.to(torch.bfloat16), rtol=0, atol=0
    )


def test_quantize_then_dequantize_by_blocks_recovers_whole_block_weights() -> None:
    """quantize's scales are per block too: the reference dequantisation of its output is within the e4m3 bound."""
    g = torch.Generator().manual_seed(3)
    # per block
    w = torch.randn(2 * 128, 5 * 128, generator=g) * torch.logspace(-3, 1, 5).repeat_interleave(128)
    q, s = fp8.quantize(w)
    assert s.shape == (2, 5)
    back = dequantize_by_blocks(q, s)
    assert (
        (back - w).abs() <= 2**-4 * w.abs() + 2**-10 * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    ).all()


@pytest.fixture(scope="module")
def glm5_like_fp8(tmp_path_factory) -> tuple:  # noqa: ANN001
    """An FP8 save of GLM5_LIKE and its raw (e4m3, scale_inv) tensors as read from the files."""
    path = tmp_path_factory.mktemp("glm5_like_fp8")
    _model(GLM5_LIKE, dtype=torch.bfloat16).save_pretrained(path, fp8=True)
    folder = CheckpointFolder(path)
    with folder.reader() as r:
        raw = {
            n: (r.get(n), r.get(fp8.scale_name(n)))
            for n, info in folder.tensors.items()
            if info.dtype == torch.float8_e4m3fn
        }
    grids = {tuple(s.shape) for _, s in raw.values()}
    assert {(2, 3), (3, 2), (5, 3), (3, 5), (3, 1)} <= grids  # non-square grids of whole blocks are in there
    return path, raw


def test_an_fp8_checkpoint_loads_dequantised_as_the_per_block_reference(glm5_like_fp8) -> None:  # noqa: ANN001
    path, raw = glm5_like_fp8
    loaded = GLM5ForCausalLM.from_pretrained(path, dtype=torch.float32).hf_state_dict()
    for name, (q, s) in raw.items():
        torch.testing.assert_close(loaded[name], dequantize_by_blocks(q, s), rtol=0, atol=0, msg=name)


def test_an_fp8_checkpoint_kept_in_e4m3_computes_with_the_per_block_reference(glm5_like_fp8) -> None:  # noqa: ANN001
    path, raw = glm5_like_fp8
    kept = GLM5ForCausalLM.from_pretrained(path, dtype=torch.float32, fp8="keep")
    cfg, seen = kept.config, set()
    from glm5.checkpoint.hf import internal_to_hf_name

    for name, module in kept.named_modules():
        if isinstance(module, FP8Linear):
            hf = internal_to_hf_name(f"{name}.weight", cfg)
            torch.testing.assert_close(module.weight, dequantize_by_blocks(*raw[hf]), rtol=0, atol=0, msg=hf)
            seen.add(hf)
        elif isinstance(module, FP8Experts):
            prefix = internal_to_hf_name(name, cfg)
            for e in range(module.num_experts):
                gate_up, down = module.expert_weights(e, torch.float32)
                ref = [
                    dequantize_by_blocks(*raw[f"{prefix}.{e}.{p}_proj.weight"])
                    for p in ("gate", "up", "down")
                ]
                torch.testing.assert_close(gate_up, torch.cat(ref[:2]), rtol=0, atol=0)
                torch.testing.assert_close(down, ref[2], rtol=0, atol=0)
                seen |= {f"{prefix}.{e}.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert seen == set(raw)  # every quantised tensor of the checkpoint was checked
