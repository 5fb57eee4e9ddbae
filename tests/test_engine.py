"""The inference engine against the model itself: greedy decode, batching, chunked prefill, sparse vs dense decode,
prefix caching, abort, preemption, seeds, n > 1, stops, logprobs, weight updates and pause/resume."""

from __future__ import annotations

import pytest
import torch
from configs import MICRO

from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.llm import OFFLINE_DECODE_STEPS
from glm5.serve import build_engine

pytestmark = pytest.mark.usefixtures("one_thread")


CFG = MICRO.replace(max_position_embeddings=256, eos_token_id=[1])
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def model(seed: int = 0, cfg: GLM5Config = CFG) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    return GLM5ForCausalLM(cfg).eval()


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_sequence_greedy(m: GLM5ForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The reference: re-run the whole sequence (no cache) and take the argmax, n times."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        seq = torch.cat([seq, m(seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt) :].tolist()


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# ------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("spec", [0, 2])
def test_engine_greedy_equals_full_sequence_greedy_decode(spec: int) -> None:
    m = model()
    ps = prompts([3, 12, 30])  # contexts below and above index_topk = 8
    outs = LLM(m, block_size=4, num_speculative_tokens=spec).generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == full_sequence_greedy(m, p, 10)
        assert out.outputs[0].finish_reason == "length" and out.finished


def test_many_concurrent_requests_of_different_lengths_equal_each_run_alone() -> None:
    m = model(1)
    ps = prompts([1, 5, 9, 14, 23, 31, 40, 2], seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = LLM(m, block_size=4, max_num_batched_tokens=16, max_num_seqs=5)  # chunked prefill, a capped batch
    batched = token_ids(llm.generate(ps, params))
    alone = [token_ids(LLM(m, block_size=8).generate([p], params))[0] for p in ps]
    assert batched == alone
    assert llm.engine.cache.num_used_blocks == 0


def test_chunked_prefill_interleaves_with_decode_of_other_requests() -> None:
    llm = LLM(model(), block_size=4, max_num_batched_tokens=8, decode_steps=1)
    eng = llm.engine
    short, long = prompts([4, 40], seed=5)
    eng.add_request("short", short, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    eng.step()  # prefills "short" and samples its first token
    eng.add_request("long", long, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    short_seq = eng.requests["short"].seqs[0]
    cached_long = []
    for _ in range(5):
        before = short_seq.num_output
        eng.step()
        assert short_seq.num_output == before + 1  # a decode step every step
        cached_long.append(eng.requests["long"].seqs[0].num_cached)
    assert cached_long == [8, 16, 24, 32, 40]  # while the long prompt goes in, 8 tokens per step


def test_sparse_decode_equals_the_dense_mask_reference_beyond_index_topk() -> None:
    ps = prompts([20, 33], seed=7)  # 20-45 keys per query: far above index_topk = 8
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    sparse = LLM(model(2), block_size=4, attention_impl="sparse").generate(ps, params)
    dense = LLM(model(2), block_size=4, attention_impl="mask").generate(ps, params)
    for a, b in zip(sparse, dense):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < 1e-4


def test_prefix_cache_hit_reuses_blocks_and_gives_identical_outputs() -> None:
    llm = LLM(model(3), block_size=4)
    (shared,) = prompts([26], seed=11)
    first = llm.generate([shared + [5, 6]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    cached_before = llm.engine.cache.num_cached_blocks
    assert cached_before >= 6  # the finished request's full blocks stay cached
    again = llm.generate([shared + [5, 6]], GREEDY)[0]
    other = llm.generate([shared + [9]], GREEDY)[0]
    # 6 full blocks of the shared prefix
    assert again.num_cached_tokens == 24 and other.num_cached_tokens == 24
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    fresh = LLM(model(3), block_size=4, enable_prefix_caching=False).generate([shared + [9]], GREEDY)[0]
    assert other.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_a_sequence_grown_from_a_prefix_hit_registers_its_new_blocks() -> None:
    """Regression: a prefix hit once recorded positions as registered blocks, so growing past them crashed."""
    llm = LLM(model(3), block_size=4)
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    grown = llm.generate([[5, 6, 7, 8, 9]], long)[0]
    assert grown.num_cached_tokens == 4
    assert grown.outputs[0].token_ids == full_sequence_greedy(model(3), [5, 6, 7, 8, 9], 30)
    # the blocks it filled while growing are cached too: its whole sequence is a prefix now
    again = llm.generate([[5, 6, 7, 8, 9] + grown.outputs[0].token_ids[:28]], GREEDY)[0]
    assert again.num_cached_tokens == 32


def test_ids_past_the_tokenizer_vocabulary_decode_to_no_text() -> None:
    """Checkpoints pad the embedding table past the tokenizer; such ids must not fail the batch."""

    class SmallTokenizer:
        vocab_size = 3
        eos_token_ids: list[int] = []

        def decode(self, ids, skip_special_tokens=False):  # noqa: ANN001
            assert all(i < 3 for i in ids)
            return "".join("abc"[i] for i in ids)

        def encode(self, text):  # noqa: ANN001
            return ["abc".index(c) for c in text]

    out = LLM(model(3), SmallTokenizer()).generate([[0, 1, 2]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 10
    assert out.text == "".join("abc"[t] for t in out.token_ids if t < 3)


def test_prefix_cache_hit_with_speculative_decoding_keeps_outputs() -> None:
    llm = LLM(model(3), block_size=4, num_speculative_tokens=2)
    (p,) = prompts([30], seed=12)
    a = llm.generate([p], GREEDY)[0]
    b = llm.generate([p], GREEDY)[0]
    assert b.num_cached_tokens == 28
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == full_sequence_greedy(llm.model, p, 10)


@pytest.mark.parametrize("spec", [0, 2])
def test_abort_frees_every_block(spec: int) -> None:
    llm = LLM(model(), block_size=4, num_speculative_tokens=spec, enable_prefix_caching=False)
    eng = llm.engine
    params = SamplingParams(max_tokens=50, temperature=0.8, n=2, seed=1, ignore_eos=True)
    for i, p in enumerate(prompts([7, 19, 30], seed=2)):
        eng.add_request(f"r{i}", p, params)
    for _ in range(4):
        eng.step()
    assert eng.cache.num_used_blocks > 0
    produced = [s.num_output for r in eng.requests.values() for s in r.seqs]
    assert len(produced) == 6 and all(0 < n < 50 for n in produced)  # mid-generation: aborted, not finished
    eng.abort_request(["r0", "r1", "r2"])
    outs = eng.step()
    assert {o.request_id for o in outs} == {"r0", "r1", "r2"}
    assert all(o.finished and all(c.finish_reason == "abort" for c in o.outputs) for o in outs)
    assert eng.cache.num_used_blocks == 0 and eng.cache.num_free_blocks == eng.cache.num_blocks - 1
    if spec:
        assert eng.mtp_cache.num_used_blocks == 0
    assert not eng.has_unfinished_requests()


def test_preemption_when_blocks_run_out_keeps_outputs_identical() -> None:
    m = model(4)
    ps = prompts([6, 11, 15, 9, 13], seed=4)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    roomy = token_ids(LLM(m, block_size=4).generate(ps, params))
    tight = LLM(m, block_size=4, num_blocks=24)  # 92 slots for five sequences of up to 35 tokens
    assert token_ids(tight.generate(ps, params)) == roomy
    assert tight.engine.num_preemptions > 0
    assert tight.engine.cache.num_used_blocks == 0


# ------------------------------------------------------------------------------------- several decode steps
@pytest.mark.parametrize("fused", [True, False])
def test_several_decode_steps_per_engine_step_equal_one_at_a_time(fused: bool) -> None:
    """decode_steps > 1: plain-argmax batches make several tokens per engine step (one kernel call through the
    native kernel, one forward after another through the model) -- the tokens of one step at a time, with
    chunked prefill and ragged rows; a stop id inside a group drops the tokens after it; max_tokens and
    max_model_len cut groups short; the blocks registered hold the real tokens (a prefix hit continues alike)."""
    m = model(7)
    ps = prompts([3, 12, 30], seed=9)
    params = SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True)
    one = LLM(m, block_size=4, max_num_batched_tokens=16, fused_decode=fused, decode_steps=1)
    ref = token_ids(one.generate(ps, params))
    assert ref[2] == full_sequence_greedy(m, ps[2], 13)
    for steps in (2, 5):
        llm = LLM(m, block_size=4, max_num_batched_tokens=16, fused_decode=fused, decode_steps=steps)
        assert token_ids(llm.generate(ps, params)) == ref
        assert llm.engine.num_steps < one.engine.num_steps
        stop = ref[1][6]
        out = llm.generate([ps[1]], SamplingParams(max_tokens=13, temperature=0.0, stop_token_ids=[stop]))
        assert out[0].outputs[0].token_ids == ref[1][: ref[1].index(stop) + 1]
        assert out[0].outputs[0].finish_reason == "stop"
        grown = ps[2] + ref[2][:8]
        again = llm.generate([grown], params)[0]
        assert again.num_cached_tokens >= 36  # the earlier request's blocks, its generated tokens included
        assert again.outputs[0].token_ids == full_sequence_greedy(m, grown, 13)
        tight = [
            LLM(m, block_size=4, max_model_len=37, fused_decode=fused, decode_steps=n) for n in (1, steps)
        ]
        cut = [token_ids(t.generate(ps, params)) for t in tight]
        assert cut[0] == cut[1] and len(cut[1][2]) == 37 - 30


def test_offline_llm_makes_several_tokens_per_step_and_the_streaming_engines_one() -> None:
    """LLM's default is OFFLINE_DECODE_STEPS tokens per engine step (nobody sees the steps of `generate`): the
    tokens of one step at a time, in fewer steps; the serving engine (build_engine) keeps one token per step, so
    streaming clients get each token as it is made."""
    m = model(7)
    ps = prompts([3, 12], seed=9)
    params = SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True)
    offline, one = LLM(m, block_size=4), LLM(m, block_size=4, decode_steps=1)
    assert token_ids(offline.generate(ps, params)) == token_ids(one.generate(ps, params))
    assert offline.engine.config.decode_steps == OFFLINE_DECODE_STEPS > 1
    assert offline.engine.num_steps < one.engine.num_steps
    assert build_engine(m, block_size=4).engine.config.decode_steps == 1
    assert build_engine(m, block_size=4, decode_steps=4).engine.config.decode_steps == 4


def test_several_decode_steps_wait_for_batches_that_all_take_the_argmax() -> None:
    """A sampled row, penalties, logprobs or a min_tokens ban in the batch: one token per step, as without."""
    m = model(8)
    ps = prompts([5, 9], seed=10)
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    others = [
        SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, min_tokens=8),
    ]
    for other in others:
        runs = [LLM(m, block_size=4, decode_steps=n) for n in (1, 4)]
        outs = [token_ids(r.generate(ps, [greedy, other])) for r in runs]
        assert outs[0] == outs[1]
        assert runs[0].engine.num_steps == runs[1].engine.num_steps
    with pytest.raises(ValueError, match="decode_steps"):
        LLM(m, decode_steps=0)


# ------------------------------------------------------------------------------------- sampling behaviour
def test_seeded_requests_are_reproducible_whatever_else_is_in_the_batch() -> None:
    m = model(5)
    (p,) = prompts([9], seed=21)
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = LLM(m, block_size=4).generate([p], params)[0].outputs[0].token_ids
    noise = [
        SamplingParams(max_tokens=m_, temperature=0.7, seed=s, ignore_eos=True) for s, m_ in ((1, 5), (2, 20))
    ]
    crowd = LLM(m, block_size=4).generate(prompts([3, 17], seed=8) + [p], noise + [params])
    assert crowd[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.95, seed=99, ignore_eos=True)
    assert LLM(m, block_size=4).generate([p], other_seed)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks_and_differ() -> None:
    llm = LLM(model(6), block_size=4, enable_prefix_caching=False)
    eng = llm.engine
    (p,) = prompts([24], seed=13)
    eng.add_request("r", p, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    eng.step()  # prefill once, fork into 4 completions
    seqs = eng.requests["r"].seqs
    tables = [eng.cache.seqs[s.seq_id].blocks for s in seqs]
    assert all(t[:6] == tables[0][:6] for t in tables)  # 6 full prompt blocks, shared by all 4
    assert eng.cache.num_used_blocks == 6
    eng.step()
    assert eng.cache.num_used_blocks == 6 + 4  # each completion writes its own next block
    while eng.has_unfinished_requests():
        eng.step()
    out = eng.final_output(eng_request := seqs[0].request)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and eng_request.finished
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_ids_eos_ignore_eos_min_tokens_and_max_tokens() -> None:
    m = model()
    (p,) = prompts([10], seed=3)
    free = full_sequence_greedy(m, p, 10)
    stop_at = free[3]
    first = free.index(stop_at)
    llm = LLM(m, block_size=4)
    out = llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at]))[
        0
    ].outputs[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # eos ids come from the config by default; ignore_eos turns them off
    eos_model = GLM5ForCausalLM(CFG.replace(eos_token_id=[stop_at])).eval()
    eos_model.load_state_dict(m.state_dict())
    eos_llm = LLM(eos_model, block_size=4)
    assert (
        eos_llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0].token_ids
        == free[: first + 1]
    )
    ignoring = eos_llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[
        0
    ].outputs[0]
    assert ignoring.token_ids == free and ignoring.finish_reason == "length"
    # min_tokens forbids the stop id until then, so the greedy path changes only after it
    late = eos_llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0, min_tokens=first + 2))[
        0
    ].outputs[0]
    assert late.token_ids[:first] == free[:first] and stop_at not in late.token_ids[: first + 2]


def test_logprobs_and_prompt_logprobs_are_the_models_log_softmax() -> None:
    m = model(7)
    (p,) = prompts([14], seed=4)
    out = LLM(m, block_size=4).generate(
        [p], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    )[0]
    gen = out.outputs[0]
    with torch.no_grad():
        full = torch.log_softmax(m(torch.tensor([p + gen.token_ids])).logits[0], -1)
    for i, (tok, lp) in enumerate(zip(gen.token_ids, gen.logprobs)):
        row = full[len(p) - 1 + i]
        assert abs(lp[tok] - row[tok].item()) < 1e-4
        assert set(row.topk(3).indices.tolist()) <= set(lp)
    assert gen.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(gen.token_ids, gen.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for t in range(1, len(p)):
        assert abs(out.prompt_logprobs[t][p[t]] - full[t - 1, p[t]].item()) < 1e-4


def test_weight_update_tags_tokens_with_the_version_and_drops_the_prefix_cache() -> None:
    llm = LLM(model(8), block_size=4)
    (p,) = prompts([12], seed=5)
    before = llm.generate([p], GREEDY)[0]
    assert before.weight_version == 0 and set(before.outputs[0].weight_versions) == {0}
    new = model(9)
    assert llm.update_weights(new.state_dict(), version=7) == 7
    after = llm.generate([p], GREEDY)[0]
    assert after.num_cached_tokens == 0  # cached latents came from the old weights
    assert after.weight_version == 7 and set(after.outputs[0].weight_versions) == {7}
    assert after.outputs[0].token_ids == full_sequence_greedy(new, p, 10)
    with pytest.raises(ValueError, match="unknown parameter"):
        llm.update_weights({"nope.weight": torch.zeros(1)})


def test_pause_holds_requests_and_resume_continues_them_unchanged() -> None:
    llm = LLM(model(), block_size=4)
    eng = llm.engine
    (p,) = prompts([9], seed=6)
    eng.add_request("r", p, GREEDY)
    eng.step()
    eng.step()
    eng.pause()
    got = eng.requests["r"].seqs[0].num_output
    for _ in range(3):
        assert eng.step() == []
    assert eng.requests["r"].seqs[0].num_output == got
    eng.resume()
    tokens = []
    tokens_before = eng.requests["r"].seqs[0].output_ids
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens += out.outputs[0].token_ids
    assert tokens_before + tokens == full_sequence_greedy(llm.model, p, 10)


def test_bad_requests_raise_value_errors_naming_the_problem() -> None:
    llm = LLM(model(), block_size=4)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"])
    with pytest.raises(ValueError, match="vocab|\\[0, 256\\)"):
        llm.generate([[5, 999]])
    with pytest.raises(ValueError, match="at most"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([[5]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="unknown LLM options"):
        LLM(model(), blocksize=4)


@pytest.mark.gpu
def test_engine_on_an_accelerator_matches_the_cpu_engine() -> None:
    from glm5.device import pick_device

    device = pick_device()
    ps = prompts([5, 30], seed=14)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cpu = token_ids(LLM(model(), block_size=4, num_speculative_tokens=2).generate(ps, params))
    gpu = LLM(model(), block_size=4, num_speculative_tokens=2, device=device).generate(ps, params)
    assert token_ids(gpu) == cpu
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    again = LLM(model(), block_size=4, device=device)
    assert token_ids(again.generate(ps, seeded)) == token_ids(again.generate(ps, seeded))
