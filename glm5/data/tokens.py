"""A tokenised split on disk: token ids and a loss mask as flat memory-mapped arrays, written once, read many.

Layout of `<folder>/<split>.ids` (uint16 when the vocabulary fits, else uint32), `<split>.mask` (uint8, 1 where
the token is a training target) and `<split>.json` (dtype, counts, document offsets). Documents are stored
back to back; each ends with its own end token, so a packed window may span several documents (the usual
GPT-style packing; the chat loss masks travel with the tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenFile:
    """Read access to one split: `ids` and `mask` are numpy memmaps (no copy, shared by worker processes)."""

    def __init__(self, folder: str | os.PathLike, split: str) -> None:
        self.folder, self.split = Path(folder), split
        meta_path = self.folder / f"{split}.json"
        if not meta_path.is_file():
            raise ValueError(f"no token file {meta_path}; build the data first (glm5.data.build_dataset)")
        self.meta = json.loads(meta_path.read_text())
        n = self.meta["num_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        self.ids = (
            np.memmap(self.folder / f"{split}.ids", dtype=dtype, mode="r", shape=(n,))
            if n
            else np.zeros(0, dtype)
        )
        self.mask = (
            np.memmap(self.folder / f"{split}.mask", dtype=np.uint8, mode="r", shape=(n,))
            if n
            else np.zeros(0, np.uint8)
        )

    def __len__(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_documents(self) -> int:
        return len(self.meta["doc_offsets"]) - 1

    @staticmethod
    def write(
        folder: str | os.PathLike,
        split: str,
        documents: Iterable[tuple[np.ndarray, np.ndarray]],
        vocab_size: int,
        info: dict | None = None,
    ) -> TokenFile:
        """Write (ids, mask) documents in order. The files appear under their final names only when complete."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = _dtype_for(vocab_size)
        tmp = {ext: folder / f".{split}.{ext}.tmp" for ext in ("ids", "mask", "json")}
        offsets = [0]
        with open(tmp["ids"], "wb") as f_ids, open(tmp["mask"], "wb") as f_mask:
            for ids, mask in documents:
                if len(ids) != len(mask):
                    raise ValueError(
                        f"document {len(offsets) - 1}: {len(ids)} ids but {len(mask)} mask values"
                    )
                f_ids.write(np.asarray(ids, dtype=dtype).tobytes())
                f_mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
                offsets.append(offsets[-1] + len(ids))
        meta = {
            "dtype": dtype.name,
            "num_tokens": offsets[-1],
            "vocab_size": vocab_size,
            "doc_offsets": offsets,
            **(info or {}),
        }
        tmp["json"].write_text(json.dumps(meta))
        for ext in ("ids", "mask", "json"):  # the .json last: its presence means the split is complete
            os.replace(tmp[ext], folder / f"{split}.{ext}")
        return TokenFile(folder, split)

    def unigram_counts(self, vocab_size: int) -> np.ndarray:
        """How often each id occurs as a training target (mask 1), for the unigram baseline."""
        if not len(self):
            return np.zeros(vocab_size, dtype=np.int64)
        return np.bincount(np.asarray(self.ids)[np.asarray(self.mask) == 1], minlength=vocab_size)[
            :vocab_size
        ]
