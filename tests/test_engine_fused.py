"""The fused decode step (glm5.engine.fused), in torch ops and through the native C kernel, against the model's own
forward on twin paged caches: same logits, hidden states and cache entries for one and many rows, ragged and equal
lengths, below and above index_topk, IndexCache shared layers, biases, group-limited routing, no shared expert,
two shared experts, un-normalised top-k weights, other indexer widths, DSA off; rebuilt after weight changes;
the engine picks it; the kernel builds once."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from configs import MICRO

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.engine import EngineConfig, LLMEngine
from glm5.engine.fused import FusedDecoder, rotation_matrices
from glm5.engine.kv_cache import PagedLatentCache
from glm5.kernels import native
from glm5.model.layers import apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "micro": MICRO,
    "bias": MICRO.replace(attention_bias=True),
    "groups-no-shared": MICRO.replace(n_group=2, topk_group=1, n_shared_experts=0),
    # the raw sigmoid scores (x 2.5) as weights: a kernel that normalises anyway is off by ~0.5 in the logits
    "no-norm-topk": MICRO.replace(norm_topk_prob=False),
    "two-shared-experts": MICRO.replace(n_shared_experts=2),  # one shared MLP of width 2 x moe_intermediate
    "half-split-rope": MICRO.replace(rope_interleave=False, indexer_rope_interleave=False),
    "indexer-width-24": MICRO.replace(index_head_dim=24),  # the kernel's generic (non-unrolled) scan
    # the kernel attends in groups of 4 heads: two full groups and a partial one
    "ten-heads": MICRO.replace(num_attention_heads=10, num_key_value_heads=10),
    # GLM-5's widths where the kernel has fixed-size buffers: 32 x 128 indexer, 256 experts, 8 per token
    "glm5-widths": MICRO.replace(
        index_n_heads=32, index_head_dim=128, n_routed_experts=256, num_experts_per_tok=8
    ),
}
KERNELS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")),
]


def decoder(model, kernel: str) -> FusedDecoder:  # noqa: ANN001
    return FusedDecoder(model, native_kernel=kernel == "native")


def noisy_model(cfg, seed: int = 0) -> GLM5ForCausalLM:  # noqa: ANN001
    """Random weights, with norms and biases moved off their 1 / 0 initialisation so folding them is tested."""
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def twin_caches(model, lengths: list[int], seed: int = 0, num_blocks: int = 96):  # noqa: ANN001
    """Two paged caches holding the same prompts (prefilled by the model), with non-consecutive blocks."""
    cfg = model.config
    layers = list(range(cfg.num_hidden_layers))
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    caches = []
    for _ in range(2):
        cache = PagedLatentCache(cfg, num_blocks=num_blocks, block_size=4, layers=layers)
        for i in range(len(rows)):  # interleaved chunks below: each sequence's blocks are scattered
            cache.add_sequence(i)
        for start in range(0, max(lengths), 5):
            for i, row in enumerate(rows):
                if start < len(row):
                    cache.prepare([i], [row[start : start + 5]])
                    with torch.no_grad():
                        model(torch.tensor([row[start : start + 5]]), cache)
        caches.append(cache)
    return caches


def decode_and_compare(model, fused, ref_cache, fused_cache, ids: list[int], steps: int) -> None:  # noqa: ANN001
    """`steps` random tokens per row decoded by the model on ref_cache and by the fused step on fused_cache: the
    logits and hidden states agree (1e-4) at every step."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        nxt = torch.randint(1, model.config.vocab_size, (len(ids),), generator=g)
        for cache in (ref_cache, fused_cache):
            cache.prepare(ids, [[t] for t in nxt.tolist()])
        with torch.no_grad():
            ref = model(nxt[:, None], ref_cache, return_hidden=True)
        logits, hidden = fused(nxt, fused_cache)
        torch.testing.assert_close(logits, ref.logits[:, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, ref.hidden_states[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[5], [30], [3, 17, 30], [20, 20], [7, 9]])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_step_equals_the_model_forward(kernel: str, variant: str, lengths: list[int]) -> None:
    model = noisy_model(VARIANTS[variant])
    ref_cache, fused_cache = twin_caches(model, lengths)
    fused = decoder(model, kernel)
    ids = list(range(len(lengths)))
    # 6 steps cross index_topk = 8 for the short rows
    decode_and_compare(model, fused, ref_cache, fused_cache, ids, steps=6)
    for i in ids:  # the cached entries agree too
        slots = [
            [c.seqs[i].blocks[p // 4] * 4 + p % 4 for p in range(c.length(i))]
            for c in (ref_cache, fused_cache)
        ]
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(
                ref_cache.kv[layer][slots[0]], fused_cache.kv[layer][slots[1]], atol=1e-5, rtol=1e-5
            )
    assert fused.num_builds == 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_context_selection_equals_the_model_forward(kernel: str) -> None:
    """index_topk = 128 of 700 keys: the kernel picks them from a sample's threshold and a heap over the scores
    that reach it (top_k_long; the short-list tests above take the plain heap) -- the same keys as the model's
    torch.topk, so the same logits."""
    model = noisy_model(MICRO.replace(index_topk=128))
    ref_cache, fused_cache = twin_caches(model, [700], num_blocks=360)
    decode_and_compare(model, decoder(model, kernel), ref_cache, fused_cache, [0], steps=2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_step_with_dsa_off_attends_to_every_key(kernel: str) -> None:
    model = noisy_model(MICRO)
    model.configure_attention(dsa=False)
    ref_cache, fused_cache = twin_caches(model, [25, 11])
    nxt = torch.tensor([3, 4])
    for cache in (ref_cache, fused_cache):
        cache.prepare([0, 1], [[3], [4]])
    with torch.no_grad():
        ref = model(nxt[:, None], ref_cache)
    torch.testing.assert_close(
        decoder(model, kernel)(nxt, fused_cache)[0], ref.logits[:, -1], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_matrices_apply_rope(interleave: bool) -> None:
    cos, sin = torch.randn(3, 4), torch.randn(3, 4)
    x = torch.randn(3, 5, 12)
    M = rotation_matrices(cos, sin, interleave, width=12)
    expected = torch.cat([apply_rope(x[..., :8], cos[:, None], sin[:, None], interleave), x[..., 8:]], -1)
    torch.testing.assert_close(x @ M, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_weights_follow_in_place_updates_and_replaced_tensors(kernel: str) -> None:
    model = noisy_model(MICRO)
    fused = decoder(model, kernel)
    other = noisy_model(MICRO, seed=5)

    _step_matches(model, fused)
    with torch.no_grad():  # in place, as update_weights and optimizers do
        model.model.layers[1].self_attn.q_a_proj.weight.copy_(other.model.layers[1].self_attn.q_a_proj.weight)
        model.model.layers[2].mlp.gate.e_score_correction_bias.add_(0.3)
    _step_matches(model, fused)
    assert fused.num_builds == 1  # in place: the kernel reads the same memory, nothing to rebuild
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors altogether
    _step_matches(model, fused)
    assert fused.num_builds == 2


def test_engine_uses_the_fused_step_on_cpu_and_falls_back_when_unsupported() -> None:
    model = noisy_model(MICRO)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused_llm, plain_llm = LLM(model, block_size=4), LLM(model, block_size=4, fused_decode=False)
    assert fused_llm.engine.fused is not None and plain_llm.engine.fused is None
    fused_out = [o.outputs[0].token_ids for o in fused_llm.generate(prompts, params)]
    assert fused_out == [o.outputs[0].token_ids for o in plain_llm.generate(prompts, params)]
    masked = LLMEngine(model, None, EngineConfig(attention_impl="mask"))
    assert masked.fused is None  # the dense reference runs unfused
    with pytest.raises(ValueError, match=r"fused_decode=True\) cannot run this model: attention impl 'mask'"):
        LLMEngine(model, None, EngineConfig(attention_impl="mask", fused_decode=True))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_native_kernel_builds_once_per_machine_and_can_be_turned_off(tmp_path) -> None:  # noqa: ANN001
    code = "from glm5.kernels import native; lib = native.load(); print(lib is not None, native.load_error())"
    env = {**os.environ, "GLM5_CACHE_DIR": str(tmp_path)}

    def run(**extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "True None"
    (built,) = (tmp_path / "kernels").glob("glm5_decode_*.so")
    stamp = built.stat().st_mtime_ns
    assert run() == "True None" and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert run(GLM5_NATIVE="0") == "False disabled by GLM5_NATIVE=0"
    assert run(CC="/nonexistent/cc", GLM5_CACHE_DIR=str(tmp_path / "other")).startswith("False")


def test_the_kernel_refuses_a_ctypes_struct_that_differs_from_the_c_struct(tmp_path) -> None:  # noqa: ANN001
    """The C side exports sizeof(LayerArgs); the loader compares it with the ctypes mirror. A field added on one
    side only turns the kernel off with the reason named (instead of every call reading garbage)."""
    code = (
        "import ctypes; from glm5.kernels import native\n"
        "if DRIFT: native.LayerArgs = type('LayerArgs', (ctypes.Structure,), "
        "{'_fields_': native.LayerArgs._fields_ + [('extra', ctypes.c_int64)]})\n"
        "lib = native.load(); print(lib is not None, native.load_error())\n"
        "if lib is not None: print(lib.glm5_layer_args_size(), ctypes.sizeof(native.LayerArgs))"
    )
    env = {**os.environ, "GLM5_CACHE_DIR": str(tmp_path)}

    def run(drift: bool) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", f"DRIFT = {drift}\n" + code], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()

    ok, sizes = run(False)
    assert ok == "True None" and len(set(sizes.split())) == 1
    (refused,) = run(True)
    assert refused.startswith("False") and "LayerArgs is" in refused and "declarations differ" in refused


def test_engine_runs_unfused_when_the_kernel_is_unavailable(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(native, "load", lambda: None)
    monkeypatch.setattr(native, "load_error", lambda: "no C compiler (test)")
    model = noisy_model(MICRO)
    assert FusedDecoder(model).lib is None  # falls back to the torch ops
    with pytest.raises(RuntimeError, match="native decode kernel is unavailable: no C compiler"):
        FusedDecoder(model, native_kernel=True)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("lengths", [[6], [30], [3, 17, 30]])
def test_native_kernel_verifies_several_tokens_per_row_in_causal_order(lengths: list[int]) -> None:
    # 16 indexer heads: a key whose every head ReLU is 0 (an exact tie at score 0, which the kernel and
    # torch.topk break differently) is ~1e-5 likely instead of the ~4e-3 of MICRO's 8 heads
    model = noisy_model(MICRO.replace(index_n_heads=16))
    ref_cache, fused_cache = twin_caches(model, lengths)
    fused = decoder(model, "native")
    ids = list(range(len(lengths)))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # 4 tokens per row (1 + 3 drafts), crossing index_topk = 8
        new = torch.randint(1, model.config.vocab_size, (len(lengths), 4), generator=g)
        for cache in (ref_cache, fused_cache):
            cache.prepare(ids, new.tolist())
        with torch.no_grad():
            ref = model(new, ref_cache, return_hidden=True)
        logits, hidden = fused(new, fused_cache)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden, ref.hidden_states, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_native_mtp_layer_equals_the_models_mtp_forward() -> None:
    model = noisy_model(MICRO.replace(index_n_heads=16))  # no exact indexer ties (see above)
    mtp_layer = model.config.num_hidden_layers
    caches = [
        PagedLatentCache(model.config, num_blocks=64, block_size=4, layers=[mtp_layer]) for _ in range(2)
    ]
    fused = decoder(model, "native")
    g = torch.Generator().manual_seed(3)
    D = model.config.hidden_size
    for cache in caches:
        for i in range(2):
            cache.add_sequence(i)
    for depth, T in [(0, 6), (0, 3), (1, 1), (2, 1), (0, 4)]:  # prompt catch-up, accepted drafts, draft steps
        hidden = torch.randn(2, T, D, generator=g)
        ids = torch.randint(1, model.config.vocab_size, (2, T), generator=g)
        for cache in caches:
            cache.prepare([0, 1], ids.tolist())
        with torch.no_grad():
            ref_h, ref_logits = model.mtp_forward(hidden, ids, caches[0], depth=depth)
        h, logits = fused.mtp_forward(hidden, ids, caches[1], depth=depth)
        torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_non_contiguous_parameter_turns_the_kernel_off_not_the_answer() -> None:
    model = noisy_model(MICRO)
    o_proj = model.model.layers[1].self_attn.o_proj
    # same values, transposed layout
    o_proj.weight = torch.nn.Parameter(o_proj.weight.detach().t().contiguous().t())
    ref_cache, fused_cache = twin_caches(model, [12])
    for cache in (ref_cache, fused_cache):
        cache.prepare([0], [[9]])
    with torch.no_grad():
        ref = model(torch.tensor([[9]]), ref_cache).logits[:, -1]
    fused = FusedDecoder(model)
    with pytest.warns(UserWarning, match="native decode kernel disabled: .* not contiguous"):
        logits, _ = fused(torch.tensor([9]), fused_cache)
    assert fused.lib is None
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def _step_matches(model, fused) -> None:  # noqa: ANN001
    ref_cache, fused_cache = twin_caches(model, [12])
    for cache in (ref_cache, fused_cache):
        cache.prepare([0], [[9]])
    with torch.no_grad():
        ref = model(torch.tensor([[9]]), ref_cache).logits[:, -1]
    torch.testing.assert_close(fused(torch.tensor([9]), fused_cache)[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_swapped_storage_is_seen_and_replaced_modules_need_invalidate(kernel: str) -> None:
    model = noisy_model(MICRO)
    fused = decoder(model, kernel)
    _step_matches(model, fused)
    experts = model.model.layers[2].mlp.experts
    # new storage, no version bump: caught by address
    experts.gate_up_proj.data = experts.gate_up_proj.data * 1.5
    _step_matches(model, fused)
    model.share_memory()  # every storage moves to shared memory
    _step_matches(model, fused)
    with torch.no_grad():  # in place through .data: the same memory, seen without a rebuild
        model.model.layers[1].self_attn.q_a_proj.weight.data.mul_(0.5)
    _step_matches(model, fused)
    assert fused.num_builds == 3
    attn = model.model.layers[1].self_attn  # a replaced module is not seen: invalidate() rebuilds
    attn.q_b_proj = copy.deepcopy(attn.q_b_proj)
    with torch.no_grad():
        attn.q_b_proj.weight.mul_(0.5)
    fused.invalidate()
    _step_matches(model, fused)
    assert fused.num_builds == 4


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_model_made_under_inference_mode_runs_fused(kernel: str) -> None:
    with torch.inference_mode():
        model = noisy_model(MICRO)
        fused = decoder(model, kernel)
        _step_matches(model, fused)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_model_beyond_the_kernels_limits_runs_the_torch_back_end() -> None:
    model = noisy_model(MICRO.replace(n_routed_experts=288, num_experts_per_tok=2))
    fused = FusedDecoder(model)
    with pytest.warns(UserWarning, match="n_routed_experts.*beyond the kernel's limits"):
        _step_matches(model, fused)
    assert fused.lib is None


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


X86 = platform.machine().lower() in ("x86_64", "amd64")
MARCH_NEEDS = {
    "x86-64-v3": {"avx2", "fma", "bmi2"},
    "x86-64-v4": {"avx512f", "avx512bw", "avx512dq", "avx512vl"},
}
MARCH_NODES = [  # fused-vs-model parity through the kernel: decode, several tokens per row, the MTP layer
    "tests/test_engine_fused.py::test_fused_step_equals_the_model_forward[native-glm5-widths-lengths4]",
    "tests/test_engine_fused.py::test_fused_step_equals_the_model_forward[native-no-norm-topk-lengths2]",
    "tests/test_engine_fused.py::test_fused_step_equals_the_model_forward[native-two-shared-experts-lengths2]",
    "tests/test_engine_fused.py::test_native_kernel_verifies_several_tokens_per_row_in_causal_order[lengths2]",
    "tests/test_engine_fused.py::test_native_mtp_layer_equals_the_models_mtp_forward",
    "tests/test_mtp_reference.py::test_the_engines_drafting_step_equals_the_reference[native]",
    # every weight format through this build's SIMD loads (and its widening of every e4m3 code)
    *[
        f"tests/test_engine_formats.py::test_each_format_steps_like_the_model_on_the_same_weights[native-{f}-multi-block]"
        for f in ("fp32", "bf16", "int8", "fp8")
    ],
    "tests/test_engine_formats.py::test_each_format_verifies_several_tokens_and_drafts_with_the_mtp_layer[fp8]",
    "tests/test_engine_formats.py::test_the_kernel_widens_fp8_exactly_as_dequantize",
]
MARCH_ISA = {"x86-64": "portable", "x86-64-v3": "avx2", "x86-64-v4": "avx512"}


@pytest.mark.slow  # four builds, each running the parity nodes in a fresh process (~20 s each on 2 cores)
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("march", ["native", "x86-64", "x86-64-v3", "x86-64-v4"])
def test_the_kernel_built_for_each_cpu_family_equals_the_model(march: str, tmp_path) -> None:  # noqa: ANN001
    """GLM5_NATIVE_MARCH=x86-64-v3 builds the kernel without AVX-512 (AVX2 + FMA + F16C), x86-64-v4 with it,
    x86-64 the portable C path, native for this CPU: each build, in its own cache folder and process, passes the
    fused-vs-model parity tests in every weight format and reports its SIMD path. So one AVX-512 machine covers
    the AVX2-only machines' code, and x86-64-v3 also runs on any AVX2 machine."""
    if march != "native":
        if not X86:
            pytest.skip(f"-march={march} is an x86-64 level")
        missing = MARCH_NEEDS.get(march, set()) - _cpu_flags()
        if missing:
            pytest.skip(f"this CPU cannot run -march={march} code (lacks {sorted(missing)})")
        probe = subprocess.run(
            [shutil.which("cc"), f"-march={march}", "-E", "-x", "c", os.devnull], capture_output=True
        )
        if probe.returncode:
            pytest.skip(f"the C compiler does not know -march={march}")
    env = {**os.environ, "GLM5_CACHE_DIR": str(tmp_path), native.MARCH_ENV: march, "GLM5_NATIVE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MARCH_NODES],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(MARCH_NODES)} passed" in out.stdout, out.stdout[-2000:]
    (built,) = (tmp_path / "kernels").glob("glm5_decode_*.so")  # built here, with this march
    isa = subprocess.run(
        [sys.executable, "-c", "from glm5.kernels import native; print(native.isa())"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert isa == MARCH_ISA.get(march, isa), isa
    if march != "native" and shutil.which("objdump"):  # the flag took effect
        asm = subprocess.run(["objdump", "-d", str(built)], capture_output=True, text=True).stdout
        if march == "x86-64":
            assert "ymm" not in asm and "zmm" not in asm  # SSE2 at most
        elif march == "x86-64-v3":
            assert "zmm" not in asm and "ymm" in asm  # 256-bit AVX code, no AVX-512 register anywhere
        else:
            assert "zmm" in asm  # 512-bit AVX-512 code


def test_the_kernels_march_comes_from_the_environment_and_is_checked(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv(native.MARCH_ENV, raising=False)
    assert native.march() == "native" and "-march=native" in native.compile_flags()
    monkeypatch.setenv(native.MARCH_ENV, "x86-64-v3")
    assert "-march=x86-64-v3" in native.compile_flags() and "-march=native" not in native.compile_flags()
    monkeypatch.setenv(native.MARCH_ENV, "native; rm -rf /")
    with pytest.raises(RuntimeError, match="not a -march value"):
        native.march()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_the_kernels_threaded_paths_equal_one_thread_and_the_model() -> None:
    """Widths where the kernel splits work over its threads (the projections' rows, a row's attention heads,
    the indexer's keys: `small`'s 8 heads x 144-wide latents, 600 cached keys): two threads give the model's
    logits, and bit for bit the one-thread result (each output is summed by one thread in a fixed order)."""
    cfg = GLM5Config.from_preset("small").replace(num_hidden_layers=2, vocab_size=1024, index_topk=64)
    model = noisy_model(cfg)
    caches = twin_caches(model, [600], num_blocks=160) + twin_caches(model, [600], num_blocks=160)
    fused = decoder(model, "native")
    assert fused.lib is not None, native.load_error()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads, (ref_cache, fused_cache) in ((2, caches[:2]), (1, caches[2:])):
            torch.set_num_threads(threads)
            nxt = torch.tensor([17])
            for cache in (ref_cache, fused_cache):
                cache.prepare([0], [[17]])
            with torch.no_grad():
                ref = model(nxt[:, None], ref_cache).logits[:, -1]
            logits, _ = fused(nxt, fused_cache)
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
            outs.append(logits)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
