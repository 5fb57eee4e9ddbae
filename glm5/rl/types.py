"""`Sample`: the one record that flows through rollout, buffer and trainer (tokens are the source of truth).

A sample is one rollout of one prompt: `tokens` = prompt ids + response ids (the policy's tokens, and in
multi-turn episodes the environment's tokens between turns). Per response token it carries the loss mask
(1 = the policy sampled it, 0 = tool output / chat scaffolding), the behavior logprob reported by the engine
(0 where the mask is 0) and the weight version that sampled it. The trainer never re-tokenizes text.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class SampleStatus(str, enum.Enum):
    """Where a rollout stands. String-valued: a status compares equal to, prints as and serialises to its value
    ("completed", ...), so checkpoints, JSON and logs read as plain strings."""

    PENDING = "pending"
    """Not started or still generating."""
    COMPLETED = "completed"
    """Ended by a stop token (or the environment)."""
    TRUNCATED = "truncated"
    """Hit max_new_tokens (or the engine's max_model_len)."""
    ABORTED = "aborted"
    """Cut by a weight update: a partial rollout, resumable."""
    FAILED = "failed"
    """The engine or the environment failed."""

    def __str__(self) -> str:
        return self.value

    @property
    def done(self) -> bool:
        """No more generation: completed, truncated or failed (an aborted rollout resumes)."""
        return self in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED, SampleStatus.FAILED)


@dataclass
class Sample:
    """One rollout of one prompt (see the module docstring)."""

    uid: str
    """Unique id: "{prompt_id}.{epoch}.{index}"."""
    prompt_id: int
    """Index of the prompt in the data source."""
    group_id: str
    """Samples of one prompt and epoch share it ("{prompt_id}.{epoch}"); advantages are normalised per group."""
    index: int
    """Which of the group's n rollouts this is."""
    tokens: list[int]
    """Prompt ids followed by the response ids generated (or observed) so far."""
    prompt_len: int
    """Number of prompt ids at the start of `tokens`."""
    loss_mask: list[int] = field(default_factory=list)
    """Per response token: 1 = trained (sampled by the policy), 0 = not (environment / tool tokens)."""
    behavior_logprobs: list[float] = field(default_factory=list)
    """Per response token: log mu(token) as reported by the engine that sampled it (0 where loss_mask is 0)."""
    token_versions: list[int] = field(default_factory=list)
    """Per response token: the weight version of the engine when it produced (or observed) the token."""
    reward: float | None = None
    """Scalar reward of the whole rollout (None until scored)."""
    status: SampleStatus = SampleStatus.PENDING
    """Where the rollout stands (a plain string such as "completed" is converted on construction)."""
    epoch: int = 0
    """Pass over the data this sample belongs to."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Task data for the reward (answer, kind, tools, ...) plus rollout notes (turn, attempts, aborts)."""

    def __post_init__(self) -> None:
        try:
            self.status = SampleStatus(self.status)
        except ValueError:
            allowed = ", ".join(s.value for s in SampleStatus)
            raise ValueError(
                f"Sample {self.uid}: unknown status {self.status!r}; use one of {allowed}"
            ) from None

    @property
    def response_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def response_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self.status.done

    def trained_versions(self) -> list[int]:
        """Versions of the tokens that carry loss (the ones staleness is about)."""
        return [v for v, m in zip(self.token_versions, self.loss_mask) if m]

    def head_version(self) -> int | None:
        """Oldest version among trained tokens (None when nothing is trained)."""
        versions = self.trained_versions()
        return min(versions) if versions else None

    def tail_version(self) -> int | None:
        """Newest version among trained tokens."""
        versions = self.trained_versions()
        return max(versions) if versions else None

    def append(self, ids: list[int], logprobs: list[float], versions: list[int], trainable: bool) -> None:
        """Add response tokens (the engine's, trainable, or the environment's, masked out)."""
        assert len(ids) == len(logprobs) == len(versions), "one logprob and one version per token"
        self.tokens += ids
        self.loss_mask += [int(trainable)] * len(ids)
        self.behavior_logprobs += logprobs if trainable else [0.0] * len(ids)
        self.token_versions += versions

    def reset_response(self) -> None:
        """Drop the response (a restart from scratch: partial rollouts off)."""
        del self.tokens[self.prompt_len :]
        self.loss_mask, self.behavior_logprobs, self.token_versions = [], [], []
        self.reward, self.status = None, SampleStatus.PENDING
        for key in ("turn", "reply"):  # episode notes of the dropped response (the tool budget starts over)
            self.metadata.pop(key, None)

    def check(self) -> None:
        """Internal invariants: one mask, logprob and version per response token; versions never decrease."""
        n = self.response_len
        assert len(self.loss_mask) == len(self.behavior_logprobs) == len(self.token_versions) == n, self.uid
        assert all(a <= b for a, b in zip(self.token_versions, self.token_versions[1:])), self.uid
        assert isinstance(self.status, SampleStatus), self.status

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the status as its string)."""
        return dataclasses.asdict(self) | {"status": self.status.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**d)


def new_group(
    prompt_id: int, epoch: int, prompt: list[int], n: int, metadata: dict[str, Any]
) -> list[Sample]:
    """n fresh samples of one prompt."""
    gid = f"{prompt_id}.{epoch}"
    return [
        Sample(
            f"{gid}.{i}", prompt_id, gid, i, list(prompt), len(prompt), epoch=epoch, metadata=dict(metadata)
        )
        for i in range(n)
    ]
