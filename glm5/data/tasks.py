"""Synthetic chat tasks in the GLM-5 format: arithmetic and word problems with short thinking, calculator
tool-call episodes, and unanswerable questions answered with an abstention. Pre-training mixes them into the
corpus; the RL stage reuses the same generators (prompt = `Task.prompt_messages`, check = `check_answer`).

Word problems and arithmetic expressions come from `reasoning-gym` (offline procedural generators,
Apache-2.0): `gsm_symbolic` (GSM8K-derived templates with a step-by-step solution, used as the thinking) and
`basic_arithmetic` (expressions; the thinking is the step-by-step evaluation computed here). The calculator
and unanswerable tasks are written here: reasoning-gym has neither.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

ABSTENTION = "I don't know."
"""What the assistant answers when the question cannot be answered."""

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses; returns the exact result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}


@dataclass
class Task:
    """One synthetic conversation with a checkable answer."""

    kind: str
    """Generator name: arithmetic, word_problem, calculator or unanswerable."""
    messages: list[dict[str, Any]]
    """The whole conversation in OpenAI form, ending with the reference assistant turn."""
    answer: str | None
    """The expected final answer; None when the right response is to abstain."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI tool list offered in the system block (calculator tasks)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Generator details (expression, source index, ...)."""

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the first assistant turn: what a policy is asked."""
        first = next(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:first]


# --- exact arithmetic --------------------------------------------------------------------------------
_BINARY: dict[type, tuple[str, Callable[[Fraction, Fraction], Fraction]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
}


def format_number(value: Fraction) -> str:
    """An exact number as text: integers plainly, others as a decimal (up to 6 places) without trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _evaluate(node: ast.AST, steps: list[str] | None) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, steps)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _evaluate(node.operand, steps)
        value = -inner if isinstance(node.op, ast.USub) else inner
        if steps is not None and not isinstance(node.operand, ast.Constant):
            steps.append(f"-({format_number(inner)}) = {format_number(value)}")
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, steps), _evaluate(node.right, steps)
        symbol, fn = _BINARY[type(node.op)]
        if symbol == "/" and right == 0:
            raise ValueError("division by zero")
        value = fn(left, right)
        if steps is not None:
            steps.append(f"{format_number(left)} {symbol} {format_number(right)} = {format_number(value)}")
        return value
    raise ValueError(f"unsupported element {type(node).__name__} in an arithmetic expression")


def evaluate_expression(expression: str, steps: list[str] | None = None) -> Fraction:
    """Exactly evaluate + - * / and parentheses (no names, no calls: safe on untrusted text, e.g. a policy's
    tool call). `steps`, if given, receives one "a op b = c" line per operation in evaluation order."""
    if len(expression) > 500:
        raise ValueError("expression is too long (more than 500 characters)")
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    return _evaluate(tree, steps)


def calculator(expression: str) -> str:
    """The calculator tool: the exact result as text, or an error message (what a tool response would say)."""
    try:
        return format_number(evaluate_expression(expression))
    except (ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"


# --- generators --------------------------------------------------------------------------------------
def _reasoning_gym(name: str, count: int, seed: int, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        import reasoning_gym  # lazy: optional dependency
    except ImportError as exc:  # a dependency of glm5; only a broken install gets here
        raise ValueError(
            "the synthetic tasks need the `reasoning-gym` package: pip install reasoning-gym"
        ) from exc
    return list(reasoning_gym.create_dataset(name, size=count, seed=seed, **kwargs))


def arithmetic_tasks(count: int, seed: int) -> list[Task]:
    """reasoning-gym `basic_arithmetic` expressions; the thinking evaluates them one operation at a time."""
    tasks = []
    for item in _reasoning_gym("basic_arithmetic", count, seed, max_terms=4, max_digits=3):
        expression = item["metadata"]["expression"]
        steps: list[str] = []
        value = format_number(evaluate_expression(expression, steps))
        thinking = " ".join(f"{s}." for s in steps) if steps else f"{expression} is already a number."
        messages = [
            {"role": "user", "content": item["question"]},
            {"role": "assistant", "reasoning_content": thinking, "content": value},
        ]
        tasks.append(Task("arithmetic", messages, value, meta={"expression": expression}))
    return tasks


def easy_arithmetic_tasks(count: int, seed: int) -> list[Task]:
    """One addition or subtraction of single digits (reasoning-gym `basic_arithmetic`, no parentheses or
    negation): a model of a few million parameters gets some right after minutes of training, so RL has a signal."""
    tasks = []
    items = _reasoning_gym(
        "basic_arithmetic",
        count,
        seed,
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=1,
        operators=("+", "-"),
        allow_parentheses=False,
        allow_negation=False,
    )
    for item in items:
        expression = item["metadata"]["expression"]
        value = format_number(evaluate_expression(expression))
        messages = [
            {"role": "user", "content": item["question"]},
            {"role": "assistant", "reasoning_content": f"{expression} = {value}.", "content": value},
        ]
        tasks.append(Task("easy_arithmetic", messages, value, meta={"expression": expression}))
    return tasks


def word_problem_tasks(count: int, seed: int) -> list[Task]:
    """reasoning-gym `gsm_symbolic` (GSM8K-style word problems); its worked solution is the thinking."""
    tasks = []
    for item in _reasoning_gym("gsm_symbolic", count, seed):
        solution = item["metadata"]["answer_cot"].split("####")[0].strip()
        messages = [
            {"role": "user", "content": item["question"]},
            {"role": "assistant", "reasoning_content": solution, "content": str(item["answer"])},
        ]
        tasks.append(Task("word_problem", messages, str(item["answer"])))
    return tasks


def _random_expression(rng: random.Random) -> str:
    """Numbers too large to multiply in one's head: what a calculator is for."""
    a, b, c = rng.randint(100, 99_999), rng.randint(12, 9_999), rng.randint(2, 999)
    return rng.choice(
        [
            f"{a} * {b}",
            f"{a} * {b} + {c}",
            f"({a} - {c}) * {b}",
            f"{a} * {b} - {c} * {c}",
            f"{a * b} / {b}",
            f"{a} + {b} * {c}",
        ]
    )


_CALC_QUESTIONS = ("What is {e}?", "Compute {e}.", "Please calculate {e} exactly.", "How much is {e}?")


def calculator_tasks(count: int, seed: int) -> list[Task]:
    """Think, call the calculator tool, read its result, answer (a two-turn tool-use episode)."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        expression = _random_expression(rng)
        result = calculator(expression)
        call = {
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expression}},
        }
        messages = [
            {"role": "user", "content": rng.choice(_CALC_QUESTIONS).format(e=expression)},
            {
                "role": "assistant",
                "reasoning_content": "These numbers are large; I will use the calculator.",
                "content": "",
                "tool_calls": [call],
            },
            {"role": "tool", "content": result},
            {
                "role": "assistant",
                "reasoning_content": f"The calculator returned {result}.",
                "content": f"{expression} = {result}",
            },
        ]
        tasks.append(
            Task("calculator", messages, result, tools=[CALCULATOR_TOOL], meta={"expression": expression})
        )
    return tasks


_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "tu",
    "sha",
    "vor",
    "bel",
    "dri",
    "qua",
    "zen",
    "po",
    "lin",
    "mar",
    "tesh",
)
_FIRST_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jonas", "Keiko")
_UNANSWERABLE = (
    (
        "What is the capital of {country}?",
        "{country} is not a country I know of, so it has no capital I can name.",
    ),
    (
        "Who won the {year} World Cup?",
        "The {year} World Cup has not taken place, so nobody can know the winner.",
    ),
    ("What did {name} eat for breakfast on {date}?", "Nothing I know tells me what {name} ate on {date}."),
    (
        "What number between 1 and {n} am I thinking of?",
        "The number is only in the user's head; it cannot be inferred.",
    ),
    ("What is {name}'s phone number?", "I have no record of a phone number for {name}."),
    ("How many people live in {city}?", "{city} is not a place I have any information about."),
    ("Who wrote the novel '{title}'?", "I know of no novel called '{title}', so I cannot name its author."),
    ("What will the temperature be in {city} on {date}, {year}?", "Weather that far ahead cannot be known."),
)


def _made_up_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def unanswerable_tasks(count: int, seed: int) -> list[Task]:
    """Questions about made-up or unknowable things; the reference answer is the abstention "I don't know."."""
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        question, reason = rng.choice(_UNANSWERABLE)
        slots = {
            "country": _made_up_name(rng, 3) + rng.choice(("ia", "stan", "land")),
            "city": _made_up_name(rng, 2) + rng.choice(("ville", "burg", "ton", "")),
            "title": f"The {_made_up_name(rng, 2)} of {_made_up_name(rng, 3)}",
            "name": f"{rng.choice(_FIRST_NAMES)} {_made_up_name(rng, 2)}",
            "year": rng.randint(2150, 2999),
            "date": f"{rng.choice(('March', 'July', 'October'))} {rng.randint(1, 28)}",
            "n": rng.choice((10, 100, 1000)),
        }
        messages = [
            {"role": "user", "content": question.format(**slots)},
            {"role": "assistant", "reasoning_content": reason.format(**slots), "content": ABSTENTION},
        ]
        tasks.append(Task("unanswerable", messages, None))
    return tasks


TASK_GENERATORS: dict[str, Callable[[int, int], list[Task]]] = {
    "arithmetic": arithmetic_tasks,
    "easy_arithmetic": easy_arithmetic_tasks,
    "word_problem": word_problem_tasks,
    "calculator": calculator_tasks,
    "unanswerable": unanswerable_tasks,
}
"""kind -> generator(count, seed) -> tasks; the same (count, seed) always gives the same tasks. glm5.data.frontier
adds its ``frontier_*`` kinds here when imported (glm5.data's __init__ does): they draw only *training* items."""


def generate_tasks(counts: dict[str, int], seed: int) -> list[Task]:
    """Tasks of several kinds, interleaved in a seeded random order (deterministic)."""
    unknown = sorted(set(counts) - set(TASK_GENERATORS))
    if unknown:
        raise ValueError(f"unknown task kinds {unknown}; choose from {sorted(TASK_GENERATORS)}")
    tasks: list[Task] = []
    for i, (kind, count) in enumerate(sorted(counts.items())):
        if count < 0:
            raise ValueError(f"task count for {kind!r} must be >= 0, got {count}")
        if count:
            tasks += TASK_GENERATORS[kind](count, seed * 1009 + i)
    random.Random(seed).shuffle(tasks)
    return tasks


# --- checking answers --------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def is_abstention(text: str) -> bool:
    """Whether a reply declines to answer ("I don't know", "I do not know", "cannot be known", ...)."""
    lowered = text.lower().replace("’", "'")
    return any(p in lowered for p in ("i don't know", "i do not know", "cannot be known", "i can't know"))


def check_answer(task: Task, reply: str) -> bool:
    """Whether a final reply (content, no reasoning) is right: the abstention for unanswerable tasks, else the
    last number in the reply equals the expected answer."""
    if task.answer is None:
        return is_abstention(reply)
    if is_abstention(reply):
        return False
    numbers = _NUMBER.findall(reply)
    if not numbers:
        return False
    try:
        return Fraction(numbers[-1].replace(",", "")) == Fraction(task.answer)
    except (ValueError, ZeroDivisionError):
        return numbers[-1] == task.answer
