"""Helpers shared by the training tests: a prepared tiny run folder (tokenizer + token files built once)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from glm5.train import Stage, Trainer, TrainRecipe, recipe_preset

STAGES = [
    Stage("dense", 0.4, dsa=False),
    Stage("indexer-warmup", 0.2, dsa=False, train="indexer"),
    Stage("sparse", 0.4, dsa=True),
]


def smoke_recipe(**changes) -> TrainRecipe:
    """The `smoke` recipe (a 2-layer GLM-5-shaped model) with every stage inside a few steps."""
    return recipe_preset("smoke").replace(**{"steps": 5, "warmup_steps": 1, "stages": STAGES, **changes})


def prepare(base: Path) -> Path:
    """Build the tokenizer and token files once into `base` (a Trainer does it on first use)."""
    if not (base / "data" / "train.json").is_file():
        Trainer(smoke_recipe(), base, quiet=True)
    return base


def run_folder(base: Path, folder: Path) -> Path:
    """A fresh output folder holding a copy of `base`'s tokenizer and token files."""
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("tokenizer", "data"):
        if not (folder / sub).exists():
            shutil.copytree(base / sub, folder / sub)
    return folder


def losses(records: list[dict]) -> list[tuple[float, ...]]:
    return [(r["loss"], r["lm"], r["mtp"], r["indexer"], r["grad_norm"]) for r in records]


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
