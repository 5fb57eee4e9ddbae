"""Evaluation metrics as pure functions: accuracy, abstention and hallucination rates, unbiased pass@k, Wilson
intervals, and the per-task summary built from them.

Every reply is one of three outcomes: correct; an abstention ("I don't know", not correct); or a wrong answer
(neither). On an unanswerable question the abstention *is* the correct reply, so it counts as correct there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from glm5.data.tasks import is_abstention


def accuracy(correct: Sequence[bool]) -> float:
    """Share of replies that are correct: sum(correct) / len(correct) (0 for no replies)."""
    return sum(map(bool, correct)) / len(correct) if correct else 0.0


def abstention_rate(abstained: Sequence[bool]) -> float:
    """Share of replies that abstain: sum(abstained) / len(abstained), correct abstentions included."""
    return sum(map(bool, abstained)) / len(abstained) if abstained else 0.0


def hallucination_rate(correct: Sequence[bool], abstained: Sequence[bool]) -> float | None:
    """Among the replies that are not correct: wrong / (wrong + abstentions), where wrong = not correct and not
    an abstention. None when every reply is correct (0/0). 0 = the model abstains whenever it fails; 1 = it
    never abstains when it fails."""
    if len(correct) != len(abstained):
        raise ValueError(f"{len(correct)} correctness flags but {len(abstained)} abstention flags")
    wrong = sum(1 for c, a in zip(correct, abstained) if not c and not a)
    abstain = sum(1 for c, a in zip(correct, abstained) if not c and a)
    return wrong / (wrong + abstain) if wrong + abstain else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), i.e. the chance that k samples drawn without replacement include a correct one."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass@{k} needs at least k samples per question (n={n}); raise --samples or lower k"
        )
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(samples: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over questions, each given as (n samples, c correct)."""
    return sum(pass_at_k(n, c, k) for n, c in samples) / len(samples) if samples else 0.0


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion successes / n:
    (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(
    correct: Sequence[Sequence[bool]], abstained: Sequence[Sequence[bool]], ks: Sequence[int] = (1,)
) -> dict:
    """Metrics of one task (or of all tasks pooled) from per-question lists of per-sample flags:
    accuracy / abstention / hallucination over every sample, their Wilson 95% intervals, and pass@k for each
    k no larger than the smallest sample count."""
    flat_c = [bool(x) for q in correct for x in q]
    flat_a = [bool(x) for q in abstained for x in q]
    n = len(flat_c)
    wrong = sum(1 for c, a in zip(flat_c, flat_a) if not c and not a)
    failed_abstain = sum(1 for c, a in zip(flat_c, flat_a) if not c and a)
    out = {
        "questions": len(correct),
        "samples": n,
        "correct": sum(flat_c),
        "abstained": sum(flat_a),
        "wrong": wrong,
        "accuracy": accuracy(flat_c),
        "accuracy_ci": wilson_interval(sum(flat_c), n),
        "abstention_rate": abstention_rate(flat_a),
        "abstention_ci": wilson_interval(sum(flat_a), n),
        "hallucination_rate": hallucination_rate(flat_c, flat_a),
        "hallucination_ci": wilson_interval(wrong, wrong + failed_abstain)
        if wrong + failed_abstain
        else None,
    }
    min_n = min((len(q) for q in correct), default=0)
    out["pass_at_k"] = {
        str(k): mean_pass_at_k([(len(q), sum(map(bool, q))) for q in correct], k)
        for k in ks
        if 1 <= k <= min_n
    }
    return out


def outcome_rates(samples: Sequence[Any]) -> dict[str, Any]:
    """Accuracy, abstention and hallucination rates of finished RL samples (anything with `.reward` and a
    `.metadata` dict holding the "reply" and, for a task with a reference, the "answer"), as defined above: a
    reply is correct when it abstains on an unanswerable question or earns the full reward (1) otherwise;
    hallucination rate = wrong / (wrong + abstentions) over the replies that are not correct (None when all
    are)."""
    replies = [str(s.metadata.get("reply", "")) for s in samples]
    abstained = [is_abstention(r) for r in replies]
    correct = [
        a if "answer" in s.metadata and s.metadata["answer"] is None else float(s.reward) >= 1.0
        for s, a in zip(samples, abstained)
    ]
    n = max(len(samples), 1)
    return {
        "accuracy": sum(correct) / n,
        "abstention_rate": sum(abstained) / n,
        "hallucination_rate": hallucination_rate(correct, abstained),
    }
