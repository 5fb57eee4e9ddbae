"""Sampling: parameter validation, each logits transform against a hand-computed value, the sampled distribution,
per-request generators, and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from glm5.engine.sampling import (
    BatchSampling,
    PenaltyState,
    SamplingParams,
    apply_penalties,
    draw_uniforms,
    make_generator,
    processed_probs,
    sample,
    sample_from_probs,
    token_logprobs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are op-dispatch bound: one thread is faster, and immune to a busy machine (two OpenMP
    threads sharing a loaded core run these tests many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= statistic) for X ~ chi2(df = categories - 1), over categories with non-zero probability."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2).item()


def batch_of(*params: SamplingParams, vocab: int = 6, penalties=None, bans=None) -> BatchSampling:
    return BatchSampling.build(list(params), vocab, torch.device("cpu"), penalties, bans)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -2),
        ("seed", 1.5),
    ],
)
def test_invalid_sampling_params_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected_and_stop_string_becomes_a_list() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_temperature_top_k_top_p_and_min_p_give_the_hand_computed_distribution() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0]]))
    plain = processed_probs(logits, batch_of(SamplingParams()))
    assert torch.allclose(plain, torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0]]), atol=1e-6)
    hot = processed_probs(logits, batch_of(SamplingParams(temperature=2.0)))
    expected = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0]).sqrt()
    assert torch.allclose(hot[0], expected / expected.sum(), atol=1e-6)
    top_k = processed_probs(logits, batch_of(SamplingParams(top_k=2)))
    assert torch.allclose(top_k[0], torch.tensor([4 / 7, 3 / 7, 0, 0, 0, 0]), atol=1e-6)
    top_p = processed_probs(logits, batch_of(SamplingParams(top_p=0.8)))  # 0.4 + 0.3 < 0.8 <= 0.85
    assert torch.allclose(top_p[0], torch.tensor([0.4, 0.3, 0.15, 0, 0, 0]) / 0.85, atol=1e-6)
    min_p = processed_probs(logits, batch_of(SamplingParams(min_p=0.3)))  # keep p >= 0.12
    assert torch.allclose(min_p[0], torch.tensor([0.4, 0.3, 0.15, 0, 0, 0]) / 0.85, atol=1e-6)
    greedy = processed_probs(logits, batch_of(SamplingParams(temperature=0)))
    assert greedy[0].tolist() == [1.0, 0, 0, 0, 0, 0]


def test_rows_of_one_batch_keep_their_own_settings() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0]])).repeat(3, 1)
    probs = processed_probs(
        logits, batch_of(SamplingParams(top_k=1), SamplingParams(), SamplingParams(temperature=0))
    )
    assert probs[0].tolist() == [1.0, 0, 0, 0, 0, 0] and probs[2].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert torch.allclose(probs[1], torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0]), atol=1e-6)


def test_penalties_match_the_hand_computed_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]])
    state = PenaltyState.create([0, 1], 6, torch.device("cpu"))  # prompt has tokens 0 and 1
    state.add([2, 2, 3])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, batch_of(params, penalties=[state]))
    # repetition: seen tokens 0..3 -> positive / 2, negative * 2; then output counts (0, 0, 2, 1, 0, 0)
    expected = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 0.5, 0.0]])
    assert torch.allclose(got, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 0.0]]))  # input untouched


def test_min_tokens_bans_stop_ids_only_at_the_first_positions() -> None:
    logits = torch.zeros(1, 3, 6)
    got = apply_penalties(logits, batch_of(SamplingParams(), bans=[([4, 5], 2)]))
    assert torch.isinf(got[0, :2, 4:]).all() and torch.isfinite(got[0, 2]).all()
    assert torch.isfinite(got[0, :, :4]).all()


def test_inverse_cdf_sampling_has_the_target_distribution() -> None:
    probs = torch.tensor([0.5, 0.2, 0.0, 0.15, 0.1, 0.05])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    ids = sample_from_probs(probs.expand(n, -1), torch.rand(n, generator=g))
    counts = torch.bincount(ids, minlength=6).double()
    assert counts[2] == 0  # a zero-probability token is never drawn
    assert chi_square_p_value(counts, probs.double()) > 1e-3


def test_greedy_rows_take_the_argmax_of_the_penalised_logits() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    state = PenaltyState.create([1], 3, torch.device("cpu"))  # token 1 is in row 0's prompt: 5 -> 0.05
    params = [SamplingParams(temperature=0, repetition_penalty=100.0), SamplingParams(temperature=0)]
    ids = sample(logits, BatchSampling.build(params, 3, torch.device("cpu"), [state, None]), None)
    assert ids.tolist() == [2, 1]


def test_per_request_generators_do_not_depend_on_the_batch() -> None:
    def gen(seed: int) -> torch.Generator:
        return make_generator(seed, torch.device("cpu"))

    alone = draw_uniforms([gen(7)], 4, torch.device("cpu"))
    crowd = draw_uniforms([gen(1), None, gen(7), gen(3)], 4, torch.device("cpu"))
    assert torch.equal(crowd[2], alone[0]) and torch.equal(crowd[1], torch.zeros(4))
    assert not torch.equal(crowd[0], crowd[2])


def test_token_logprobs_are_the_raw_log_softmax_with_top_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    chosen, top_v, top_i = token_logprobs(logits, torch.tensor([2]), 2)
    lsm = torch.log_softmax(logits, -1)
    assert math.isclose(chosen.item(), lsm[0, 2].item(), rel_tol=1e-6)
    assert top_i.tolist() == [[1, 2]] and torch.allclose(top_v, lsm[:, [1, 2]])
