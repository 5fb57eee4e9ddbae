"""Pre-training data: the embedded corpus, synthetic chat tasks, memory-mapped token files and packing."""

from glm5.data.dataset import DataSpec, build_dataset, corpus_files, corpus_texts
from glm5.data.frontier import frontier_tasks  # also registers the frontier_* task kinds
from glm5.data.packing import IGNORE, Batch, BatchOrder, PackedSequences
from glm5.data.tasks import (
    ABSTENTION,
    TASK_GENERATORS,
    Task,
    calculator,
    check_answer,
    generate_tasks,
    is_abstention,
)
from glm5.data.tokens import TokenFile

__all__ = [
    "ABSTENTION",
    "IGNORE",
    "TASK_GENERATORS",
    "Batch",
    "BatchOrder",
    "DataSpec",
    "PackedSequences",
    "Task",
    "TokenFile",
    "build_dataset",
    "calculator",
    "check_answer",
    "corpus_files",
    "corpus_texts",
    "frontier_tasks",
    "generate_tasks",
    "is_abstention",
]
