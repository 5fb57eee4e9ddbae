"""Low-precision weights in the fused decode step: every weight format (fp32, bf16, int8 with group scales, block
FP8 as stored) x back end (the native kernel, the torch ops) x the fused-step configuration matrix, against the
model's own forward on the same stored weights; the FP8 block layout checked; the format conversions and the
kernel's SIMD path reported; LLM(weights=...) end to end on a saved checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch
from configs import MICRO
from test_engine_fused import VARIANTS, decode_and_compare, noisy_model, twin_caches

from glm5.checkpoint.fp8 import dequantize
from glm5.engine.fused import FP8LayoutError, FusedDecoder, matrix_view
from glm5.engine.kv_cache import PagedLatentCache
from glm5.kernels import native
from glm5.kernels.formats import (
    INT8_GROUP,
    WeightOnlyExperts,
    WeightOnlyLinear,
    convert_model,
    int8_dequantize,
    int8_quantize,
    weight_format,
)
from glm5.model.fp8 import FP8Experts, FP8Linear

pytestmark = pytest.mark.usefixtures("one_thread")

FORMATS = ["fp32", "bf16", "int8", "fp8"]
KERNELS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")),
]
FORMAT_VARIANTS = {
    **VARIANTS,
    # several 128x128 FP8 blocks per matrix with ragged edges (320 inputs, 144-row q_a, experts of 136 whose
    # gate and up halves are quantised apart), int8 groups with a partial last group (kv_b's 24 inputs)
    "multi-block": MICRO.replace(
        hidden_size=320, q_lora_rank=144, intermediate_size=200, moe_intermediate_size=136, n_routed_experts=4
    ),
}


def formatted_model(variant: str, fmt: str):  # noqa: ANN201
    model = convert_model(noisy_model(FORMAT_VARIANTS[variant]), fmt)
    assert weight_format(model) == fmt
    return model


@pytest.mark.parametrize("variant", list(FORMAT_VARIANTS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_each_format_steps_like_the_model_on_the_same_weights(kernel: str, fmt: str, variant: str) -> None:
    """Logits, hidden states and cache entries of the fused step equal the model forward's on the stored
    weights (its modules widen them in torch; the kernel in registers), crossing index_topk, ragged rows."""
    model = formatted_model(variant, fmt)
    lengths = [3, 17, 30]
    ref_cache, fused_cache = twin_caches(model, lengths)
    fused = FusedDecoder(model, native_kernel=kernel == "native")
    decode_and_compare(model, fused, ref_cache, fused_cache, list(range(len(lengths))), steps=4)
    assert (fused.lib is not None) == (kernel == "native")  # the kernel read the format itself


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8"])
def test_each_format_verifies_several_tokens_and_drafts_with_the_mtp_layer(fmt: str) -> None:
    """Several new tokens per row (each weight row widened once for all of them) and the MTP layer in the
    kernel (eh_proj and lm_head in the format too) equal the model's forward and mtp_forward."""
    model = convert_model(noisy_model(MICRO.replace(index_n_heads=16)), fmt)
    ref_cache, fused_cache = twin_caches(model, [6, 30])
    fused = FusedDecoder(model, native_kernel=True)
    new = torch.randint(1, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    for cache in (ref_cache, fused_cache):
        cache.prepare([0, 1], new.tolist())
    with torch.no_grad():
        ref = model(new, ref_cache, return_hidden=True)
    logits, hidden = fused(new, fused_cache)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, ref.hidden_states, rtol=1e-4, atol=1e-4)

    mtp_layer = model.config.num_hidden_layers
    caches = [PagedLatentCache(model.config, num_blocks=64, block_size=4, layers=[mtp_layer]) for _ in "ab"]
    for cache in caches:
        cache.add_sequence(0), cache.add_sequence(1)
    g = torch.Generator().manual_seed(3)
    for depth, T in [(0, 5), (1, 1)]:  # prompt catch-up, a draft step
        h_in = torch.randn(2, T, model.config.hidden_size, generator=g)
        ids = torch.randint(1, model.config.vocab_size, (2, T), generator=g)
        for cache in caches:
            cache.prepare([0, 1], ids.tolist())
        with torch.no_grad():
            ref_h, ref_logits = model.mtp_forward(h_in, ids, caches[0], depth=depth)
        h, mtp_logits = fused.mtp_forward(h_in, ids, caches[1], depth=depth)
        torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mtp_logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_int8_groups_round_trip_within_half_a_step() -> None:
    # groups of very different ranges, a partial last group
    w = torch.randn(5, 70) * torch.logspace(-3, 1, 70)
    q, s = int8_quantize(w)
    assert q.dtype == torch.int8 and s.shape == (5, 3) and q.abs().max() == 127
    step = s.repeat_interleave(INT8_GROUP, -1)[:, :70]
    assert ((int8_dequantize(q, s) - w).abs() <= step / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="one per 32 inputs"):
        int8_dequantize(q, s[:, :2])


def test_conversion_keeps_float32_activations_and_refuses_double_rounding() -> None:
    model = convert_model(noisy_model(MICRO), "fp8")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_a_proj, FP8Linear) and isinstance(model.model.layers[1].mlp.experts, FP8Experts)
    # what GLM-5-FP8 publishes in bf16: the indexer head weights, lm_head, eh_proj
    assert isinstance(model.lm_head, WeightOnlyLinear) and model.lm_head.fmt == "bf16"
    assert isinstance(attn.indexer.weights_proj, WeightOnlyLinear)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="round twice"):
        convert_model(model, "int8")
    int8 = convert_model(noisy_model(MICRO), "int8")
    assert isinstance(int8.model.layers[1].mlp.experts, WeightOnlyExperts)
    with pytest.raises(ValueError, match="weights='nf4': choose one of fp32, bf16, int8, fp8"):
        convert_model(noisy_model(MICRO), "nf4")
    assert FusedDecoder.unsupported(noisy_model(MICRO).to(torch.bfloat16)).startswith("a model computing in")


def test_a_mismatched_fp8_block_layout_is_refused_naming_the_tensor() -> None:
    model = convert_model(noisy_model(MICRO), "fp8")
    q_b = model.model.layers[1].self_attn.q_b_proj
    q_b.weight_scale_inv = torch.ones(2, 1)  # a 128-row grid where one block covers all of its rows
    with pytest.raises(
        FP8LayoutError, match=r"model\.layers\.1\.self_attn\.q_b_proj\.weight_scale_inv has shape"
    ):
        FusedDecoder(model)
    # experts whose gate and up were quantised together: with F = 16 their rows share one block
    model = convert_model(noisy_model(MICRO), "fp8")
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj_scale_inv = experts.gate_up_proj_scale_inv[:, :1].contiguous()
    with pytest.raises(FP8LayoutError, match=r"mlp\.experts\.gate_up_proj_scale_inv .*quantised separately"):
        FusedDecoder(model)


def test_the_kernel_widens_fp8_exactly_as_dequantize() -> None:
    """Every e4m3 code (normals, subnormals, both signs) times a block scale, through the kernel's GEMV on unit
    vectors: the columns of the dequantised matrix, bit for bit."""
    lib = native.load()
    if lib is None:
        pytest.skip(f"no kernel: {native.load_error()}")
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # NaN codes are never stored
    q = codes.view(torch.float8_e4m3fn).reshape(2, 127)
    scale = torch.tensor([[0.37]])
    dense = dequantize(q, scale, torch.float32)
    mat = native.Mat(
        w=q.data_ptr(),
        scale=scale.data_ptr(),
        bias=None,
        fmt=native.FORMATS["fp8"],
        rows=2,
        cols=127,
        split=2,
    )
    mat.out_scale = 1.0
    eye = torch.eye(127)
    out = torch.empty(127, 2)
    lib.glm5_linear(mat, eye.data_ptr(), 127, out.data_ptr())  # several inputs: each row widened once
    assert torch.equal(out.t(), dense)
    for j in range(127):  # one input: the blocked dot product
        lib.glm5_linear(mat, eye[j].data_ptr(), 1, out[j].data_ptr())
    assert torch.equal(out.t(), dense)


def test_the_kernel_reports_its_simd_path() -> None:
    text = native.describe()
    if native.load() is None:
        assert "off" in text
    else:
        assert native.isa() in ("avx512", "avx2", "portable") and native.isa() in text and "fp8" in text


@pytest.mark.parametrize("weights", FORMATS)
def test_llm_loads_each_format_and_decodes_as_the_model_on_those_weights(weights: str, tmp_path) -> None:  # noqa: ANN001
    """LLM(path, weights=...) on a saved checkpoint: the fused step (the kernel where it builds) samples the
    greedy tokens that the model's own forward samples on the same stored weights."""
    from glm5.engine import LLM, SamplingParams

    noisy_model(MICRO).save_pretrained(str(tmp_path))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [list(range(5, 30)), [3, 4]]
    llm = LLM(str(tmp_path), weights=weights, block_size=4)
    assert weight_format(llm.engine.fused.model) == weights
    plain = LLM(convert_model(noisy_model(MICRO), weights), block_size=4, fused_decode=False)
    assert plain.engine.fused is None
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert out == [o.outputs[0].token_ids for o in plain.generate(prompts, params)]


def test_expert_banks_are_converted_as_their_experts_are_read(tmp_path) -> None:  # noqa: ANN001
    """The loader reports each module once, as soon as all of its tensors are in place (load_pretrained's
    on_filled), so LLM(path, weights="int8" / "bf16") converts every routed-expert bank before the rest of the
    checkpoint is read; the stored weights equal converting the whole model afterwards."""
    from glm5.engine import LLM
    from glm5.model import GLM5ForCausalLM
    from glm5.model.moe import Experts

    ref = noisy_model(MICRO)
    ref.save_pretrained(str(tmp_path), max_shard_size=20_000)  # several shards
    seen = []

    def on_filled(model, path):  # noqa: ANN001, ANN202
        mine, theirs = model.get_submodule(path), ref.get_submodule(path)
        for name, t in [*mine.named_parameters(recurse=False), *mine.named_buffers(recurse=False)]:
            assert torch.equal(t, getattr(theirs, name)), f"{path}.{name} reported before it was read"
        seen.append(path)

    GLM5ForCausalLM.from_pretrained(str(tmp_path), on_filled=on_filled)
    banks = [p for p, m in ref.named_modules() if type(m) is Experts]
    assert len(seen) == len(set(seen)) and banks and set(banks) <= set(seen)
    assert seen.index(banks[0]) < len(seen) - 1  # a bank came complete while other modules were still unread
    for weights in ("int8", "bf16"):
        loaded = LLM(str(tmp_path), weights=weights).engine.fused.model.state_dict()
        converted = convert_model(noisy_model(MICRO), weights).state_dict()
        assert loaded.keys() == converted.keys()
        assert all(torch.equal(loaded[k], converted[k]) for k in loaded), weights


def test_large_bf16_parameters_are_widened_in_chunks_keeping_ties(monkeypatch) -> None:  # noqa: ANN001
    """convert_model widens big bf16 parameters (the embedding) a chunk at a time: the same fp32 values as
    .float(), tied parameters still one tensor, small ones left to model.float()."""
    from torch import nn

    from glm5.kernels import formats

    monkeypatch.setattr(formats, "_RELEASE_BYTES", 4096)  # chunks of 512 elements: several per tensor
    big = nn.Embedding(300, 10).to(torch.bfloat16)
    head = nn.Linear(10, 300, bias=False).to(torch.bfloat16)
    head.weight = big.weight  # tied
    small = nn.Linear(10, 4).to(torch.bfloat16)
    model = nn.ModuleDict({"big": big, "head": head, "small": small})
    want = big.weight.detach().float()
    formats._widen_large_bf16(model)
    assert model["big"].weight.dtype == torch.float32 and model["head"].weight is model["big"].weight
    assert torch.equal(model["big"].weight, want)
    assert model["small"].weight.dtype == torch.bfloat16  # below the size: model.float() widens it


def test_an_fp8_checkpoint_keeps_fp8_by_default_and_options_must_agree(tmp_path) -> None:  # noqa: ANN001
    from glm5.engine import LLM

    noisy_model(MICRO).save_pretrained(str(tmp_path), fp8=True)
    llm = LLM(str(tmp_path), block_size=4)
    assert weight_format(llm.engine.fused.model) == "fp8"  # kept, and the fused step runs it
    assert weight_format(LLM(str(tmp_path), fp8="dequantize", block_size=4).engine.fused.model) == "fp32"
    with pytest.raises(ValueError, match="weights='int8' contradicts fp8='keep'"):
        LLM(str(tmp_path), weights="int8", fp8="keep")
    with pytest.raises(ValueError, match="computes in float32; drop dtype"):
        LLM(str(tmp_path), weights="bf16", dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_kernels_threaded_products_do_not_depend_on_the_thread_count(fmt: str) -> None:
    """Rows split over OpenMP threads: each output summed by one thread in a fixed order, so 1 and 2 threads
    give the same bits, for one input and for several (a verification's k + 1 rows)."""
    lib = native.load()
    if lib is None:
        pytest.skip(f"no kernel: {native.load_error()}")
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(520, 1030, bias=True)  # ragged FP8 blocks and int8 groups
    with torch.no_grad():
        linear.weight.normal_(generator=g), linear.bias.normal_(generator=g)
    model_like = torch.nn.Module()
    model_like.proj = (
        linear if fmt == "fp32" else WeightOnlyLinear(linear, "bf16" if fmt == "bf16" else "int8")
    )
    if fmt == "fp8":
        model_like.proj = FP8Linear.from_linear(linear)
    mat = matrix_view(model_like.proj)
    before = torch.get_num_threads()
    try:
        for B in (1, 3):
            x = torch.randn(B, 520, generator=g)
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out = torch.empty(B, 1030)
                lib.glm5_linear(mat, x.data_ptr(), B, out.data_ptr())
                outs.append(out)
            assert torch.equal(outs[0], outs[1])
            torch.testing.assert_close(outs[0], model_like.proj(x), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def _recording(drafter) -> list:  # noqa: ANN001
    """Wrap drafter.propose to record the drafts it proposes; returns the record."""
    seen, propose = [], drafter.propose

    def recorded(*args):  # noqa: ANN002, ANN202
        ids, probs = propose(*args)
        seen.append(ids.tolist())
        return ids, probs

    drafter.propose = recorded
    return seen


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("fmt", ["fp32", "fp8"])
def test_greedy_drafts_in_one_kernel_call_equal_the_step_by_step_drafts(fmt: str) -> None:
    """k - 1 greedy MTP steps in one C call (glm5_mtp_draft) propose the tokens that k - 1 calls of mtp_forward +
    argmax propose, and speculative decoding still equals plain greedy decoding."""
    from glm5.engine import LLM, SamplingParams

    model = convert_model(noisy_model(MICRO.replace(index_n_heads=16)), fmt)
    prompts = [list(range(5, 30)), [3, 4, 9]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(model, block_size=4).generate(prompts, params)]
    drafts, outs = {}, {}
    for mode in ("kernel", "steps"):
        llm = LLM(model, block_size=4, num_speculative_tokens=3)
        runner_fused = llm.engine.fused
        assert runner_fused.drafts_in_kernel(llm.engine.executor.runner.mtp_cache)
        if mode == "steps":
            runner_fused.drafts_in_kernel = lambda cache: False
        drafter = llm.engine.executor.runner.drafter
        drafts[mode] = _recording(drafter)
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert drafts["kernel"] == drafts["steps"] and len(drafts["kernel"]) > 2
    assert outs["kernel"] == outs["steps"] == plain


def _int8_quantize_whole(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference twin of int8_quantize: the whole matrix at once (no row chunks)."""
    *lead, rows, cols = w.shape
    groups = -(-cols // INT8_GROUP)
    g = torch.nn.functional.pad(w.float(), (0, groups * INT8_GROUP - cols)).view(
        *lead, rows, groups, INT8_GROUP
    )
    amax = g.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(*lead, rows, groups * INT8_GROUP)[..., :cols], scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("back_end", ["native", "torch"])
@pytest.mark.parametrize("shape", [(3, 70, 100), (5000, 64), (40, 96)])
def test_int8_quantize_equals_the_whole_matrix_at_once(shape, back_end, dtype, monkeypatch) -> None:  # noqa: ANN001
    """The native loop and the torch ops in row chunks both give the whole-matrix reference's bits: an all-zero
    group (scale 1), a partial last group, ties rounded half to even."""
    import glm5.kernels.formats as formats

    if back_end == "torch":
        monkeypatch.setattr(formats.native, "load", lambda: None)
        monkeypatch.setattr(formats, "_CHUNK", 1000)  # several chunks even for these small matrices
    elif native.load() is None:
        pytest.skip(f"no native kernel: {native.load_error()}")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[..., 0, :INT8_GROUP] = 0.0  # an all-zero group: scale 1
    w[..., 1, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # scale 1: the halves round to 2, -4, 0
    w = w.to(dtype)
    q, s = int8_quantize(w)
    if back_end == "native":
        assert q.dtype == torch.int8 and torch.equal(
            q[..., 1, :4], torch.tensor([127, 2, -4, 0]).to(q).expand_as(q[..., 1, :4])
        )
    q_ref, s_ref = _int8_quantize_whole(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.equal(
        int8_dequantize(q, s), q_ref.float() * s_ref.repeat_interleave(INT8_GROUP, -1)[..., : shape[-1]]
    )


@pytest.mark.parametrize("shape", [(1000, 384), (512, 256), (130, 128), (256, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_fp8_dequantize_is_bit_exact(shape, dtype) -> None:  # noqa: ANN001
    from glm5.checkpoint.fp8 import quantize
    from glm5.model.fp8 import dequantize_fast

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 5
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-7, -448.0])  # zeros, a subnormal code, the largest
    q, s = quantize(w)
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # every finite e4m3 code (0x7F / 0xFF are NaN)
    q.view(torch.uint8).view(-1)[shape[1] : shape[1] + codes.numel()] = codes  # from row 1 on
    assert torch.equal(
        dequantize_fast(q, s, dtype).view(torch.uint8), dequantize(q, s, dtype).view(torch.uint8)
    )


@pytest.mark.parametrize("fmt", ["fp8", "int8", "bf16"])
def test_prefill_widens_blocks_of_rows_and_equals_the_dequantized_reference(fmt: str) -> None:
    """FP8Linear / WeightOnlyLinear on many tokens (prefill) widen BLOCK_ROWS rows at a time: the product equals
    x W^T on the whole widened matrix within fp32 accumulation error, bias included."""
    from glm5.model.fp8 import BLOCK_ROWS

    lin = torch.nn.Linear(256, 2 * BLOCK_ROWS + 72, bias=True)
    layer = FP8Linear.from_linear(lin) if fmt == "fp8" else WeightOnlyLinear(lin, fmt)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(2))
    widened = layer.weight.float()
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, widened, lin.bias), rtol=1e-5, atol=1e-5)
