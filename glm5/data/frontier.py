"""Post-training tasks with a knowable frontier: an item pool where a small model can know some answers and not
others, split deterministically by item into training and held-out items.

Difficulties (each a `Task.kind`, `Task.meta["difficulty"]` the short name):

- ``frontier_easy`` (easy): one-digit sums and differences in four phrasings ("What is 3 + 4?"). There are only
  155 facts, so every fact is learnable; an *item* is a (phrasing, fact) pair and the held-out items are unseen
  phrasings of facts the model can know. A share ``EASY_ABSTAIN_SHARE`` of the training items is answered with
  the abstention (see below).
- ``frontier_hard`` (hard): the same phrasings with two three-digit numbers ("What is 483 + 729?"): about 1.6M
  items, so held-out items are new, and a model of a few million parameters mostly cannot add them in its head.
  The reference reply answers them, except for a share ``HARD_ABSTAIN_SHARE`` answered with the abstention:
  the SFT policy then samples both behaviours on any sum, and RL learns where each pays (held-out items are
  always scored against the true answer).
- ``frontier_unanswerable`` (unanswerable): questions about made-up or unknowable things (glm5.data.tasks's
  generator, with a short thought); the right reply is the abstention.
- ``frontier_tool`` (tool): a product of two two-digit numbers, written without spaces (``43*88``), with the
  calculator tool offered: think (restating the expression), call ``calculator`` with it, read the observation,
  answer with it (a multi-turn episode). Both phrasings end in " with the calculator." and the product has no
  spaces, so each copy (question -> thought -> call, observation -> thought -> answer) is a fixed-offset copy of
  digit tokens: with the expression as "43 * 88" the token before the second operand (" ") occurs all over
  the context, and a 2-layer model copied the second operand wrong on most items.

A calibrated policy answers easy items, abstains on hard and unanswerable ones (unless it is right) and uses
the tool. The split is by a seeded hash of each item's identity (`item_key`), so no held-out item is ever
trained on, whatever the counts: `frontier_tasks(kind, n, seed, split="train" | "heldout")`.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from glm5.data.tasks import (
    ABSTENTION,
    CALCULATOR_TOOL,
    TASK_GENERATORS,
    Task,
    calculator,
    unanswerable_tasks,
)

HELDOUT_FRACTION = 0.25
"""Share of items (by hashed identity) that are held out for evaluation."""
HARD_ABSTAIN_SHARE = 0.3
"""Share of hard training items whose reference reply is the abstention (the rest state the sum)."""
EASY_ABSTAIN_SHARE = 0.1
"""Share of easy training items answered with the abstention: the SFT policy can then sample declining on any
sum (greedy decoding still answers), so RL can learn to decline the sums it gets wrong."""
SPLIT_SALT = "glm5-frontier-v1"
DIFFICULTIES = ("easy", "hard", "unanswerable", "tool")
KINDS = tuple(f"frontier_{d}" for d in DIFFICULTIES)
"""Task kinds, one per difficulty (registered in glm5.data.tasks.TASK_GENERATORS and glm5.eval.tasks)."""
ANSWERABLE = ("easy", "hard", "tool")

_PHRASINGS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a} {op} {b}.")
_HARD_THINKING = "These numbers are too large to add reliably in my head."
_UNKNOWABLE_THINKING = "Nothing I know answers this."
"""Short thinking before the abstention on unanswerable items (a reply must fit the RL token budget)."""
_TOOL_QUESTIONS = ("Compute {e} with the calculator.", "Calculate {e} with the calculator.")


def item_key(kind: str, identity: str) -> str:
    """The identity an item is split by (kind + its canonical text)."""
    return f"{kind}|{identity}"


def is_heldout(key: str) -> bool:
    """Whether the item with this key is held out (a seeded hash, independent of counts and order)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < HELDOUT_FRACTION


def _sum_task(kind: str, phrasing: int, a: int, op: str, b: int, abstain: bool) -> Task:
    value = a + b if op == "+" else a - b
    question = _PHRASINGS[phrasing].format(a=a, op=op, b=b)
    if abstain:
        reply = {"role": "assistant", "reasoning_content": _HARD_THINKING, "content": ABSTENTION}
    else:
        reply = {"role": "assistant", "reasoning_content": f"{a} {op} {b} = {value}.", "content": str(value)}
    meta = {"difficulty": kind.removeprefix("frontier_"), "expression": f"{a} {op} {b}", "key": question}
    return Task(kind, [{"role": "user", "content": question}, reply], str(value), meta=meta)


def _easy_pool() -> list[tuple[int, int, str, int]]:
    facts = [(a, "+", b) for a in range(10) for b in range(10)]
    facts += [(a, "-", b) for a in range(10) for b in range(a + 1)]
    return [(p, a, op, b) for p in range(len(_PHRASINGS)) for a, op, b in facts]


def _easy(count: int, seed: int, heldout: bool) -> list[Task]:
    pool = [
        (p, a, op, b)
        for p, a, op, b in _easy_pool()
        if is_heldout(item_key("easy", _PHRASINGS[p].format(a=a, op=op, b=b))) == heldout
    ]
    rng = random.Random(seed)
    if heldout:  # distinct items (cycled only when more are asked for than there are)
        rng.shuffle(pool)
        picks = [pool[i % len(pool)] for i in range(count)]
    else:
        picks = [rng.choice(pool) for _ in range(count)]
    rng = random.Random(f"easy-abstain:{seed}")
    return [
        _sum_task("frontier_easy", p, a, op, b, abstain=not heldout and rng.random() < EASY_ABSTAIN_SHARE)
        for p, a, op, b in picks
    ]


def _sample_items(count: int, seed: int, heldout: bool, kind: str, draw: Any) -> list[Any]:
    """`count` items from `draw(rng) -> (identity, item)` whose split matches (rejection sampling)."""
    rng = random.Random(f"{kind}:{seed}")
    out = []
    while len(out) < count:
        identity, item = draw(rng)
        if is_heldout(item_key(kind, identity)) == heldout:
            out.append(item)
    return out


def _hard(count: int, seed: int, heldout: bool) -> list[Task]:
    def draw(rng: random.Random) -> tuple[str, tuple[int, int, str, int]]:
        p, a, b, op = rng.randrange(len(_PHRASINGS)), rng.randint(100, 999), rng.randint(100, 999), "+"
        return _PHRASINGS[p].format(a=a, op=op, b=b), (p, a, op, b)

    items = _sample_items(count, seed, heldout, "hard", draw)
    rng = random.Random(f"hard-abstain:{seed}")
    return [
        _sum_task("frontier_hard", p, a, op, b, abstain=not heldout and rng.random() < HARD_ABSTAIN_SHARE)
        for p, a, op, b in items
    ]


def _tool(count: int, seed: int, heldout: bool) -> list[Task]:
    def draw(rng: random.Random) -> tuple[str, tuple[str, str]]:
        expression = f"{rng.randint(11, 99)}*{rng.randint(11, 99)}"
        return expression, (expression, rng.choice(_TOOL_QUESTIONS).format(e=expression))

    tasks = []
    for expression, question in _sample_items(count, seed, heldout, "tool", draw):
        result = calculator(expression)
        call = {
            "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": expression}},
        }
        messages = [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "reasoning_content": f"{expression} needs the calculator.",
                "content": "",
                "tool_calls": [call],
            },
            {"role": "tool", "content": result},
            {
                "role": "assistant",
                "reasoning_content": f"The calculator returned {result}.",
                "content": result,
            },
        ]
        meta = {"difficulty": "tool", "expression": expression, "key": expression}
        tasks.append(Task("frontier_tool", messages, result, tools=[CALCULATOR_TOOL], meta=meta))
    return tasks


def _unanswerable(count: int, seed: int, heldout: bool) -> list[Task]:
    tasks: list[Task] = []
    batch = 0
    while len(tasks) < count:  # the generator's own questions, kept when their text falls in the split
        for t in unanswerable_tasks(max(8, 2 * (count - len(tasks))), seed * 7919 + batch):
            question = t.messages[0]["content"]
            if is_heldout(item_key("unanswerable", question)) == heldout and len(tasks) < count:
                meta = {"difficulty": "unanswerable", "key": question}
                reply = {
                    "role": "assistant",
                    "reasoning_content": _UNKNOWABLE_THINKING,
                    "content": ABSTENTION,
                }
                tasks.append(Task("frontier_unanswerable", [t.messages[0], reply], None, meta=meta))
        batch += 1
    return tasks


_BUILDERS = {"easy": _easy, "hard": _hard, "unanswerable": _unanswerable, "tool": _tool}


def frontier_tasks(kind: str, count: int, seed: int, split: str = "train") -> list[Task]:
    """`count` tasks of one frontier kind (``frontier_easy`` or just ``easy``) from one split (``train`` or
    ``heldout``); deterministic in (kind, count, seed, split)."""
    difficulty = kind.removeprefix("frontier_")
    if difficulty not in _BUILDERS:
        raise ValueError(f"unknown frontier kind {kind!r}; choose from {', '.join(KINDS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if count < 0:
        raise ValueError(f"task count for {kind!r} must be >= 0, got {count}")
    return _BUILDERS[difficulty](count, seed, split == "heldout")


def train_generator(kind: str) -> Any:
    """generator(count, seed) of training items of `kind` (for TASK_GENERATORS: SFT and RL prompts)."""
    return lambda count, seed: frontier_tasks(kind, count, seed, "train")


def heldout_generator(kind: str) -> Any:
    """generator(count, seed) of held-out items of `kind` (for the evaluation tasks)."""
    return lambda count, seed: frontier_tasks(kind, count, seed, "heldout")


TASK_GENERATORS.update({kind: train_generator(kind) for kind in KINDS})
