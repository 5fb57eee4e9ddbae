"""Pre-training: recipes, the training loop, optimisers, FSDP2 + expert parallel, resumable checkpoints."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glm5.train.pretrain import Trainer
    from glm5.train.recipe import RECIPES, Stage, TrainRecipe, recipe_preset

__all__ = ["RECIPES", "Stage", "TrainRecipe", "Trainer", "recipe_preset"]
_HOME = {"Trainer": "glm5.train.pretrain", "RECIPES": "glm5.train.recipe", "Stage": "glm5.train.recipe",
         "TrainRecipe": "glm5.train.recipe", "recipe_preset": "glm5.train.recipe"}  # fmt: skip


def __getattr__(name: str) -> Any:
    # Lazy: `glm5 --help` builds the parser with glm5.train.cli and must not import torch for it.
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'glm5.train' has no attribute {name!r}")
