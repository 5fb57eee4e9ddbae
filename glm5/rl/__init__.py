"""Asynchronous RL post-training (slime-style): advantages and losses, rewards and tool environments, the
rollout/buffer/trainer system. Design: /work/shared/design/RL.md (Part A)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glm5.rl.losses import LossConfig, compute_advantages, policy_loss
    from glm5.rl.rewards import CalculatorEnvironment, RewardFn, get_reward_fn, task_metadata

__all__ = ["CalculatorEnvironment", "LossConfig", "RewardFn", "compute_advantages", "get_reward_fn",
           "policy_loss", "task_metadata"]  # fmt: skip
_HOME = {"LossConfig": "glm5.rl.losses", "compute_advantages": "glm5.rl.losses", "policy_loss": "glm5.rl.losses",
         "CalculatorEnvironment": "glm5.rl.rewards", "RewardFn": "glm5.rl.rewards",
         "get_reward_fn": "glm5.rl.rewards", "task_metadata": "glm5.rl.rewards"}  # fmt: skip


def __getattr__(name: str) -> Any:
    # Lazy: the CLI builds its parser without importing torch, math-verify or ray.
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'glm5.rl' has no attribute {name!r}")

# The RL system (types, buffer, rollout, trainer, weight sync, loop, recipes), lazily as above.
_SYSTEM = {"Sample": "glm5.rl.types", "DataBuffer": "glm5.rl.buffer", "BufferConfig": "glm5.rl.buffer",
           "RolloutManager": "glm5.rl.rollout", "RolloutConfig": "glm5.rl.rollout", "RLTrainer": "glm5.rl.trainer",
           "TrainerConfig": "glm5.rl.trainer", "run_loop": "glm5.rl.controller", "RLRecipe": "glm5.rl.recipes",
           "recipe_preset": "glm5.rl.recipes", "ObjectStoreTransport": "glm5.rl.weight_sync",
           "DiskTransport": "glm5.rl.weight_sync", "CollectiveTransport": "glm5.rl.weight_sync",
           "state_hash": "glm5.rl.weight_sync"}  # fmt: skip
_HOME.update(_SYSTEM)
__all__ += sorted(_SYSTEM)
