"""The evaluation loop: ask every question through a backend (running calculator calls for multi-turn tool use),
score the final replies, and gather per-task and overall metrics into an `EvalResult`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glm5.eval.backends import Backend, GenerationOptions, Reply, tool_result
from glm5.eval.metrics import summarize
from glm5.eval.tasks import DEFAULT_SEED, MAX_TOOL_TURNS, PERPLEXITY, make_questions, parse_task_list, score


@dataclass
class EvalResult:
    """What one evaluation produced (saved as results.json; `compare` reads two of them)."""

    backend: str
    settings: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    """Task name (and "overall", all QA tasks pooled) -> `glm5.eval.metrics.summarize` output."""
    records: list[dict[str, Any]] = field(default_factory=list)
    """One per question: task, prompt, expected answer and every sample's reply, turns and outcome."""
    perplexity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ValueError(
                f"no results file {str(path)!r}; run glm5 eval --out DIR first (DIR/results.json)"
            ) from None
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a glm5 eval results.json ({e})") from None


@dataclass
class _Episode:
    """One sample of one question as it moves through the tool-use turns."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    turns: list[dict[str, Any]] = field(default_factory=list)
    final: Reply | None = None


def _advance(ep: _Episode, reply: Reply, turn: int) -> bool:
    """Record a reply; run its tool calls and return True when the episode needs another model turn."""
    ep.turns.append(
        {
            "content": reply.content,
            "reasoning": reply.reasoning,
            "tool_calls": reply.tool_calls,
            "finish_reason": reply.finish_reason,
        }
    )
    ep.final = reply
    if not (ep.tools and reply.tool_calls and reply.finish_reason != "length" and turn < MAX_TOOL_TURNS):
        return False
    ep.messages = [*ep.messages, reply.message()]
    for i, call in enumerate(reply.tool_calls):
        result = tool_result(call)
        ep.turns[-1].setdefault("tool_results", []).append(result)
        ep.messages.append({"role": "tool", "tool_call_id": call.get("id") or f"call_{i}", "content": result})
    return True


def _run_chunk(
    backend: Backend, questions: list, samples: int, options: GenerationOptions
) -> list[list[_Episode]]:
    """All samples of a few questions: the first turn as one n-sample batch, then the tool-calling ones."""
    first = backend.chat([(q.prompt_messages, q.tools) for q in questions], samples, options)
    episodes = [[_Episode(list(q.prompt_messages), q.tools) for _ in range(samples)] for q in questions]
    pending = [
        ep for eps, replies in zip(episodes, first) for ep, r in zip(eps, replies) if _advance(ep, r, 1)
    ]
    for turn in range(2, MAX_TOOL_TURNS + 1):
        if not pending:
            break
        replies = backend.chat([(ep.messages, ep.tools) for ep in pending], 1, options)
        pending = [ep for ep, r in zip(pending, replies) if _advance(ep, r[0], turn)]
    return episodes


def evaluate(
    backend: Backend,
    tasks: Sequence[str] | str = ("arithmetic", "unanswerable", "tool_use"),
    num: int = 20,
    seed: int = DEFAULT_SEED,
    samples: int = 1,
    ks: Sequence[int] | None = None,
    options: GenerationOptions | None = None,
    perplexity_source: str | Path | None = None,
    seq_len: int = 256,
    num_windows: int = 32,
    batch_size: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Evaluate `backend` on `tasks` (QA tasks: `num` questions x `samples` samples each; "perplexity": the
    local model on `perplexity_source`). ks: the pass@k values (default 1 and `samples`). progress(task, done,
    total) is called after every chunk of `batch_size` questions."""
    start = time.perf_counter()
    names = parse_task_list(tasks)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    options = options or GenerationOptions(temperature=0.0 if samples == 1 else 1.0)
    ks = sorted({1, samples} if ks is None else set(ks))
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    all_correct: list[list[bool]] = []
    all_abstained: list[list[bool]] = []
    notes: list[str] = []
    for name in [n for n in names if n != PERPLEXITY]:
        questions = make_questions(name, num, seed)
        correct, abstained = [], []
        for lo in range(0, len(questions), batch_size):
            chunk = questions[lo : lo + batch_size]
            for q, eps in zip(chunk, _run_chunk(backend, chunk, samples, options)):
                outcomes = [score(q, ep.final.content if ep.final else "") for ep in eps]
                correct.append([c for c, _ in outcomes])
                abstained.append([a for _, a in outcomes])
                records.append(
                    {
                        "task": name,
                        "prompt": q.prompt_messages[-1]["content"],
                        "expected": q.answer,
                        "samples": [
                            {
                                "reply": ep.final.content if ep.final else "",
                                "correct": c,
                                "abstained": a,
                                "turns": ep.turns,
                            }
                            for ep, (c, a) in zip(eps, outcomes)
                        ],
                    }
                )
            if progress is not None:
                progress(name, min(lo + batch_size, len(questions)), len(questions))
        metrics[name] = summarize(correct, abstained, ks)
        all_correct += correct
        all_abstained += abstained
    if all_correct:
        metrics["overall"] = summarize(all_correct, all_abstained, ks)
    ppl = None
    if PERPLEXITY in names:
        if not hasattr(backend, "perplexity"):
            notes.append("perplexity skipped: an OpenAI-compatible endpoint returns no prompt logits")
        elif perplexity_source is None:
            notes.append("perplexity skipped: no held-out data (pass --data a token folder or a text file)")
        else:
            ppl = backend.perplexity(perplexity_source, seq_len=seq_len, num_windows=num_windows)
        if progress is not None:
            progress(PERPLEXITY, 1, 1)
    settings = {"tasks": names, "num": num, "seed": seed, "samples": samples, "ks": ks, **asdict(options)}
    return EvalResult(backend.name, settings, metrics, records, ppl, notes, time.perf_counter() - start)
