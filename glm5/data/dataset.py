"""The pre-training mixture: an embedded text corpus plus synthetic chat tasks, tokenised once into train and
validation token files (deterministic document-level split), reused while the recipe and tokenizer match.

Default corpus: the CPython standard library `.py` sources of the running interpreter (PSF licence; no test
folders, no site-packages; 734 files, 12.1 MB for CPython 3.11; with the default chat tasks about 4M tokens
at an 8K vocabulary), on every machine with Python and never downloaded. Chat tasks (glm5.data.tasks) are
rendered with the GLM-5 chat template; their loss mask
keeps only what the assistant generates.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from glm5.data.tasks import Task, generate_tasks
from glm5.data.tokens import TokenFile
from glm5.tokenizer import GLM5Tokenizer
from glm5.tokenizer.chat import render_chat
from glm5.tokenizer.tokenizer import default_corpus_files, expand_corpus_paths

FORMAT_VERSION = 2  # 2: corpus text and chat content are encoded literally (special-token strings = bytes)


@dataclass
class DataSpec:
    """What goes into the token files (part of the training recipe)."""

    corpus: list[str] | None = None
    """Text files or folders; None = the CPython standard library sources."""
    max_corpus_bytes: int | None = None
    """Use only the first files (after a seeded shuffle) up to this many bytes; None = all."""
    chat_tasks: dict[str, int] = field(
        default_factory=lambda: {
            "arithmetic": 3000,
            "word_problem": 1500,
            "calculator": 1500,
            "unanswerable": 1500,
        }
    )
    """Synthetic chat tasks per kind (glm5.data.tasks.TASK_GENERATORS)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (chosen by a seeded hash of each document's identity)."""
    seed: int = 0
    """Seeds the task generators, the corpus subset, the split and the document order."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


def corpus_files(spec: DataSpec) -> list[Path]:
    """The corpus files of `spec`, in a seeded order, cut at `max_corpus_bytes`."""
    files = expand_corpus_paths(spec.corpus) if spec.corpus else default_corpus_files()
    files = sorted(files)
    random.Random(spec.seed).shuffle(files)
    if spec.max_corpus_bytes is None:
        return files
    kept, total = [], 0
    for path in files:
        if total >= spec.max_corpus_bytes:
            break
        kept.append(path)
        total += path.stat().st_size
    return kept


def corpus_texts(spec: DataSpec) -> Iterator[str]:
    """Every text of the mixture as a string (corpus files, then rendered chats): what the tokenizer learns from."""
    for path in corpus_files(spec):
        yield path.read_text(encoding="utf-8", errors="replace")
    for task in generate_tasks(spec.chat_tasks, spec.seed):
        yield render_chat(task.messages, task.tools, add_generation_prompt=False)


def _is_val(key: str, spec: DataSpec) -> bool:
    digest = hashlib.sha256(f"{spec.seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < spec.val_fraction


def _documents(tok: GLM5Tokenizer, spec: DataSpec) -> tuple[list, list]:
    """(train, val) lists of (key, ids, mask) documents."""
    eos = tok.eos_token_id
    files = corpus_files(spec)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    docs = []
    for path, ids in zip(
        files, tok.encode_batch(texts, allow_special=False)
    ):  # a '<|user|>' in a file is text
        ids = np.asarray(ids + [eos], dtype=np.int64)
        key = "/".join(Path(path).parts[-3:])  # machine-independent: the split must not depend on the prefix
        docs.append((f"file:{key}:{len(ids)}", ids, np.ones(len(ids), dtype=np.uint8)))
    del texts
    tasks: list[Task] = generate_tasks(spec.chat_tasks, spec.seed)
    for i, task in enumerate(tasks):
        ids, mask = tok.apply_chat_template(task.messages, task.tools, add_generation_prompt=False)
        docs.append(
            (f"chat:{task.kind}:{i}", np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))
        )
    train = [d for d in docs if not _is_val(d[0], spec)]
    val = [d for d in docs if _is_val(d[0], spec)]
    rng = np.random.default_rng(spec.seed)  # interleave code and chat documents
    return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def _fingerprint(tok: GLM5Tokenizer, spec: DataSpec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, **asdict(spec)}, sort_keys=True).encode())
    h.update(tok.backend.to_str().encode())
    return h.hexdigest()[:16]


def build_dataset(folder: str | Path, tok: GLM5Tokenizer, spec: DataSpec) -> tuple[TokenFile, TokenFile]:
    """Tokenise the mixture into `folder`/{train,val}.* (skipped when files of the same spec+tokenizer exist)."""
    folder = Path(folder)
    fingerprint = _fingerprint(tok, spec)
    try:
        train, val = TokenFile(folder, "train"), TokenFile(folder, "val")
        if train.meta.get("fingerprint") == fingerprint == val.meta.get("fingerprint"):
            return train, val
    except ValueError:
        pass
    train_docs, val_docs = _documents(tok, spec)
    if not train_docs or not val_docs:
        raise ValueError(
            f"the data split is empty ({len(train_docs)} train / {len(val_docs)} validation documents); "
            "add corpus files or chat tasks, or change val_fraction"
        )
    info = {"fingerprint": fingerprint, "spec": asdict(spec)}
    val = TokenFile.write(folder, "val", ((ids, m) for _, ids, m in val_docs), tok.vocab_size, info)
    train = TokenFile.write(folder, "train", ((ids, m) for _, ids, m in train_docs), tok.vocab_size, info)
    return train, val
