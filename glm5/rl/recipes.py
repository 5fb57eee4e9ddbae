"""RL recipes (named dataclass presets) and what they name: the prompt set, the policy, tokenizer and reward.

Recipes:
- math-sync:     easy arithmetic + unanswerable questions, math reward (+1 right, 0 otherwise), eta = 0,
                 generation inline (synchronous: generate, train, update);
- math-async:    the same data, eta = 1, generation on a background thread overlapping training, partial
                 rollouts aborted at each update and continued (fully asynchronous);
- math-abstain:  math-async with the abstention-aware reward (+1 right / 0 "I don't know" / -1 wrong);
- tool-use:      calculator episodes (multi-turn: tool results are appended with loss mask 0), eta = 1;
- digits-sync / digits-async: a token-level toy ("a+b=" -> the last digit of the sum, 16-symbol vocabulary)
                 that a randomly initialised tiny model learns in seconds: the learning smoke test and demo.

Without `--init` the chat recipes build a tiny model and a byte-level BPE trained on the task texts, then
warm-start it by supervised fine-tuning on the tasks' reference answers (RL needs a policy that is right
sometimes); with `--init` they load a `glm5 train` checkpoint folder (HF layout + tokenizer).
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMALL_MODEL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    q_lora_rank=32,
    kv_lora_rank=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    qk_nope_head_dim=16,
    v_head_dim=16,
    qk_rope_head_dim=8,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    index_n_heads=2,
    index_head_dim=16,
    index_topk=64,
    num_nextn_predict_layers=0,
    max_position_embeddings=512,
)
"""GLM5Config overrides of the tiny preset for a model built without --init (MLA, MoE and DSA all present)."""


@dataclass
class RLRecipe:
    """Everything that defines an RL run; `glm5 rl --recipe NAME` picks a preset."""

    name: str = "custom"
    """Label in logs and plots."""
    task: str = "math"
    """Prompt source: "math" (easy arithmetic + unanswerable chat tasks), "tool" (calculator episodes) or
    "digits" (the token-level toy)."""
    task_counts: dict[str, int] = field(default_factory=lambda: {"easy_arithmetic": 240, "unanswerable": 80})
    """Chat tasks per kind (glm5.data.tasks generator names)."""
    num_prompts: int = 200
    """Prompts of the digits task."""
    reward: str = "math"
    """Reward name for glm5.rl.rewards.get_reward_fn ("digits" = the toy's exact first-digit match)."""
    steps: int = 40
    """Optimizer steps."""
    overlap: bool = False
    """Generate on a background thread while training (asynchronous); False = inline (synchronous)."""
    update_every: int = 1
    """Trainer steps between weight publications to the engine."""
    transport: str = "object_store"
    """Weight transport: object_store | disk."""
    buffer: dict[str, Any] = field(default_factory=dict)
    """BufferConfig fields: batch_size (B groups), max_staleness (eta), policy, max_concurrent, over_sample."""
    rollout: dict[str, Any] = field(default_factory=dict)
    """RolloutConfig fields: n_samples, max_new_tokens, temperature, partial_rollout, update_mode, ..."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """TrainerConfig fields: lr, micro_batch_size, grad_clip, loss (LossConfig fields)."""
    delay: dict[str, float] | None = None
    """Long-tail emulation: pareto_delay(alpha, scale, cap) seconds per token; None = off."""
    max_turns: int = 2
    """Tool calls answered per episode (tool task)."""
    sft_steps: int = 150
    """Supervised warm-start steps for a model built without --init (chat tasks)."""
    eval_prompts: int = 48
    """Held-out prompts scored greedily before and after training."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (0 = only at the end)."""
    seed: int = 0
    """Seed of the data order, sampling and model initialisation."""
    rollout_parallel: dict[str, int] = field(default_factory=dict)
    """The rollout engine's layout: `LLM` options tensor_parallel_size / expert_parallel_size /
    data_parallel_size (empty = one process; glm5.rl.rollout.make_rollout_engine)."""
    trainer_procs: int = 1
    """Trainer processes: 1 = the in-process RLTrainer; N > 1 = a trainer group holding the policy under FSDP2
    (+ expert parallel when the experts split evenly) in N processes (glm5.rl.trainer_group)."""

    def replace(self, **changes: Any) -> RLRecipe:
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def configs(self) -> tuple[Any, Any, Any]:
        """(BufferConfig, RolloutConfig, TrainerConfig); ValueError naming a bad field."""
        from glm5.rl.buffer import BufferConfig  # lazy: torch-free CLI start-up
        from glm5.rl.rollout import RolloutConfig  # lazy: torch-free CLI start-up
        from glm5.rl.trainer import TrainerConfig  # lazy: torch-free CLI start-up

        try:
            b = BufferConfig(**{"seed": self.seed, **self.buffer})
            r = RolloutConfig(**{"seed": self.seed, **self.rollout})
            t = TrainerConfig(**self.trainer)
            t.loss_config()
        except TypeError as exc:
            raise ValueError(f"recipe {self.name!r}: {exc}") from exc
        return b, r, t


_LOSS = dict(off_policy="decoupled", is_level="token", is_rule="truncate", is_threshold_high=2.0)
_MATH_ROLLOUT = dict(n_samples=6, max_new_tokens=24, temperature=1.0, filter_zero_variance=True)
_MATH_TRAINER = dict(lr=3e-4, micro_batch_size=24, loss=_LOSS)
_DIGITS_ROLLOUT = dict(n_samples=8, max_new_tokens=2, temperature=1.0)
_DIGITS_TRAINER = dict(lr=5e-3, micro_batch_size=64, loss=_LOSS)


def _recipes() -> dict[str, RLRecipe]:
    sync_buf = dict(batch_size=4, max_staleness=0, policy="drop_and_requeue", over_sample=0)
    async_buf = dict(batch_size=4, max_staleness=1, policy="pace", over_sample=0)
    math_sync = RLRecipe(
        "math-sync",
        buffer=sync_buf,
        rollout={**_MATH_ROLLOUT, "partial_rollout": False},
        trainer=_MATH_TRAINER,
    )
    math_async = math_sync.replace(
        name="math-async",
        overlap=True,
        buffer=async_buf,
        rollout={**_MATH_ROLLOUT, "update_mode": "abort", "partial_rollout": True},
    )
    return {
        "math-sync": math_sync,
        "math-async": math_async,
        "math-abstain": math_async.replace(name="math-abstain", reward="abstain"),
        "tool-use": math_async.replace(
            name="tool-use",
            task="tool",
            reward="tool",
            task_counts={"calculator": 120, "easy_arithmetic": 60},
            rollout={**_MATH_ROLLOUT, "max_new_tokens": 64, "partial_rollout": True},
        ),
        "digits-sync": RLRecipe(
            "digits-sync",
            task="digits",
            reward="digits",
            steps=30,
            buffer=dict(sync_buf, batch_size=8),
            rollout={**_DIGITS_ROLLOUT, "partial_rollout": False},
            trainer=_DIGITS_TRAINER,
        ),
        "digits-async": RLRecipe(
            "digits-async",
            task="digits",
            reward="digits",
            steps=30,
            overlap=True,
            buffer=dict(async_buf, batch_size=8),
            rollout=_DIGITS_ROLLOUT,
            trainer=_DIGITS_TRAINER,
        ),
    }


RECIPE_NAMES = ("math-sync", "math-async", "math-abstain", "tool-use", "digits-sync", "digits-async")


def recipe_preset(name: str) -> RLRecipe:
    recipes = _recipes()
    if name not in recipes:
        raise ValueError(f"unknown RL recipe {name!r}; choose one of {', '.join(recipes)}")
    return recipes[name]


# --- the toy task -------------------------------------------------------------------------------------------
class CharTokenizer:
    """16 symbols: digits 0-9, '+', '=', eos, pad, ' ', '?' (one id each), for the token-level toy task."""

    SYMBOLS = "0123456789+=\x00\x01 ?"
    EOS, PAD = 12, 13

    @property
    def vocab_size(self) -> int:
        return len(self.SYMBOLS)

    @property
    def eos_token_ids(self) -> list[int]:
        return [self.EOS]

    @property
    def pad_token_id(self) -> int:
        return self.PAD

    def encode(self, text: str) -> list[int]:
        return [self.SYMBOLS.index(ch) for ch in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.SYMBOLS[i] for i in ids if i not in (self.EOS, self.PAD))


def digits_prompts(count: int, seed: int, kind: str = "successor") -> list[dict[str, Any]]:
    """Toy prompts over the 16 symbols. "successor": "=a" -> str((a + 1) % 10) (the answer hangs on the last
    prompt token: a random tiny model learns it in seconds); "sum": "a+b=" -> str((a + b) % 10) (needs
    attention: slower)."""
    tok = CharTokenizer()
    if kind == "successor":
        items = [(f"={a}", (a + 1) % 10) for a in range(10)]
    else:
        items = [(f"{a}+{b}=", (a + b) % 10) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(items)
    return [
        {
            "tokens": tok.encode(items[i % len(items)][0]),
            "metadata": {"answer": str(items[i % len(items)][1]), "kind": "digits"},
        }
        for i in range(count)
    ]


def digits_reward(reply: str, metadata: dict[str, Any]) -> float:
    """1 when the reply starts with the right digit."""
    return 1.0 if reply[:1] == metadata["answer"] else 0.0


# --- chat tasks ---------------------------------------------------------------------------------------------
def task_prompts(tasks: list[Any], tokenizer: Any) -> list[dict[str, Any]]:
    from glm5.rl.rewards import task_metadata  # lazy: torch-free CLI start-up

    return [
        {
            "tokens": tokenizer.apply_chat_template(t.prompt_messages, t.tools, return_loss_mask=False),
            "metadata": task_metadata(t),
        }
        for t in tasks
    ]


# --- the policy ---------------------------------------------------------------------------------------------
def tiny_model(vocab_size: int, eos_ids: list[int], pad_id: int, seed: int) -> Any:
    import torch  # lazy: torch-free CLI start-up

    from glm5 import GLM5Config  # lazy: torch-free CLI start-up
    from glm5.model import GLM5ForCausalLM  # lazy: torch-free CLI start-up

    cfg = GLM5Config.from_preset("tiny").replace(
        vocab_size=vocab_size, eos_token_id=list(eos_ids), pad_token_id=pad_id, **SMALL_MODEL
    )
    torch.manual_seed(seed)
    return GLM5ForCausalLM(cfg)


def load_init(folder: str | Path) -> tuple[Any, Any]:
    """A `glm5 train` output folder (or its model/ subfolder): (model in float32, tokenizer)."""
    import torch  # lazy: torch-free CLI start-up

    from glm5.model import GLM5ForCausalLM  # lazy: torch-free CLI start-up
    from glm5.tokenizer import GLM5Tokenizer  # lazy: torch-free CLI start-up

    path = Path(folder)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"--init {folder}: expected a checkpoint folder written by `glm5 train` (config.json, "
            "*.safetensors and tokenizer.json, or their model/ subfolder)"
        )
    return GLM5ForCausalLM.from_pretrained(str(path), dtype=torch.float32), GLM5Tokenizer.from_pretrained(
        path
    )


def build_task(recipe: RLRecipe, init: str | None, log: Any = print) -> dict[str, Any]:
    """Model, tokenizer, prompts (train and held-out), reward, reply extraction and environment of a recipe."""
    from glm5.data.tasks import generate_tasks  # lazy: torch-free CLI start-up
    from glm5.rl.rewards import CalculatorEnvironment, get_reward_fn  # lazy: torch-free CLI start-up
    from glm5.rl.rollout import chat_reply, plain_reply  # lazy: torch-free CLI start-up

    if recipe.task == "digits":
        tok = CharTokenizer()
        if init is not None:
            raise ValueError("the digits toy task uses its own 16-symbol vocabulary; run it without --init")
        model = tiny_model(tok.vocab_size, tok.eos_token_ids, tok.pad_token_id, recipe.seed)
        log("digits task: a randomly initialised tiny model (16-symbol vocabulary)")
        return {
            "model": model,
            "tokenizer": tok,
            "prompts": digits_prompts(recipe.num_prompts, recipe.seed),
            "eval": digits_prompts(recipe.eval_prompts, recipe.seed + 1),
            "reward_fn": digits_reward,
            "reply_fn": plain_reply,
            "env": None,
        }
    if recipe.task not in ("math", "tool"):
        raise ValueError(f"recipe task must be math, tool or digits, got {recipe.task!r}")
    tasks = generate_tasks(recipe.task_counts, recipe.seed)
    held_out = generate_tasks(
        {
            k: max(1, v * recipe.eval_prompts // max(1, sum(recipe.task_counts.values())))
            for k, v in recipe.task_counts.items()
        },
        recipe.seed + 7919,
    )
    if init is not None:
        model, tok = load_init(init)
        log(f"policy: {init}")
    else:
        model, tok = quick_policy(tasks, recipe, log)
    env = CalculatorEnvironment(tok, recipe.max_turns) if recipe.task == "tool" else None
    reward = digits_reward if recipe.reward == "digits" else get_reward_fn(recipe.reward)
    return {
        "model": model,
        "tokenizer": tok,
        "prompts": task_prompts(tasks, tok),
        "eval": task_prompts(held_out, tok),
        "reward_fn": reward,
        "reply_fn": chat_reply,
        "env": env,
    }


def quick_policy(tasks: list[Any], recipe: RLRecipe, log: Any) -> tuple[Any, Any]:
    """No --init: a BPE tokenizer trained on the task texts, a tiny model, a supervised warm start."""
    from glm5.rl.trainer import sft_warm_start  # lazy: torch-free CLI start-up
    from glm5.tokenizer import GLM5Tokenizer  # lazy: torch-free CLI start-up
    from glm5.tokenizer.chat import render_chat  # lazy: torch-free CLI start-up

    texts = [render_chat(t.messages, t.tools, add_generation_prompt=False) for t in tasks] * 4
    tok = GLM5Tokenizer.train(iter(texts), vocab_size=384)  # an iterator: text, not file paths
    model = tiny_model(tok.vocab_size, tok.eos_token_ids, tok.pad_token_id, recipe.seed)
    log(
        f"no --init: built a tiny model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) and a "
        f"{tok.vocab_size}-id tokenizer; supervised warm start for {recipe.sft_steps} steps"
    )
    examples = [tok.apply_chat_template(t.messages, t.tools, add_generation_prompt=False) for t in tasks]
    sft_warm_start(model, examples, recipe.sft_steps, seed=recipe.seed)
    return model, tok
