"""Fixed-length training windows over a token file, and a resumable, seeded batch order.

Window i holds tokens [i*L, i*L + L + 1): the model reads the first L, and the next-token targets are the
last L, set to IGNORE where the loss mask is 0 (prompt text of a chat). Multi-token prediction depth d
(position t predicts token t + d + 2) uses the same targets shifted by d + 1; its last d + 1 positions see
padding as the following token and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glm5.data.tokens import TokenFile

IGNORE = -100
"""Target id that the cross-entropy skips (torch's ignore_index default)."""


@dataclass
class Batch:
    """B windows: `input_ids` [B, L] and `targets` [B, L] (IGNORE where there is nothing to learn)."""

    input_ids: torch.Tensor
    targets: torch.Tensor

    def mtp_targets(self, depth: int) -> torch.Tensor:
        """Targets of MTP depth `depth` (0-based): position t -> token t + depth + 2."""
        shift = depth + 1
        pad = self.targets.new_full((self.targets.shape[0], min(shift, self.targets.shape[1])), IGNORE)
        return torch.cat([self.targets[:, shift:], pad], dim=1)

    def split(self, parts: int) -> list[Batch]:
        """Equal slices along the batch dimension (micro-batches, or one slice per data-parallel rank)."""
        if self.input_ids.shape[0] % parts:
            raise ValueError(
                f"batch of {self.input_ids.shape[0]} sequences cannot be split into {parts} equal parts"
            )
        return [Batch(i, t) for i, t in zip(self.input_ids.chunk(parts), self.targets.chunk(parts))]

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]


class PackedSequences:
    """Windows of `seq_len` inputs (+1 target token) over one split, read from the memory map on demand."""

    def __init__(self, tokens: TokenFile, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        if self.num_windows == 0:
            raise ValueError(
                f"the {tokens.split} split has {len(tokens)} tokens: too few for one window of "
                f"{seq_len + 1}; lower seq_len or add data"
            )

    def __len__(self) -> int:
        return self.num_windows

    def batch(self, indices: list[int] | torch.Tensor) -> Batch:
        L = self.seq_len
        rows_ids, rows_mask = [], []
        for i in [int(i) for i in indices]:
            if not 0 <= i < self.num_windows:
                raise IndexError(f"window {i} out of range (0..{self.num_windows - 1})")
            rows_ids.append(np.asarray(self.tokens.ids[i * L : i * L + L + 1], dtype=np.int64))
            rows_mask.append(np.asarray(self.tokens.mask[i * L + 1 : i * L + L + 1], dtype=bool))
        ids = torch.from_numpy(np.stack(rows_ids))
        targets = ids[:, 1:].clone()
        targets[~torch.from_numpy(np.stack(rows_mask))] = IGNORE
        return Batch(ids[:, :L].contiguous(), targets)


class BatchOrder:
    """A seeded permutation of the windows per epoch; the cursor (epoch, position) makes it resumable exactly."""

    def __init__(self, num_windows: int, batch_size: int, seed: int) -> None:
        if batch_size > num_windows:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_windows} training windows; add data")
        self.num_windows, self.batch_size, self.seed = num_windows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.num_windows, generator=gen)
        return self._perm

    def next_indices(self) -> torch.Tensor:
        """The next batch's window indices (a new epoch starts when fewer than batch_size remain)."""
        if self.position + self.batch_size > self.num_windows:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        out = self._permutation()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None
