"""Post-training: the frontier item pool and its split, the held-out metrics, the reward variants' formulas, the KL
anchor, and a seeded pre-train -> SFT -> RL smoke whose outputs load and evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glm5.data.frontier import DIFFICULTIES, HELDOUT_FRACTION, KINDS, frontier_tasks, is_heldout, item_key
from glm5.data.tasks import ABSTENTION, check_answer, generate_tasks
from glm5.eval.frontier import frontier_summary, tool_call_right, tool_call_valid
from glm5.eval.metrics import wilson_interval
from glm5.eval.runner import EvalResult
from glm5.eval.tasks import make_questions
from glm5.rl.posttrain import VARIANTS, attach_reference, posttrain_recipe
from glm5.rl.rewards import abstention_reward, get_reward_fn, graded_abstention_reward, math_reward


# --- the item pool ---------------------------------------------------------------------------------------------
def test_frontier_split_is_deterministic_disjoint_and_by_item():
    for kind in KINDS:
        train = frontier_tasks(kind, 300, 0)
        held = make_questions(kind, 60)  # the evaluation tasks draw held-out items only
        assert [t.messages for t in frontier_tasks(kind, 300, 0)] == [t.messages for t in train]
        train_keys, held_keys = {t.meta["key"] for t in train}, {t.meta["key"] for t in held}
        assert not train_keys & held_keys, kind
        d = kind.removeprefix("frontier_")
        assert all(not is_heldout(item_key(d, k)) for k in train_keys)
        assert all(is_heldout(item_key(d, k)) for k in held_keys)
        assert {t.kind for t in train} == {kind} and all(t.meta["difficulty"] == d for t in held)
    # TASK_GENERATORS' frontier kinds (SFT data, RL prompts) are the training items
    sft = generate_tasks({"frontier_easy": 50, "frontier_tool": 5}, 3)
    assert all(not is_heldout(item_key(t.meta["difficulty"], t.meta["key"])) for t in sft)
    # about HELDOUT_FRACTION of the easy items (a known pool) are held out
    keys = [
        f"{p.format(a=a, op='+', b=b)}"
        for p in ("What is {a} {op} {b}?",)
        for a in range(10)
        for b in range(10)
    ]
    share = sum(is_heldout(item_key("easy", k)) for k in keys) / len(keys)
    assert abs(share - HELDOUT_FRACTION) < 0.12


def test_frontier_items_have_the_right_answers():
    for t in frontier_tasks("easy", 40, 1, "heldout"):
        a, op, b = t.meta["expression"].split()
        assert int(t.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and len(a) == len(b) == 1
        assert check_answer(t, t.messages[-1]["content"])
    easy = frontier_tasks("easy", 400, 1)
    # EASY_ABSTAIN_SHARE
    assert 0.04 < sum(t.messages[-1]["content"] == ABSTENTION for t in easy) / len(easy) < 0.18
    hard = frontier_tasks("hard", 200, 1)
    abstained = [t for t in hard if t.messages[-1]["content"] == ABSTENTION]
    assert 0.15 < len(abstained) / len(hard) < 0.45  # HARD_ABSTAIN_SHARE of the training items
    assert all(t.answer is not None and len(t.meta["expression"].split()[0]) == 3 for t in hard)
    assert all(t.messages[-1]["content"] != ABSTENTION for t in frontier_tasks("hard", 100, 1, "heldout"))
    tool = frontier_tasks("tool", 5, 2)[0]
    call = tool.messages[1]["tool_calls"][0]["function"]
    assert call["name"] == "calculator" and tool.messages[2]["content"] == tool.answer
    assert eval(call["arguments"]["expression"]) == int(tool.answer)  # noqa: S307 (digits and * only)
    assert all(t.answer is None for t in frontier_tasks("unanswerable", 10, 0))
    with pytest.raises(ValueError, match="unknown frontier kind"):
        frontier_tasks("medium", 1, 0)


# --- metrics ---------------------------------------------------------------------------------------------------
def _call(arguments: str, name: str = "calculator") -> list[dict]:
    return [{"tool_calls": [{"function": {"name": name, "arguments": arguments}}]}]


def test_tool_call_validity():
    assert tool_call_valid(_call('{"expression": "275 * 59"}'))
    assert not tool_call_valid(_call('{"expression": "(7 = 189"}'))  # the old demo's malformed call
    assert not tool_call_valid(_call('{"expression": "1 / 0"}'))
    assert not tool_call_valid(_call('{"expr": "2 * 3"}'))
    assert not tool_call_valid(_call("not json"))
    assert not tool_call_valid(_call('{"expression": "2 * 3"}', name="search"))
    assert not tool_call_valid([{"tool_calls": [], "content": "16225"}])
    # right: valid and computing the asked product (a well-formed call with other operands is not)
    assert tool_call_right(_call('{"expression": "275 * 59"}'), "16225")
    assert not tool_call_right(_call('{"expression": "712 * 80"}'), "16225")
    assert not tool_call_right(_call('{"expression": "(7 = 189"}'), "16225")


def _result(outcomes: dict[str, list[tuple[bool, bool]]], tool_calls: list[str]) -> EvalResult:
    """An EvalResult as glm5.eval.runner.evaluate builds it: per-task summaries and records."""
    from glm5.eval.metrics import summarize

    metrics, records, every = {}, [], []
    for kind, flags in outcomes.items():
        metrics[kind] = summarize([[c] for c, _ in flags], [[a] for _, a in flags])
        every += flags
        for i, (c, a) in enumerate(flags):
            turns = _call(tool_calls[i]) if kind == "frontier_tool" else []
            expected = "6" if kind == "frontier_tool" else None
            records.append(
                {
                    "task": kind,
                    "expected": expected,
                    "samples": [{"correct": c, "abstained": a, "turns": turns}],
                }
            )
    metrics["overall"] = summarize([[c] for c, _ in every], [[a] for _, a in every])
    return EvalResult("test", {}, metrics, records)


def test_frontier_summary_numbers_by_hand():
    ok, wrong, abstain = (True, False), (False, False), (False, True)
    result = _result(
        {
            "frontier_easy": [ok, ok, ok, wrong],
            "frontier_hard": [wrong, abstain, abstain, abstain],
            "frontier_unanswerable": [(True, True), (True, True), wrong, (True, True)],
            "frontier_tool": [ok, wrong],
        },
        ['{"expression": "2 * 3"}', '{"expression": "2 *"}'],
    )
    s = frontier_summary(result)
    assert set(s["per_difficulty"]) == set(DIFFICULTIES)
    assert s["accuracy"] == pytest.approx(7 / 14)
    assert s["abstention_rate"] == pytest.approx(6 / 14)  # 3 on hard + 3 right ones on unanswerable
    assert s["hallucination_rate"] == pytest.approx(4 / 7)  # wrong 4 / (wrong 4 + abstained-not-right 3)
    hard = s["per_difficulty"]["hard"]
    assert hard["hallucination_rate"] == pytest.approx(1 / 4) and hard["abstention_rate"] == 0.75
    assert hard["hallucination_ci"] == pytest.approx(list(wilson_interval(1, 4)))
    assert s["per_difficulty"]["easy"]["hallucination_rate"] == 1.0
    assert s["unanswerable_abstention"] == 0.75 and s["tool_accuracy"] == 0.5 and s["tool_call_valid"] == 0.5
    assert s["accuracy_ci"] == pytest.approx(list(wilson_interval(7, 14)))
    assert s["tool_call_right"] == 0.5  # "2 * 3" computes the expected 6; "2 *" is not valid


# --- rewards ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "answer", "binary", "abstain", "generous", "harsh", "bold"),
    [
        ("7", "7", 1.0, 1.0, 1.0, 1.0, 1.0),  # right
        ("8", "7", 0.0, -1.0, -1.0, -2.0, -1.0),  # wrong
        ("I don't know.", "7", 0.0, 0.0, 0.5, 0.0, -0.5),  # abstaining on an answerable question
        ("I don't know.", None, 0.0, 1.0, 1.0, 1.0, 1.0),  # abstaining when nobody can know: right
        ("Paris", None, 0.0, -1.0, -1.0, -2.0, -1.0),  # answering the unanswerable
    ],
)
def test_reward_variants_by_hand(reply, answer, binary, abstain, generous, harsh, bold):
    meta = {"answer": answer}
    assert get_reward_fn(VARIANTS["binary"]["reward"])(reply, meta) == binary
    assert get_reward_fn(VARIANTS["abstain"]["reward"])(reply, meta) == abstain
    assert get_reward_fn(VARIANTS["abstain+kl"]["reward"])(reply, meta) == abstain
    assert get_reward_fn(VARIANTS["generous"]["reward"])(reply, meta) == generous
    assert get_reward_fn("abstain-harsh")(reply, meta) == harsh
    assert get_reward_fn(VARIANTS["bold+kl"]["reward"])(reply, meta) == bold
    assert graded_abstention_reward()(reply, meta) == abstention_reward(reply, meta) == abstain
    assert math_reward(reply, meta) == binary


def test_graded_reward_sets_the_confidence_bar():
    # expected reward of answering with P(right) = p vs abstaining: answer iff p > (abstain - wrong) / (right - wrong)
    for right, abstain, wrong, bar in (
        (1, 0, -1, 0.5),
        (1, 0.5, -1, 0.75),
        (1, 0, -2, 2 / 3),
        (1, -0.5, -1, 0.25),
    ):
        for p in (bar - 0.01, bar + 0.01):
            answer = p * right + (1 - p) * wrong
            assert (answer > abstain) == (p > bar)
        graded_abstention_reward(right, abstain, wrong)
    with pytest.raises(ValueError, match="wrong < abstain < right"):
        graded_abstention_reward(1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="unknown post-training variant"):
        posttrain_recipe("nonsense")


def test_recipes_and_the_kl_anchor():
    from glm5.rl.recipes import tiny_model
    from glm5.rl.trainer import RLTrainer

    for name in ("abstain+kl", "bold+kl"):
        assert posttrain_recipe(name).configs()[2].loss_config().kl_coef == VARIANTS[name]["kl_coef"] > 0
    assert posttrain_recipe("abstain").configs()[2].loss_config().kl_coef == 0
    counts = posttrain_recipe("abstain").task_counts
    answerable = sum(v for k, v in counts.items() if k != "frontier_unanswerable")
    assert set(counts) == set(KINDS) and counts["frontier_unanswerable"] / answerable == pytest.approx(1 / 3)
    model = tiny_model(64, [1], 0, seed=0)
    trainer = RLTrainer(model, posttrain_recipe("abstain+kl").configs()[2])
    attach_reference(trainer, model)
    ref = trainer.ref_model
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training moves the policy, not its anchor
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))
    plain = RLTrainer(model, posttrain_recipe("abstain").configs()[2])
    attach_reference(plain, model)
    assert plain.ref_model is None  # no KL term, no reference forward


# --- the pipeline ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_sft_rl_smoke_outputs_load_and_evaluate(tmp_path):
    from glm5.demo import pretrain, sft
    from glm5.eval.frontier import evaluate_frontier
    from glm5.model import GLM5ForCausalLM
    from glm5.rl.cli import run_rl

    torch.manual_seed(0)
    pretrain(tmp_path / "pre", smoke=True)
    s = sft(tmp_path / "pre", tmp_path / "sft", smoke=True)
    assert s["step"] > 0 and math.isfinite(s["val_lm"])
    recipe = posttrain_recipe("abstain+kl", steps=1).replace(task_counts={k: 4 for k in KINDS})
    summary = run_rl(recipe, tmp_path / "rl", init=str(tmp_path / "sft" / "model"), quiet=True)
    assert summary["steps"] == 1 and summary["buffer"]["trained"] > 0
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    # the anchor was in the loss
    assert any(r.get("kind") == "rl" and math.isfinite(r["kl"]) for r in records)
    GLM5ForCausalLM.from_pretrained(str(tmp_path / "rl" / "model"))
    numbers = evaluate_frontier(tmp_path / "rl" / "model", 2)
    for key in ("accuracy", "abstention_rate", "tool_call_valid"):
        assert 0.0 <= numbers[key] <= 1.0
    assert {d: v["n"] for d, v in numbers["per_difficulty"].items()} == {d: 2 for d in DIFFICULTIES}
