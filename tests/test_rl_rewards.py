"""RL rewards: math-verify answer equivalence, the abstention table, reasoning-gym scorers, rewards by import
path, and the calculator tool environment round trip in the exact GLM-5 chat format."""

from __future__ import annotations

import logging
import re
import sysconfig
import threading
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5.data.tasks import ABSTENTION, CALCULATOR_TOOL, generate_tasks
from glm5.rl.rewards import (
    CalculatorEnvironment,
    abstention_reward,
    get_reward_fn,
    math_reward,
    reasoning_gym_reward,
    task_metadata,
)
from glm5.tokenizer import GLM5Tokenizer, render_chat, tokenize_chat
from glm5.tokenizer.tokenizer import default_corpus_files


# ---------------------------------------------------------------------------- math equivalence
@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("1/2", "0.5"),
        ("0.5", "1/2"),
        ("1,000", "1000"),
        ("The total is 1,000 dollars.", "1000"),
        ("So the answer is \\boxed{\\frac{3}{4}}.", "0.75"),
        ("x = 3", "3"),
        ("12 * 4 = 48", "48"),
        ("-7", "-7"),
    ],
)
def test_math_reward_accepts_equivalent_answers(reply, answer):
    assert math_reward(reply, {"answer": answer, "kind": "arithmetic"}) == 1.0


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("49", "48"),
        ("0.51", "1/2"),
        ("no number here", "3"),
        ("", "3"),
        (ABSTENTION, "3"),
        ("I don't know; maybe 3?", "3"),
        ("3", None),
    ],
)
def test_math_reward_rejects_wrong_answers_abstentions_and_unanswerable_questions(reply, answer):
    assert math_reward(reply, {"answer": answer, "kind": "arithmetic"}) == 0.0


def test_math_reward_works_off_the_main_thread():
    """math-verify's timeout uses SIGALRM, which raises on worker threads (reward workers, async actors)."""
    results: list[float] = []
    worker = threading.Thread(target=lambda: results.append(math_reward("1/2", {"answer": "0.5"})))
    worker.start()
    worker.join()
    assert results == [1.0]


def test_scoring_off_the_main_thread_emits_no_timeout_warning(monkeypatch, caplog, recwarn):
    """Rollout threads score with math-verify's SIGALRM timeout off (bounded input instead): its "Timeout is
    disabled" notice would be printed by every worker process, so it is silenced, and nothing else is."""
    import math_verify.grader
    import math_verify.parser

    for module in (
        math_verify.parser,
        math_verify.grader,
    ):  # as in a fresh process: the notice is not shown yet
        monkeypatch.setattr(module, "TIMEOUT_WARNING_SHOWN", False)
    long_reply = "Let me think about it step by step. " * 3000 + "So the answer is 1/2."
    results: list[float] = []
    with caplog.at_level(logging.DEBUG):
        worker = threading.Thread(
            target=lambda: results.extend(
                [math_reward("1/2", {"answer": "0.5"}), math_reward(long_reply, {"answer": "0.5"})]
            )
        )
        worker.start()
        worker.join()
        logging.getLogger("math_verify.grader").warning("another warning")  # other records still get through
    assert results == [1.0, 1.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["another warning"] and not recwarn.list


# ---------------------------------------------------------------------------- abstention
@pytest.mark.parametrize(
    ("reply", "answer", "reward"),
    [
        ("42", "42", 1.0),  # right
        ("The answer is 42.", "42", 1.0),
        ("41", "42", -1.0),  # wrong
        ("", "42", -1.0),  # no answer at all is not an abstention
        ("I don't know.", "42", 0.0),  # honest abstention on an answerable question
        ("I do not know the answer.", "42", 0.0),
        ("I don't know, perhaps 42.", "42", 0.0),  # a hedge is an abstention, not a lucky guess
        ("I don't know.", None, 1.0),  # abstaining when nobody can know: right
        ("That cannot be known.", None, 1.0),
        ("Paris.", None, -1.0),  # a confident answer to an unanswerable question: wrong
        ("7", None, -1.0),
    ],
)
def test_abstention_reward_table(reply, answer, reward):
    assert abstention_reward(reply, {"answer": answer, "kind": "x"}) == reward


def test_reference_replies_of_every_task_kind_earn_full_reward():
    tasks = generate_tasks({"arithmetic": 4, "word_problem": 4, "calculator": 4, "unanswerable": 4}, seed=3)
    for task in tasks:
        meta = task_metadata(task)
        assert meta["answer"] == task.answer and meta["kind"] == task.kind
        assert meta["prompt_messages"] == task.prompt_messages and meta["tools"] == task.tools
        reply = task.messages[-1]["content"]
        assert abstention_reward(reply, meta) == 1.0, task
        reward = get_reward_fn("tool" if task.kind == "calculator" else "math")(reply, meta)
        assert reward == (0.0 if task.answer is None else 1.0), task
    assert {t.kind for t in tasks} == {"arithmetic", "word_problem", "calculator", "unanswerable"}


def test_task_metadata_is_a_copy():
    task = generate_tasks({"calculator": 1}, seed=0)[0]
    meta = task_metadata(task)
    meta["tools"][0]["function"]["name"] = "changed"
    meta["meta"]["expression"] = "changed"
    assert task.tools[0]["function"]["name"] == "calculator" and task.meta["expression"] != "changed"


def test_reasoning_gym_reward_uses_the_source_datasets_scorer():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=5)[0]
    meta = {"answer": entry["answer"], "kind": "rg", "reasoning_gym_entry": entry}
    assert reasoning_gym_reward(entry["answer"], meta) == 1.0
    assert reasoning_gym_reward(str(int(entry["answer"]) + 1), meta) == 0.0
    assert get_reward_fn("reasoning_gym")("1/2", {"answer": "0.5"}) == 1.0  # no entry: math-verify


# ---------------------------------------------------------------------------- rewards by name / import path
def test_get_reward_fn_resolves_builtin_names():
    assert get_reward_fn("math") is math_reward and get_reward_fn("abstain") is abstention_reward
    assert get_reward_fn("tool")("56,088", {"answer": "56088", "kind": "calculator"}) == 1.0


def test_get_reward_fn_imports_a_custom_reward_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_reward(reply, metadata):\n    return float(len(reply))\nNOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward_fn("my_rewards_mod:length_reward")("abc", {}) == 3.0
    assert get_reward_fn("my_rewards_mod.length_reward")("abcd", {}) == 4.0
    with pytest.raises(ValueError, match="not a callable"):
        get_reward_fn("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_fn("my_rewards_mod:missing")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("nonsense", "unknown reward 'nonsense'.*math, abstain, tool"),
        (":fn", "not an import path"),
        ("", "non-empty"),
    ],
)
def test_get_reward_fn_errors_say_what_is_wrong(name, message):
    with pytest.raises(ValueError, match=message):
        get_reward_fn(name)


# ---------------------------------------------------------------------------- calculator environment
@pytest.fixture(scope="module")
def tok() -> GLM5Tokenizer:
    root = Path(sysconfig.get_paths()["stdlib"])
    return GLM5Tokenizer.train([f for f in default_corpus_files() if f.parent == root][:10], vocab_size=1024)


def _exact(expression: str) -> str:
    """Independent evaluation: Python's own arithmetic on Fractions."""
    value = eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _call(expression: str, key: str = "expression", name: str = "calculator") -> str:
    return f"<tool_call>{name}<arg_key>{key}</arg_key><arg_value>{expression}</arg_value></tool_call>"


def test_observation_tokens_are_the_glm5_tool_response_turn_with_the_right_result(tok):
    env = CalculatorEnvironment(tok)
    expression = "48213 * 7919 - 311"
    response = "The numbers are large.</think>" + _call(expression) + "<|observation|>"
    ids = env.observe(response, turn=0)
    result = _exact(expression)
    assert result == str(48213 * 7919 - 311)
    assert tok.decode(ids) == f"<tool_response>{result}</tool_response><|assistant|><think>"
    # The same ids as the chat template gives the whole conversation (token-in-token-out: no re-tokenisation
    # drift between the tokens the policy is trained on and the template).
    messages = [
        {"role": "user", "content": f"What is {expression}?"},
        {
            "role": "assistant",
            "reasoning_content": "The numbers are large.",
            "content": "",
            "tool_calls": [{"function": {"name": "calculator", "arguments": {"expression": expression}}}],
        },
        {"role": "tool", "content": result},
    ]
    full_ids, full_mask = tokenize_chat(tok, messages, [CALCULATOR_TOOL])
    with_stop = env.observe(response.removesuffix("<|observation|>"), turn=0)
    assert tok.decode(with_stop).startswith("<|observation|><tool_response>")
    assert full_ids[-len(with_stop) :] == with_stop
    assert render_chat(messages, [CALCULATOR_TOOL]).endswith(tok.decode(with_stop))
    assert full_mask[-len(ids) :] == [0] * len(ids)  # what the environment adds is never trained on


def test_several_calls_in_one_turn_get_one_observation_turn(tok):
    env = CalculatorEnvironment(tok)
    response = "Two sums.</think>" + _call("1 + 2") + _call("10 / 4") + "<|observation|>"
    text = tok.decode(env.observe(response, turn=0))
    assert text == "<tool_response>3</tool_response><tool_response>2.5</tool_response><|assistant|><think>"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (_call("12 +* 3"), "error: not an arithmetic expression"),
        (_call("1 / 0"), "error: division by zero"),
        (_call("__import__('os')"), "error: unsupported element"),
        (_call("3 * 4", key="expr"), "error: calculator takes one argument, expression"),
        ("<tool_call>calculator</tool_call>", "error: calculator takes one argument, expression"),
        (_call("3 * 4", name="python"), "error: unknown tool 'python'"),
    ],
)
def test_bad_tool_calls_get_an_error_observation_not_an_exception(tok, call, error):
    env = CalculatorEnvironment(tok)
    text = tok.decode(env.observe("Try.</think>" + call, turn=1))
    assert text.startswith("<|observation|><tool_response>" + error)
    assert text.endswith("</tool_response><|assistant|><think>")


def test_no_tool_call_or_a_spent_budget_ends_the_episode(tok):
    env = CalculatorEnvironment(tok, max_turns=2)
    assert env.observe("Easy.</think>The answer is 4.", turn=0) is None
    assert "<tool_response>4</tool_response>" in tok.decode(
        env.observe("Hmm.</think>" + _call("2 + 2"), turn=1)
    )
    assert env.observe("Hmm.</think>" + _call("2 + 2"), turn=2) is None
    # a call followed by a stop token other than <|observation|>: the policy did not hand over to the tool
    assert env.observe("Hmm.</think>" + _call("2 + 2") + "<|endoftext|>", turn=0) is None
    assert env.observe("Hmm.</think>" + _call("2 + 2") + "<|user|>", turn=0) is None


def test_a_whole_episode_round_trips_to_the_final_reply_and_its_reward(tok):
    """Prompt -> tool call -> observation -> answer, as token ids the way the RL system assembles them."""
    task = generate_tasks({"calculator": 1}, seed=11)[0]
    env = CalculatorEnvironment(tok)
    prompt_ids, _ = tokenize_chat(tok, task.prompt_messages, task.tools)
    first = tok.encode(
        "Large numbers; use the tool.</think>" + _call(task.meta["expression"]) + "<|observation|>",
        allow_special=True,  # the model's output: its markers are special ids
    )
    observation = env.observe(tok.decode(first), turn=0)
    assert f"<tool_response>{_exact(task.meta['expression'])}</tool_response>" in tok.decode(observation)
    second = tok.encode(
        f"It returned the result.</think>{task.meta['expression']} = {task.answer}<|user|>",
        allow_special=True,
    )
    episode = tok.decode(prompt_ids + first + observation + second)
    assert env.observe(episode, turn=1) is None
    reply = env.final_reply(episode)
    assert reply == f"{task.meta['expression']} = {task.answer}"
    assert math_reward(reply, task_metadata(task)) == 1.0
    assert env.final_reply(tok.decode(first)) == ""  # a tool-call turn has no content


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.lists(
        st.sampled_from(
            [
                "<tool_call>",
                "</tool_call>",
                "<arg_key>",
                "</arg_key>",
                "<arg_value>",
                "</arg_value>",
                "</think>",
                "calculator",
                "expression",
                "1+",
                "2",
                " ",
                "(",
                "<|observation|>",
                "x",
            ]
        ),
        max_size=14,
    )
)
def test_the_environment_never_raises_on_arbitrary_model_output(tok, pieces):
    env = CalculatorEnvironment(tok)
    text = "".join(pieces)
    out = env.observe(text, turn=0)
    assert out is None or (isinstance(out, list) and all(isinstance(i, int) for i in out))
    assert isinstance(env.final_reply(text), str)
