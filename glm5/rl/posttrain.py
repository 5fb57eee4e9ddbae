"""RL after SFT on the frontier tasks (glm5.data.frontier): the reward variants of the post-training ablation
(benchmarks/bench_posttrain.py), the recipe each one runs, and the KL anchor to the SFT policy.

The prompt mix is balanced: easy, hard and tool items (answerable) and unanswerable questions, each a quarter,
so abstaining everywhere cannot pay. GRPO normalises rewards within each prompt's group, which is already a
per-item (finer than per-difficulty) normalisation. Variants:

- ``binary``:    +1 right, 0 otherwise (math reward): no reason to abstain rather than guess;
- ``abstain``:   +1 right / 0 "I don't know" / -1 wrong: answer only when P(right) > 1/2;
- ``abstain+kl``: the same with a k3 KL penalty to the SFT policy (a frozen copy) that keeps what SFT taught
  (formats, tool calls, the easy facts) while the reward moves the abstention boundary;
- ``generous``:  +1 / +0.5 / -1: abstention credit close to a right answer (answer only when P(right) > 3/4),
  the road to always-abstaining;
- ``bold+kl``:   +1 / -0.5 / -1 with a stronger KL anchor (0.3): declining costs something too, so the policy
  answers when P(right) > 1/4 — the bar for a small model that knows only part of what it is asked.

The ablation (docs/performance.md § bench_posttrain.py; one demo SFT policy, 80 updates, 3 seeds): every
abstention variant cuts held-out hallucination 80-84% at no loss of accuracy and they do not differ beyond seed
noise; binary raises it to 100%. From a weaker SFT policy all of them also decline sums it half knows, `bold+kl`
least (one seed), which is why the demo runs it.
"""

from __future__ import annotations

from typing import Any

from glm5.rl.recipes import RLRecipe

VARIANTS: dict[str, dict[str, Any]] = {
    "binary": {"reward": "math", "kl_coef": 0.0},
    "abstain": {"reward": "abstain", "kl_coef": 0.0},
    "abstain+kl": {"reward": "abstain", "kl_coef": 0.05},
    "generous": {"reward": "abstain-generous", "kl_coef": 0.0},
    "bold+kl": {"reward": "abstain-bold", "kl_coef": 0.3},
}
"""Reward variant -> reward name (glm5.rl.rewards.REWARDS) and KL-to-SFT coefficient."""
DEFAULT_VARIANT = "bold+kl"
"""The variant `make demo` runs (chosen by the ablation; see the README and benchmarks/bench_posttrain.py)."""
TASK_COUNTS = {"frontier_easy": 100, "frontier_hard": 100, "frontier_unanswerable": 100, "frontier_tool": 100}
"""RL prompts per kind (training items only): answerable and unanswerable balanced."""


def posttrain_recipe(variant: str = DEFAULT_VARIANT, steps: int = 80, seed: int = 0) -> Any:
    """The RLRecipe of a reward variant: the frontier training items, the calculator environment (multi-turn:
    observations carry no loss), fully asynchronous GRPO with partial rollouts."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown post-training variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    loss = dict(off_policy="decoupled", is_level="token", is_rule="truncate", is_threshold_high=2.0)
    if v["kl_coef"]:
        loss.update(kl_coef=v["kl_coef"], kl_estimator="k3")
    return RLRecipe(
        name=f"posttrain-{variant}",
        task="tool",
        task_counts=dict(TASK_COUNTS),
        reward=v["reward"],
        steps=steps,
        overlap=True,
        buffer=dict(batch_size=8, max_staleness=1, policy="pace", over_sample=0),
        rollout=dict(
            n_samples=6,
            max_new_tokens=48,
            temperature=1.0,
            filter_zero_variance=True,
            update_mode="abort",
            partial_rollout=True,
        ),
        trainer=dict(lr=5e-4, micro_batch_size=48, loss=loss),
        max_turns=2,
        eval_prompts=4,
        seed=seed,
    )


def attach_reference(trainer: Any, model: Any) -> None:
    """Give `trainer` a frozen copy of `model` (the starting policy) as the KL reference when its loss has a KL
    term and no reference yet. Call it before the first update (the copy is the SFT policy)."""
    if trainer.loss_cfg.kl_coef <= 0 or trainer.ref_model is not None:
        return
    ref = type(model)(model.config)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    trainer.ref_model = ref.to(next(model.parameters()).device).eval()
