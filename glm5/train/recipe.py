"""Training recipes: one dataclass with a docstring per field, named presets, and small TOML/JSON override files.

A recipe file holds only the fields it changes, e.g.::

    preset = "tiny"          # start from this named recipe
    steps = 400
    lr = 2e-3
    [data]
    chat_tasks = { arithmetic = 2000, unanswerable = 500 }
    [[stages]]
    name = "sparse"
    fraction = 1.0
    dsa = true
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from glm5.config import PRESETS, GLM5Config
from glm5.data.dataset import DataSpec

TRAINABLE = ("all", "indexer")


@dataclass
class Stage:
    """A phase of training (docs/model.md § Training stages): attention mode and which parameters learn."""

    name: str
    """Label in logs and plots."""
    fraction: float
    """Share of the run's steps (the fractions of a recipe sum to 1)."""
    dsa: bool
    """Sparse attention (the indexer's top-k selection) on; off = dense causal attention."""
    train: str = "all"
    """"all": every parameter learns (LM + MTP + aux losses; the indexer from its KL loss);
    "indexer": the main model is frozen and only the indexer learns (the DSA dense warm-up)."""

    def __post_init__(self) -> None:
        if self.train not in TRAINABLE:
            raise ValueError(f"stage {self.name!r}: train must be one of {TRAINABLE}, got {self.train!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"stage {self.name!r}: fraction must be in (0, 1], got {self.fraction}")


def _default_stages() -> list[Stage]:
    # GLM-5 pre-trains dense and adds DSA in mid-training: a short indexer warm-up with the main model
    # frozen, then sparse training of everything (the indexer KL is trained throughout).
    return [
        Stage("dense", 0.6, dsa=False),
        Stage("indexer-warmup", 0.05, dsa=False, train="indexer"),
        Stage("sparse", 0.35, dsa=True),
    ]


@dataclass
class TrainRecipe:
    """Everything that defines a pre-training run (model, data, losses, optimiser, schedule, numerics)."""

    model: str = "tiny"
    """GLM5Config preset of the model (its vocab_size is replaced by the tokenizer's)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """GLM5Config fields to change on top of the preset."""
    vocab_size: int = 8192
    """Size of the BPE tokenizer trained on the data (GLM special tokens included)."""
    data: DataSpec = field(default_factory=DataSpec)
    """Corpus, synthetic chat tasks and the validation split."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per optimiser step, over all micro-batches and processes (the global batch)."""
    grad_accum: int = 1
    """Micro-batches per step on each process (batch_size / world_size must divide by it)."""
    steps: int = 500
    """Optimiser steps (an upper bound when a time limit is set)."""
    time_limit_minutes: float | None = None
    """Wall-clock budget of the whole run; the step count is fitted to it after a few measured steps."""

    lr: float = 3e-3
    """Peak learning rate of the main model."""
    indexer_lr: float = 1e-3
    """Peak learning rate of the DSA indexers (DeepSeek-V3.2's warm-up used 1e-3)."""
    min_lr_ratio: float = 0.1
    """The cosine decays to this fraction of the peak."""
    warmup_steps: int = 20
    """Linear learning-rate warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (norms, biases and the router bias get none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    optimizer: str = "adamw"
    """"adamw", or "muon" (Muon for hidden matrices and experts, AdamW for the rest; single process only)."""
    grad_clip: float = 1.0
    """Max global gradient norm, applied to the main model and to the indexers separately (0 = off)."""

    mtp_depth: int = 1
    """MTP steps trained (one shared module applied recursively; GLM-5 uses 3)."""
    mtp_weight: float = 0.3
    """lambda of the MTP loss (the mean over depths; DeepSeek-V3: 0.3)."""
    indexer_weight: float = 1.0
    """Weight of the indexer KL loss (it reaches only the indexers, which are clipped on their own)."""
    bias_update_rate: float = 1e-3
    """gamma of aux-loss-free balancing: bias += gamma * sign(mean load - load) after each step."""
    seq_aux_weight: float = 1e-4
    """alpha of the sequence-wise balance loss (DeepSeek-V3); 0 = off."""
    stages: list[Stage] = field(default_factory=_default_stages)
    """Training phases in order (see Stage)."""

    dtype: str = "auto"
    """Compute dtype: "float32", "bfloat16" (autocast; weights and optimiser state stay fp32) or "auto": bfloat16 on
    accelerators that support it and on CPUs where a short probe finds bf16 matmuls faster (AVX512-BF16/AMX), else
    float32 (glm5.device.train_dtype; the GLM5_TRAIN_DTYPE variable overrides it)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (memory for time)."""
    seed: int = 0
    """Model initialisation seed."""

    log_every: int = 1
    """Steps between metric lines."""
    eval_every: int = 100
    """Steps between validation losses (0 = only at the end)."""
    eval_batches: int = 8
    """Validation batches (of batch_size windows) per evaluation."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    sample_tokens: int = 64
    """Most new tokens per sample generation at the end."""
    eval_tasks: dict[str, int] = field(
        default_factory=lambda: {"arithmetic": 12, "unanswerable": 12, "calculator": 6}
    )
    """Held-out chat tasks (an unseen seed) answered greedily at the end, for per-kind accuracy."""
    expert_parallel: int = 0
    """Expert-parallel degree in a multi-process run (0 = every process; must divide the process count)."""

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataSpec(**self.data)
        self.stages = [Stage(**s) if isinstance(s, dict) else s for s in self.stages]
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its fix."""
        if self.model not in PRESETS:
            raise ValueError(
                f"recipe model {self.model!r} is not a preset; choose one of {', '.join(PRESETS)}"
            )
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )
        if not self.stages or abs(sum(s.fraction for s in self.stages) - 1.0) > 1e-6:
            raise ValueError("recipe stages must be non-empty and their fractions must sum to 1")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"recipe optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"recipe dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.mtp_depth < 0 or self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ValueError("recipe mtp_depth must be >= 0 and time_limit_minutes > 0")

    def model_config(self) -> GLM5Config:
        """The model's GLM5Config (preset + overrides + the tokenizer's vocabulary size)."""
        cfg = GLM5Config.from_preset(self.model).replace(vocab_size=self.vocab_size, **self.model_overrides)
        if self.mtp_depth and not cfg.num_nextn_predict_layers:
            raise ValueError(
                f"recipe mtp_depth={self.mtp_depth} but model {self.model!r} has no MTP layer; "
                "set mtp_depth = 0 or model_overrides.num_nextn_predict_layers = 1"
            )
        return cfg

    def stage_index(self, step: int, total_steps: int) -> int:
        """Index of the stage that step `step` (0-based) of `total_steps` belongs to."""
        end = 0.0
        for i, stage in enumerate(self.stages):
            end += stage.fraction * total_steps
            if step < round(end):
                return i
        return len(self.stages) - 1

    def stage_at(self, step: int, total_steps: int) -> Stage:
        return self.stages[self.stage_index(step, total_steps)]

    def replace(self, **changes: Any) -> TrainRecipe:
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def preset(cls, name: str) -> TrainRecipe:
        """The named recipe this class starts from (a subclass names its own presets)."""
        return recipe_preset(name)

    DEFAULT_PRESET: ClassVar[str] = "tiny"
    KIND: ClassVar[str] = "recipe"  # as errors name it

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRecipe:
        """A recipe from a dict: `preset` (a named recipe) first, then the fields given."""
        d = dict(d)
        base = cls.preset(d.pop("preset", cls.DEFAULT_PRESET))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.KIND} fields {unknown}; known fields: {', '.join(sorted(names))}")
        if isinstance(d.get("data"), dict):
            d["data"] = type(base.data)(**{**asdict(base.data), **d["data"]})
        return cls(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}, **d})

    @classmethod
    def from_file(cls, path: str | Path, preset: str | None = None) -> TrainRecipe:
        """Read a .toml (Python 3.11+) or .json recipe file; its `preset` key (else `preset`, else the class's
        default preset) is the base."""
        d = read_recipe_file(path)
        d.setdefault("preset", preset or cls.DEFAULT_PRESET)
        return cls.from_dict(d)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no recipe file {str(path)!r}")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    try:
        import tomllib  # lazy: optional dependency
    except ImportError as exc:  # Python 3.10
        raise ValueError("TOML recipes need Python 3.11+; write the recipe as JSON instead") from exc
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _tiny() -> TrainRecipe:
    # ~10M-parameter GLM-5-shaped model on the CPython stdlib + chat tasks, a few hundred steps on 2 CPU
    # cores. DeepSeek-V3's bias rate (1e-3) assumes 100K+ steps; a short run balances only with a faster one.
    return TrainRecipe(bias_update_rate=1e-2)


def _smoke() -> TrainRecipe:
    # A seconds-long run for tests: a 2-layer model, a small slice of the corpus, few chat tasks.
    return TrainRecipe(
        model="tiny",
        model_overrides=dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            q_lora_rank=32,
            kv_lora_rank=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            qk_nope_head_dim=16,
            v_head_dim=16,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            index_n_heads=2,
            index_head_dim=16,
            index_topk=16,
        ),
        vocab_size=512,
        seq_len=64,
        batch_size=4,
        steps=12,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        checkpoint_every=0,
        sample_tokens=8,
        eval_tasks={"arithmetic": 1, "calculator": 1, "unanswerable": 1},
        data=DataSpec(
            max_corpus_bytes=400_000, chat_tasks={"arithmetic": 60, "calculator": 20, "unanswerable": 20}
        ),
    )


def _demo() -> TrainRecipe:
    # `make demo`'s pre-training: the tiny model with a 4K vocabulary, a 1 MB slice of the stdlib and a chat-heavy
    # task mix (single-digit sums the RL stage then trains on, abstentions, calculator calls), fitted to a time limit.
    return TrainRecipe(
        vocab_size=4096,
        bias_update_rate=1e-2,
        steps=2000,
        time_limit_minutes=4.5,
        eval_every=0,
        checkpoint_every=0,
        sample_tokens=48,
        eval_tasks={"easy_arithmetic": 8, "arithmetic": 4, "unanswerable": 8, "calculator": 4},
        data=DataSpec(
            max_corpus_bytes=1_000_000,
            chat_tasks={"easy_arithmetic": 3000, "arithmetic": 500, "calculator": 1500, "unanswerable": 2000},
        ),
    )


RECIPES = {"tiny": _tiny, "demo": _demo, "smoke": _smoke}
"""Named recipes (`glm5 train --preset NAME`)."""


def recipe_preset(name: str) -> TrainRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe preset {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
