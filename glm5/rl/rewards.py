"""Rewards and tool environments for RL on the glm5 tasks: answer equivalence by `math-verify`, the
abstention-aware reward, reasoning-gym scorers, custom rewards by import path, and the calculator environment.

A reward function sees the policy's final reply (content only: reasoning and tool calls already stripped) and
the task metadata (``task_metadata``), and returns a float. Rewards are plain callables (slime's hooks), so a
user reward is ``get_reward_fn("my_pkg.rewards:score")``.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from glm5.data.tasks import CALCULATOR_TOOL, calculator, is_abstention
from glm5.tokenizer.chat import chat_segments
from glm5.tokenizer.parser import parse_output

if TYPE_CHECKING:
    from glm5.data.tasks import Task
    from glm5.tokenizer.tokenizer import GLM5Tokenizer

RewardFn = Callable[[str, dict[str, Any]], float]
"""(final reply text, task metadata) -> reward."""

MAX_REPLY_CHARS = 4000
"""Only the tail of a reply is parsed (the answer comes last): bounds sympy's work on a rambling policy."""
VERIFY_TIMEOUT_S = 5
"""math-verify's timeout; it uses SIGALRM, so it only applies on the main thread (elsewhere: no timeout, and
the work is bounded by MAX_REPLY_CHARS instead)."""
OBSERVATION, ASSISTANT = "<|observation|>", "<|assistant|>"
TURN_ENDS = ("<|user|>", "<|endoftext|>")
"""Stop tokens other than <|observation|>: a turn ending with one asked for no tool response."""


# ---------------------------------------------------------------------------- answer checking
class _NoTimeoutNotice(logging.Filter):
    """Drops math-verify's "Timeout is disabled ..." warning: off the main thread we turn the SIGALRM timeout
    off on purpose (and bound the input instead), so the notice is noise from every rollout worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_NO_TIMEOUT_NOTICE = _NoTimeoutNotice()


def _silence_timeout_notice() -> None:
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if _NO_TIMEOUT_NOTICE not in logger.filters:
            logger.addFilter(_NO_TIMEOUT_NOTICE)


def answers_match(reply: str, answer: str) -> bool:
    """Whether the reply's final answer equals ``answer`` by math-verify ("1/2" == "0.5", "1,000" == "1000",
    "\\boxed{3}" == "3"); the last answer-like expression of the reply counts. A gold answer that math-verify
    cannot parse falls back to an exact (whitespace- and case-insensitive) string comparison."""
    from math_verify import parse, verify  # lazy: optional dependency

    timeout = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        _silence_timeout_notice()
    reply = reply[-MAX_REPLY_CHARS:]
    gold = parse(answer, parsing_timeout=timeout)
    if not gold:
        return " ".join(reply.split()).lower() == " ".join(answer.split()).lower()
    pred = parse(reply, parsing_timeout=timeout)
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward(reply: str, metadata: dict[str, Any]) -> float:
    """1.0 when math-verify finds the reply's answer equal to ``metadata["answer"]``, else 0.0 (an abstention,
    or any reply to an unanswerable question, scores 0.0)."""
    answer = metadata.get("answer")
    if answer is None or is_abstention(reply):
        return 0.0
    return 1.0 if answers_match(reply, str(answer)) else 0.0


def abstention_reward(reply: str, metadata: dict[str, Any]) -> float:
    """+1 for a right answer (including abstaining on an unanswerable question), 0 for an explicit "I don't know"
    on an answerable one, -1 for a wrong answer (including answering an unanswerable question): guessing must
    score below admitting ignorance, or RL teaches the policy to hallucinate."""
    answer = metadata.get("answer")
    if is_abstention(reply):
        return 1.0 if answer is None else 0.0
    if answer is None:
        return -1.0
    return 1.0 if answers_match(reply, str(answer)) else -1.0


def graded_abstention_reward(right: float = 1.0, abstain: float = 0.0, wrong: float = -1.0) -> RewardFn:
    """The abstention-aware reward with its three values: `right` for a right answer (abstaining on an
    unanswerable question included), `abstain` for "I don't know" on an answerable one, `wrong` for a wrong
    answer (answering an unanswerable question included). Needs wrong < abstain < right: then a policy that
    maximises it answers exactly when its chance p of being right exceeds (abstain - wrong) / (right - wrong)
    (1/2 for +1/0/-1), so the abstention credit sets the confidence bar; the closer it is to `right`, the more
    the policy declines (at abstain = right it never needs to answer)."""
    if not wrong < abstain < right:
        raise ValueError(
            f"graded abstention reward needs wrong < abstain < right, got {wrong}, {abstain}, {right}"
        )

    def reward(reply: str, metadata: dict[str, Any]) -> float:
        answer = metadata.get("answer")
        if is_abstention(reply):
            return right if answer is None else abstain
        if answer is None:
            return wrong
        return right if answers_match(reply, str(answer)) else wrong

    reward.__name__ = f"abstention_reward_{right:g}_{abstain:g}_{wrong:g}"
    return reward


def reasoning_gym_reward(reply: str, metadata: dict[str, Any]) -> float:
    """The reasoning-gym scorer of the dataset an item came from, when the metadata carries the item
    (``metadata["reasoning_gym_entry"]``: the dict ``reasoning_gym.create_dataset`` yields); else math_reward."""
    entry = metadata.get("reasoning_gym_entry")
    source = entry.get("metadata", {}).get("source_dataset") if isinstance(entry, dict) else None
    if not source:
        return math_reward(reply, metadata)
    import reasoning_gym  # lazy: optional dependency

    return float(reasoning_gym.get_score_answer_fn(source)(reply, entry))


REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "abstain": abstention_reward,
    "tool": math_reward,  # calculator tasks: the final reply must state the exact result
    "reasoning_gym": reasoning_gym_reward,
    "abstain-generous": graded_abstention_reward(1.0, 0.5, -1.0),
    "abstain-harsh": graded_abstention_reward(1.0, 0.0, -2.0),
    "abstain-bold": graded_abstention_reward(1.0, -0.5, -1.0),
}
"""Built-in rewards by name."""


def get_reward_fn(name: str) -> RewardFn:
    """A built-in reward (math, abstain, tool, reasoning_gym) or a callable by import path
    ``package.module:function`` (``package.module.function`` also works)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        raise ValueError(
            f"unknown reward {name!r}; use one of {', '.join(REWARDS)} or an import path "
            "'package.module:function'"
        )
    if not module_name or not attr:
        raise ValueError(f"reward {name!r} is not an import path; write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward {name!r}: cannot import module {module_name!r} ({exc}); check the path and "
            "that the module is on PYTHONPATH"
        ) from exc
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(
            f"reward {name!r}: {attr!r} is a {type(fn).__name__}, not a callable "
            "(reply: str, metadata: dict) -> float"
        )
    return fn


def task_metadata(task: Task) -> dict[str, Any]:
    """What the RL system stores as ``Sample.metadata`` for a task: ``answer`` (None: abstain), ``kind``,
    ``tools`` (None, or the OpenAI tool list the prompt offers), ``prompt_messages`` and the generator's
    ``meta``. Plain JSON-able data (copied, so a reward cannot mutate the task)."""
    return {
        "answer": task.answer,
        "kind": task.kind,
        "tools": copy.deepcopy(task.tools),
        "prompt_messages": copy.deepcopy(task.prompt_messages),
        "meta": copy.deepcopy(task.meta),
    }


# ---------------------------------------------------------------------------- calculator environment
def last_assistant_turn(text: str) -> str:
    """The text after the last ``<|assistant|>`` (all of it when there is none): a whole multi-turn episode
    (generated turns joined by observation turns) or just the last turn both work."""
    return text.rpartition(ASSISTANT)[2]


class CalculatorEnvironment:
    """Multi-turn tool environment: the policy calls the calculator in the GLM tool-call format; the environment
    answers with an observation turn whose tokens the RL system appends with loss_mask 0.

    ``turn`` counts the observations already given in the episode (0 after the first assistant turn); a tool
    call is answered while ``turn < max_turns``, so an episode has at most ``max_turns + 1`` assistant turns.
    """

    def __init__(self, tokenizer: GLM5Tokenizer, max_turns: int = 3, *, enable_thinking: bool = True) -> None:
        if max_turns < 0:
            raise ValueError(f"max_turns={max_turns} must be >= 0")
        self.tokenizer = tokenizer
        self.max_turns = max_turns
        self.enable_thinking = enable_thinking
        self.tools: list[dict[str, Any]] = [CALCULATOR_TOOL]

    def tool_calls(self, response_text: str) -> list[tuple[str, str]]:
        """The (name, JSON arguments) of every tool call in the last assistant turn."""
        parsed = parse_output(last_assistant_turn(response_text), self.tools, self.enable_thinking)
        return [(c["function"]["name"], c["function"]["arguments"]) for c in parsed["tool_calls"]]

    @staticmethod
    def run_tool(name: str, arguments: str) -> str:
        """One call's result text; a bad call gives an error text (the policy reads it and may retry)."""
        if name != "calculator":
            return f"error: unknown tool {name!r}; the only tool is calculator"
        try:
            args = json.loads(arguments)
        except ValueError:
            args = None
        expression = args.get("expression") if isinstance(args, dict) else None
        if isinstance(expression, (int, float)) and not isinstance(expression, bool):
            expression = str(expression)
        if not isinstance(expression, str) or not expression.strip():
            return "error: calculator takes one argument, expression (text such as (12 + 7) * 3)"
        return calculator(expression)

    def observation_ids(self, results: list[str], *, include_observation_token: bool = True) -> list[int]:
        """Token ids of the tool-response turn for ``results`` followed by the next generation prompt, exactly as
        ``chat.tokenize_chat`` renders ``{"role": "tool"}`` messages after an assistant turn (the template's markers
        as single ids, the results literally: a tool output spelling ``<|assistant|>`` cannot forge a turn).
        ``include_observation_token=False`` leaves out the leading ``<|observation|>``, for a generated turn that
        already ended with it (the policy's stop token)."""
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": ""}]
        messages += [{"role": "tool", "content": r} for r in results]
        segs = chat_segments(messages, enable_thinking=self.enable_thinking, add_generation_prompt=True)
        start = next(i for i, s in enumerate(segs) if s.special and s.text == OBSERVATION)
        segs = segs[start if include_observation_token else start + 1 :]
        special = self.tokenizer.require_special_ids(s.text for s in segs if s.special)
        ids: list[int] = []
        for seg in segs:
            ids += (
                [special[seg.text]] if seg.special else self.tokenizer.encode(seg.text, allow_special=False)
            )
        return ids

    def observe(self, response_text: str, turn: int) -> list[int] | None:
        """The ids to append after the generated turn (tool responses + next ``<|assistant|>`` prompt), or None
        when the turn made no tool call, the tool budget is spent, or the turn ended with ``<|user|>`` /
        ``<|endoftext|>`` (a tool call must end with ``<|observation|>``, the stop token that hands over to the
        tool). The ids start with ``<|observation|>`` unless ``response_text`` already ends with it (the engine
        kept the generated stop token, which stays in the trained tokens with loss mask 1, as in chat.py).
        Never raises on model output."""
        if turn >= self.max_turns:
            return None
        calls = self.tool_calls(response_text)
        if not calls:
            return None
        tail = response_text.rstrip()
        if tail.endswith(TURN_ENDS):
            return None  # the policy ended the turn (or the episode) instead of waiting for the tool
        results = [self.run_tool(name, args) for name, args in calls]
        return self.observation_ids(results, include_observation_token=not tail.endswith(OBSERVATION))

    def final_reply(self, response_text: str) -> str:
        """The content of the last assistant turn, reasoning and tool calls stripped (what the reward sees)."""
        parsed = parse_output(last_assistant_turn(response_text), self.tools, self.enable_thinking)
        return parsed["content"] or ""
