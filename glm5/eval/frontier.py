"""Held-out evaluation on the frontier tasks (glm5.data.frontier): accuracy, abstention and hallucination rate
per difficulty and overall with Wilson 95% intervals, and tool use (call validity, tool-use accuracy).

    from glm5.eval.frontier import evaluate_frontier
    metrics = evaluate_frontier("runs/sft/model", num=60, out="runs/sft/eval-heldout")

Definitions (fractions): accuracy = correct / items; abstention_rate = abstentions / items (on an
unanswerable item the abstention is the correct reply); hallucination_rate = wrong / (wrong + abstained) over
the items not answered correctly (wrong = neither correct nor an abstention; None when every item is
correct). tool_call_valid: share of tool items whose first turn is a `calculator` call with JSON arguments
holding an expression the calculator evaluates without error; tool_call_right: share whose call also computes
the asked product (its result is the item's answer: the operands were copied from the question);
tool_accuracy: share of tool items whose final reply states the exact result (it can only come from the
observation: the model cannot multiply).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glm5.data.frontier import DIFFICULTIES, KINDS
from glm5.data.tasks import calculator, evaluate_expression
from glm5.eval.backends import GenerationOptions, LocalBackend
from glm5.eval.metrics import summarize, wilson_interval
from glm5.eval.report import write_report
from glm5.eval.runner import evaluate
from glm5.eval.tasks import DEFAULT_SEED

KEYS = ("accuracy", "abstention_rate", "hallucination_rate")


def tool_call_valid(turns: list[dict[str, Any]]) -> bool:
    """Whether the first assistant turn of an episode is a well-formed calculator call with a valid expression."""
    if not turns or not turns[0].get("tool_calls"):
        return False
    call = turns[0]["tool_calls"][0].get("function", {})
    if call.get("name") != "calculator":
        return False
    try:
        args = json.loads(call.get("arguments") or "")
        expression = args["expression"] if isinstance(args, dict) else None
        if not isinstance(expression, str):
            return False
        evaluate_expression(expression)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, RecursionError):
        return False
    return True


def tool_call_right(turns: list[dict[str, Any]], expected: str | None) -> bool:
    """Whether the first call is valid (`tool_call_valid`) and its expression evaluates to `expected`."""

    if expected is None or not tool_call_valid(turns):
        return False
    arguments = json.loads(turns[0]["tool_calls"][0]["function"]["arguments"])
    return calculator(arguments["expression"]) == expected


def frontier_summary(result: Any) -> dict[str, Any]:
    """The post-training numbers of an EvalResult over the frontier tasks: overall accuracy / abstention /
    hallucination (+ Wilson intervals), the same per difficulty, tool_call_valid, tool_call_right and
    tool_accuracy."""
    out: dict[str, Any] = {}
    per: dict[str, Any] = {}
    for difficulty, kind in zip(DIFFICULTIES, KINDS):
        m = result.metrics.get(kind)
        if m is None:
            continue
        per[difficulty] = {
            "n": m["samples"],
            **{k: m[k] for k in KEYS},
            "accuracy_ci": list(m["accuracy_ci"]),
            "abstention_ci": list(m["abstention_ci"]),
            "hallucination_ci": list(m["hallucination_ci"]) if m["hallucination_ci"] else None,
        }
    overall = result.metrics.get("overall", {})
    out.update({k: overall.get(k) for k in KEYS})
    out["n"] = overall.get("samples", 0)
    for k in ("accuracy_ci", "abstention_ci", "hallucination_ci"):
        out[k] = list(overall[k]) if overall.get(k) else None
    tool = [r for r in result.records if r["task"] == "frontier_tool"]
    valid = sum(tool_call_valid(s["turns"]) for r in tool for s in r["samples"])
    n_tool = sum(len(r["samples"]) for r in tool)
    out["tool_call_valid"] = valid / n_tool if n_tool else None
    out["tool_call_valid_ci"] = list(wilson_interval(valid, n_tool)) if n_tool else None
    right = sum(tool_call_right(s["turns"], r.get("expected")) for r in tool for s in r["samples"])
    out["tool_call_right"] = right / n_tool if n_tool else None
    out["tool_accuracy"] = per.get("tool", {}).get("accuracy")
    out["unanswerable_abstention"] = per.get("unanswerable", {}).get("abstention_rate")
    out["per_difficulty"] = per
    return out


def evaluate_frontier(
    model: Any, num: int, out: str | Path | None = None, *, max_tokens: int = 48, seed: int | None = None
) -> dict[str, Any]:
    """Greedy replies of `model` (a checkpoint folder or an `LLM`) to `num` held-out items per difficulty;
    returns `frontier_summary`; with `out`, also writes results.json and report.md there."""
    result = evaluate(
        LocalBackend(str(model) if isinstance(model, Path) else model),
        list(KINDS),
        num=num,
        seed=DEFAULT_SEED if seed is None else seed,
        options=GenerationOptions(max_tokens=max_tokens),
    )
    if out is not None:
        write_report(result, out)
    return frontier_summary(result)


def summarize_flags(correct: list[bool], abstained: list[bool]) -> dict[str, Any]:
    """accuracy / abstention / hallucination (+ Wilson intervals) of one sample per item."""
    return summarize([[c] for c in correct], [[a] for a in abstained])
