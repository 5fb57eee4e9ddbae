"""Asynchronous RL post-training (slime-style): advantages and losses, rewards and tool environments, the
rollout/buffer/trainer system. Each module's docstring states its part of the design; the README's RL section
says how they fit together."""

from glm5._lazy import lazy_exports

_HOMES = {
    "LossConfig": "glm5.rl.losses",
    "compute_advantages": "glm5.rl.losses",
    "policy_loss": "glm5.rl.losses",
    "CalculatorEnvironment": "glm5.rl.rewards",
    "RewardFn": "glm5.rl.rewards",
    "get_reward_fn": "glm5.rl.rewards",
    "task_metadata": "glm5.rl.rewards",
    "Sample": "glm5.rl.types",
    "DataBuffer": "glm5.rl.buffer",
    "BufferConfig": "glm5.rl.buffer",
    "RolloutManager": "glm5.rl.rollout",
    "RolloutConfig": "glm5.rl.rollout",
    "RLTrainer": "glm5.rl.trainer",
    "TrainerConfig": "glm5.rl.trainer",
    "run_loop": "glm5.rl.controller",
    "RLRecipe": "glm5.rl.recipes",
    "recipe_preset": "glm5.rl.recipes",
    "ObjectStoreTransport": "glm5.rl.weight_sync",
    "DiskTransport": "glm5.rl.weight_sync",
    "CollectiveTransport": "glm5.rl.weight_sync",
    "state_hash": "glm5.rl.weight_sync",
}
__getattr__, __all__ = lazy_exports("glm5.rl", _HOMES)
