"""The compiled decode step (glm5.engine.compiled): the same tokens as eager decoding, the eager fallback with one
warning, the auto setting. On a CPU the capture is checked with torch.compile's "eager" backend (no code
generation, seconds); the GPU tests compile with inductor and CUDA graphs."""

from __future__ import annotations

import warnings

import pytest
import torch
from configs import MICRO

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.compiled import CompiledDecode, compile_wanted

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _model(device: str = "cpu") -> GLM5ForCausalLM:
    torch.manual_seed(0)
    return GLM5ForCausalLM(MICRO.replace(torch_dtype="float32")).eval().to(device)


def _tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


def _runner(llm: LLM):  # noqa: ANN202
    return llm.engine.executor.runner


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_setting_auto_is_on_for_cuda_only():
    assert compile_wanted("auto", torch.device("cuda")) and compile_wanted(None, torch.device("cuda", 1))
    assert not compile_wanted("auto", torch.device("cpu")) and not compile_wanted("auto", torch.device("mps"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="EngineConfig.compile='yes': use one of auto, on, off"):
        compile_wanted("yes", torch.device("cpu"))
    assert _runner(LLM(_model(), block_size=4)).compiled is None  # CPU default: the fused step, not compile


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens():
    model = _model()
    eager = LLM(model, block_size=4, fused_decode=False, compile="off")
    compiled = LLM(model, block_size=4, fused_decode=False, compile="on", compile_backend="eager")
    step = _runner(compiled).compiled
    assert step is not None and step.backend == "eager" and step.mode is None
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile would warn and fall back silently
        got, got_sampled = _tokens(compiled), _tokens(compiled, sampled)
    # every decode step went through it
    assert step.failed is None and step.calls >= 2 * (GREEDY.max_tokens - 1)
    assert got == _tokens(eager) and got_sampled == _tokens(eager, sampled)


def test_a_failing_compile_warns_once_and_decodes_eagerly(monkeypatch):
    model = _model()
    eager = _tokens(LLM(model, block_size=4, fused_decode=False))
    llm = LLM(model, block_size=4, fused_decode=False, compile="on", compile_backend="eager")
    step = _runner(llm).compiled

    def broken(*args):  # noqa: ANN002, ANN202
        raise RuntimeError("backend exploded\nlong traceback")

    monkeypatch.setattr(step, "_fn", broken)
    with pytest.warns(
        RuntimeWarning, match=r"decode step failed \(RuntimeError: backend exploded\); decoding eager"
    ):
        got = _tokens(llm)
    assert got == eager and step.failed == "RuntimeError: backend exploded"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _tokens(llm) == eager  # warned once: later steps decode eagerly without a word


@pytest.mark.gpu
def test_cuda_graph_decode_gives_the_eager_tokens():
    if not torch.cuda.is_available():
        pytest.skip("accelerator: needs a CUDA device (inductor + CUDA graphs)")
    model = _model("cuda")
    eager = _tokens(LLM(model, block_size=16, compile="off"))
    llm = LLM(model, block_size=16, compile="auto")
    step = _runner(llm).compiled
    assert step is not None and step.mode == "reduce-overhead"
    assert _tokens(llm) == eager and step.failed is None


@pytest.mark.gpu
def test_compiled_decode_step_on_the_accelerator_matches_eager_logits():
    if not torch.cuda.is_available():
        pytest.skip("accelerator: needs a CUDA device")
    from glm5.engine.kv_cache import PagedLatentCache

    model = _model("cuda")
    step = CompiledDecode(model)
    caches = [PagedLatentCache(model.config, 16, 4, device=torch.device("cuda")) for _ in range(2)]
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    for cache in caches:
        cache.add_sequence(0)
        cache.prepare([0], [PROMPTS[0]])
        with torch.no_grad():
            model(ids, cache)
        cache.advance(len(PROMPTS[0]))
    token = torch.tensor([[7]], device="cuda")
    with torch.no_grad():
        for cache in caches:
            cache.prepare([0], [[7]])
        ref = model(token, caches[0]).logits
        got, _ = step(token, caches[1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
