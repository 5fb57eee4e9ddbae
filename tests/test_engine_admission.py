"""Admission counts sequences, not requests: a request with n completions forks n - 1 siblings after its prefill,
and the running batch never exceeds `max_num_seqs` because of them; an n that can never fit is refused up front."""

from __future__ import annotations

import pytest
import torch
from configs import MICRO

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = MICRO.replace(max_position_embeddings=256, eos_token_id=[1])


def engine(max_num_seqs: int):
    torch.manual_seed(0)
    return LLM(GLM5ForCausalLM(CFG).eval(), block_size=4, max_num_seqs=max_num_seqs).engine


def test_running_sequences_never_exceed_max_num_seqs_when_requests_fork_n_completions() -> None:
    eng = engine(max_num_seqs=5)
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=1, ignore_eos=True)
    for i in range(4):  # 12 sequences in all, 5 may run
        eng.add_request(None, [2 + i, 3, 4, 5], params)
    peak, tokens, finished = 0, {}, set()
    while eng.has_unfinished_requests():
        for out in eng.step():  # each step's outputs carry that step's new tokens
            for c in out.outputs:
                tokens.setdefault((out.request_id, c.index), []).extend(c.token_ids)
            if out.finished:
                finished.add(out.request_id)
        peak = max(peak, eng.stats()["num_running"])
    assert peak <= 5
    assert peak >= 3  # one whole request (n = 3) did run at once
    assert len(finished) == 4 and len(tokens) == 12 and all(len(t) == 6 for t in tokens.values())


def test_an_n_larger_than_max_num_seqs_is_refused_up_front() -> None:
    eng = engine(max_num_seqs=2)
    with pytest.raises(ValueError, match=r"n=3 .*max_num_seqs=2"):
        eng.add_request(None, [2, 3, 4], SamplingParams(max_tokens=2, n=3))


def test_forked_completions_in_a_nearly_full_cache_preempt_instead_of_running_out_of_blocks() -> None:
    """n > 1 siblings share the prompt's partly filled last block; each one's first write copies it. The scheduler
    must count that copy, or a nearly full cache raised "out of blocks" mid-step. Tokens are those of a roomy cache
    (seeded completions do not depend on preemption)."""
    torch.manual_seed(0)
    model = GLM5ForCausalLM(CFG).eval()
    params = SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=1, ignore_eos=True)
    prompt = [[2, 3, 4, 5, 6, 7]]  # 1.5 blocks: the second is shared and partly filled after the fork

    def completions(num_blocks: int):
        llm = LLM(model, block_size=4, num_blocks=num_blocks)
        return [c.token_ids for c in llm.generate(prompt, params)[0].outputs], llm.engine.num_preemptions

    roomy, none = completions(64)
    assert none == 0
    for num_blocks in (4, 5, 6):
        tokens, preemptions = completions(num_blocks)
        assert preemptions > 0
        assert tokens == [t[: len(tokens[0])] for t in roomy] and len(tokens[0]) >= 5
