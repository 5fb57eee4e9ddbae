"""Evaluation tasks: question sets drawn from the synthetic generators of `glm5.data.tasks` with an unseen seed,
and the checks that score a final reply (correct / abstained)."""

from __future__ import annotations

from collections.abc import Callable

from glm5.data.frontier import KINDS as FRONTIER_KINDS
from glm5.data.frontier import heldout_generator
from glm5.data.tasks import (
    Task,
    arithmetic_tasks,
    calculator_tasks,
    check_answer,
    easy_arithmetic_tasks,
    is_abstention,
    unanswerable_tasks,
    word_problem_tasks,
)

QA_TASKS: dict[str, Callable[[int, int], list[Task]]] = {
    "arithmetic": arithmetic_tasks,
    "easy_arithmetic": easy_arithmetic_tasks,
    "unanswerable": unanswerable_tasks,
    "tool_use": calculator_tasks,
    "word_problem": word_problem_tasks,
    **{kind: heldout_generator(kind) for kind in FRONTIER_KINDS},
}
"""Question-answer tasks: name -> generator(count, seed). `tool_use` and `frontier_tool` offer the calculator
tool; the `frontier_*` tasks are the held-out items of glm5.data.frontier (never trained on)."""
FRONTIER_TASKS = FRONTIER_KINDS
"""The post-training frontier tasks (easy, hard, unanswerable, tool), one per difficulty."""
PERPLEXITY = "perplexity"
ALL_TASKS = (*QA_TASKS, PERPLEXITY)
DEFAULT_TASKS = ("arithmetic", "unanswerable", "tool_use", PERPLEXITY)
DEFAULT_SEED = 12_345
"""Pre-training draws its chat tasks with seeds `seed * 1009 + i` for small seeds; 12,345 gives unseen ones."""
MAX_TOOL_TURNS = 3
"""Model turns per tool-use episode: call, read the result, answer (and one spare)."""


def parse_task_list(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'arithmetic,tool_use' -> ['arithmetic', 'tool_use']; ValueError naming the valid names otherwise."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown eval task(s) {unknown or names}; choose from {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def make_questions(task: str, num: int, seed: int = DEFAULT_SEED) -> list[Task]:
    """`num` questions of a QA task (deterministic in seed)."""
    if task not in QA_TASKS:
        raise ValueError(f"{task!r} is not a question-answer task; choose from {', '.join(QA_TASKS)}")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    return QA_TASKS[task](num, seed)


def score(question: Task, reply: str) -> tuple[bool, bool]:
    """(correct, abstained) of a final reply (content only, no reasoning)."""
    return check_answer(question, reply), is_abstention(reply)
