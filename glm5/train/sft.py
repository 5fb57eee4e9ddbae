"""Supervised fine-tuning (SFT): the post-training stage between pre-training and RL.

    glm5 sft --init runs/pretrain --data demo --out runs/sft           # a preset, or a .toml/.json recipe file
    from glm5.train.sft import SFTTrainer, sft_preset
    SFTTrainer(sft_preset("demo"), "runs/sft", init="runs/pretrain").run()

It starts from a `glm5 train` output folder (its HF export and tokenizer) and trains on chat data in the GLM-5
format, with the loss only on what the assistant generates (its thinking, content, tool calls and the stop
token; the user turns, the system block and the tool observations carry none): the frontier tasks of
glm5.data.frontier (arithmetic with short thinking, calculator calls with valid expressions and their
observations, the answer after the tool result, abstention on unanswerable questions), mixed with a small
share of the pre-training text to limit forgetting.

SFTTrainer is the pre-training Trainer with another data source, initial weights and one stage: the same
training step (losses, numerics, autocast), progress bar, metrics.jsonl, loss.png, resumable checkpoints and
HF export. Each conversation sits whole inside one training window (windows are filled with padding that
carries no loss), so no answer is trained without its question. The validation split is held-out frontier
items (never trained on); the end of the run scores held-out items (accuracy, abstention, hallucination per
difficulty, tool-call validity: glm5.eval.frontier) into summary.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from glm5.data.frontier import KINDS, frontier_tasks
from glm5.data.packing import PackedSequences
from glm5.data.tasks import generate_tasks
from glm5.data.tokens import TokenFile
from glm5.eval.frontier import evaluate_frontier
from glm5.model import GLM5ForCausalLM
from glm5.tokenizer import GLM5Tokenizer
from glm5.train.cli import check_recipe_values
from glm5.train.parallel import parallelize
from glm5.train.pretrain import Trainer
from glm5.train.recipe import Stage, TrainRecipe, read_recipe_file

SFT_FORMAT = 1


def _default_tasks() -> dict[str, int]:
    # a tool episode fills most of a 384-token window (the tool list in the system block), a sum a fifteenth of
    # one: these counts give tool episodes about two thirds of the windows, easy sums about a fifth (600 tool
    # episodes, 45% of the windows, were too few for the demo's model to learn to copy the operands)
    return {"frontier_easy": 4000, "frontier_hard": 1200, "frontier_unanswerable": 800, "frontier_tool": 1000}


@dataclass
class SFTRecipe(TrainRecipe):
    """A TrainRecipe (optimiser, schedule, numerics, checkpoints) plus the SFT data. The model, vocabulary and
    tokenizer come from --init; `model`, `model_overrides` and `vocab_size` are not used."""

    tasks: dict[str, int] = field(default_factory=_default_tasks)
    """Chat tasks per kind (glm5.data.tasks.TASK_GENERATORS; the frontier_* kinds give training items only)."""
    text_share: float = 0.1
    """Share of the training tokens that are pre-training text (windows of the --init run's train split)."""
    val_tasks: int = 16
    """Held-out frontier items per kind in the validation split (their loss is the validation loss)."""
    heldout_eval: int = 40
    """Held-out frontier items per difficulty scored at the end (0 = skip)."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.text_share < 1.0:
            raise ValueError(f"SFT text_share must be in [0, 1), got {self.text_share}")
        if not self.tasks or sum(self.tasks.values()) < 1 or min(self.tasks.values()) < 0:
            raise ValueError(f"SFT tasks must give at least one task and no negative count, got {self.tasks}")
        if self.val_tasks < 1 or self.heldout_eval < 0:
            raise ValueError("SFT val_tasks must be >= 1 and heldout_eval >= 0")

    DEFAULT_PRESET: ClassVar[str] = "demo"
    KIND: ClassVar[str] = "SFT recipe"

    @classmethod
    def preset(cls, name: str) -> SFTRecipe:
        return sft_preset(name)


def _sft_demo() -> SFTRecipe:
    # `make demo`'s SFT: a short constant-ish schedule on the frontier tasks + 10% pre-training text. The window
    # must hold a whole tool episode (about 345 tokens, 270 of them the template's tool block): with 256-token
    # windows the episodes were cut, the reply trained without its prompt and at other positions than it is
    # generated at, and no tool call came out well-formed (0% valid held-out; 100% with 384, same steps).
    # Steps, not a time budget (6.0 min on a quiet 2-core machine, one thread): RL keeps what SFT taught only
    # where the SFT policy knows it; under a time budget a busy machine gave SFT 768 steps, an SFT policy right
    # on 42% of the easy sums, and every abstention reward then taught it to decline them (RL accuracy 82-85% of
    # SFT's instead of 97-104%). A loaded machine now takes longer instead of producing a weaker model.
    return SFTRecipe(
        steps=1250,
        time_limit_minutes=None,
        lr=1e-2,  # vs 3e-3: held-out chat loss 0.649 vs 0.674 nats at the same 2.5 min (537 vs 513 steps)
        warmup_steps=10,
        min_lr_ratio=0.05,  # the schedule ends near 0 (it ended at 0.3x), as a run of fixed length usually does
        batch_size=6,
        seq_len=384,
        stages=[Stage("sft", 1.0, dsa=True)],
        eval_every=0,
        checkpoint_every=0,
        eval_tasks={},
        sample_tokens=32,
        bias_update_rate=1e-2,
    )


def _sft_smoke() -> SFTRecipe:
    # seconds: a few steps on a few tasks (tests and `python -m glm5.demo --smoke`)
    return _sft_demo().replace(
        steps=6,
        time_limit_minutes=None,
        warmup_steps=1,
        seq_len=64,
        batch_size=4,
        eval_batches=2,
        sample_tokens=8,
        tasks={"frontier_easy": 30, "frontier_hard": 10, "frontier_unanswerable": 10, "frontier_tool": 10},
        val_tasks=2,
        heldout_eval=2,
    )


SFT_RECIPES = {"demo": _sft_demo, "smoke": _sft_smoke}
"""Named SFT recipes (`glm5 sft --data NAME`)."""


def sft_preset(name: str) -> SFTRecipe:
    if name not in SFT_RECIPES:
        raise ValueError(
            f"unknown SFT recipe {name!r}; choose one of {', '.join(SFT_RECIPES)} or pass a .toml/.json file"
        )
    return SFT_RECIPES[name]()


def load_sft_recipe(data: str, steps: int | None = None, time_limit: float | None = None) -> SFTRecipe:
    """--data: a preset name or a recipe file (its `preset` key picks the base); --steps / --time-limit last."""
    if data in SFT_RECIPES:
        recipe = sft_preset(data)
    elif Path(data).suffix in (".toml", ".json"):
        values = read_recipe_file(data)
        check_recipe_values(values, SFTRecipe, data)
        try:
            recipe = SFTRecipe.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{data}: {e}") from None
    else:
        raise ValueError(
            f"--data {data!r}: not an SFT preset ({', '.join(SFT_RECIPES)}) nor a .toml/.json recipe file"
        )
    changes: dict[str, Any] = {}
    if steps is not None:
        changes["steps"] = steps
    if time_limit is not None:
        changes["time_limit_minutes"] = time_limit
    return recipe.replace(**changes) if changes else recipe


def init_folders(init: str | Path) -> tuple[Path, Path | None]:
    """(model folder, pre-training data folder or None) of an --init run folder (or its model/ subfolder)."""
    path = Path(init)
    model = path / "model" if (path / "model" / "config.json").is_file() else path
    if not (model / "config.json").is_file() or not (model / "tokenizer.json").is_file():
        raise ValueError(
            f"--init {init}: expected a `glm5 train` (or `glm5 sft`) output folder with model/config.json and "
            "model/tokenizer.json (or that model/ folder itself)"
        )
    data = model.parent / "data"
    return model, data if (data / "train.json").is_file() else None


# --- data --------------------------------------------------------------------------------------------------
def pack_whole(
    documents: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (ids, mask) documents into windows of `seq_len` tokens so that no document crosses a window
    boundary (the rest of a window is `pad_id` with mask 0); a document longer than a window is cut into
    window-sized pieces. Returns flat (ids, mask) of a whole number of windows."""
    ids_out: list[np.ndarray] = []
    mask_out: list[np.ndarray] = []
    used = 0

    def pad(n: int) -> None:
        ids_out.append(np.full(n, pad_id, np.int64))
        mask_out.append(np.zeros(n, np.uint8))

    for ids, mask in documents:
        for lo in range(0, len(ids), seq_len):
            piece_ids, piece_mask = ids[lo : lo + seq_len], mask[lo : lo + seq_len]
            if used + len(piece_ids) > seq_len:
                pad(seq_len - used)
                used = 0
            ids_out.append(np.asarray(piece_ids, np.int64))
            mask_out.append(np.asarray(piece_mask, np.uint8))
            used = (used + len(piece_ids)) % seq_len
    if used:
        pad(seq_len - used)
    if not ids_out:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(ids_out), np.concatenate(mask_out)


def chat_documents(tok: Any, tasks: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) of each conversation: the chat template's mask (1 only on what the assistant writes)."""
    docs = []
    for task in tasks:
        ids, mask = tok.apply_chat_template(task.messages, task.tools, add_generation_prompt=False)
        docs.append((np.asarray(ids, np.int64), np.asarray(mask, np.uint8)))
    return docs


def text_documents(
    pretrain_data: Path, num_tokens: int, seq_len: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """About `num_tokens` of pre-training text: whole windows of the --init run's train split, seeded picks."""
    train = TokenFile(pretrain_data, "train")
    windows = max(0, (len(train) - 1) // seq_len)
    want = min(windows, -(-num_tokens // seq_len)) if num_tokens > 0 else 0
    picks = np.random.default_rng(seed).choice(windows, size=want, replace=False) if want else []
    return [
        (
            np.asarray(train.ids[i * seq_len : (i + 1) * seq_len], np.int64),
            np.asarray(train.mask[i * seq_len : (i + 1) * seq_len], np.uint8),
        )
        for i in sorted(int(i) for i in picks)
    ]


def build_sft_data(folder: Path, tok: Any, recipe: SFTRecipe, pretrain_data: Path | None) -> tuple[Any, Any]:
    """Tokenise the SFT mixture into `folder`/{train,val}.* (skipped when files of the same recipe data,
    tokenizer and pre-training text exist). Train: the chat tasks (training items) and `text_share` of
    pre-training text, in a seeded order; val: held-out frontier items."""
    if recipe.text_share > 0 and pretrain_data is None:
        raise ValueError(
            f"the SFT recipe mixes in {recipe.text_share:.0%} pre-training text but --init has no data/ folder "
            "(its token files); pass the `glm5 train` run folder, or set text_share = 0"
        )
    h = hashlib.sha256()
    spec = {k: getattr(recipe, k) for k in ("tasks", "text_share", "val_tasks", "seq_len")}
    h.update(json.dumps({"format": SFT_FORMAT, "seed": recipe.data.seed, **spec}, sort_keys=True).encode())
    h.update(tok.backend.to_str().encode())
    if pretrain_data is not None and recipe.text_share > 0:
        h.update((pretrain_data / "train.json").read_bytes()[:4096])
    fingerprint = h.hexdigest()[:16]
    try:
        train, val = TokenFile(folder, "train"), TokenFile(folder, "val")
        if train.meta.get("fingerprint") == fingerprint == val.meta.get("fingerprint"):
            return train, val
    except ValueError:
        pass
    seed = recipe.data.seed
    chats = chat_documents(tok, generate_tasks(recipe.tasks, seed))
    chat_tokens = sum(len(i) for i, _ in chats)
    cut = sum(len(i) > recipe.seq_len for i, _ in chats)
    if cut:
        print(
            f"SFT: {cut} of {len(chats)} conversations are longer than seq_len {recipe.seq_len} and are cut into "
            "pieces (their replies train without their prompts); raise seq_len"
        )
    text_tokens = int(chat_tokens * recipe.text_share / (1 - recipe.text_share)) if recipe.text_share else 0
    texts = text_documents(pretrain_data, text_tokens, recipe.seq_len, seed) if text_tokens else []
    docs = chats + texts
    order = np.random.default_rng(seed).permutation(len(docs))
    ids, mask = pack_whole([docs[i] for i in order], recipe.seq_len, tok.pad_token_id)
    held = [t for kind in KINDS for t in frontier_tasks(kind, recipe.val_tasks, seed, "heldout")]
    val_ids, val_mask = pack_whole(chat_documents(tok, held), recipe.seq_len, tok.pad_token_id)
    info = {
        "fingerprint": fingerprint,
        "sft": {
            "chats": len(chats),
            "cut_chats": cut,
            "text_windows": len(texts),
            "chat_tokens": chat_tokens,
            **spec,
        },
    }
    # one extra pad token closes the last window (a window reads seq_len + 1 tokens)
    pad = (np.array([tok.pad_token_id]), np.zeros(1, np.uint8))
    val = TokenFile.write(folder, "val", [(val_ids, val_mask), pad], tok.vocab_size, info)
    train = TokenFile.write(folder, "train", [(ids, mask), pad], tok.vocab_size, info)
    return train, val


# --- the trainer -------------------------------------------------------------------------------------------
class SFTTrainer(Trainer):
    """The pre-training Trainer on SFT data, starting from --init's weights (see the module docstring)."""

    def __init__(self, recipe: SFTRecipe, out: str | Path, init: str | Path, **kw: Any) -> None:
        if not isinstance(recipe, SFTRecipe):
            raise ValueError("SFTTrainer needs an SFTRecipe (glm5.train.sft.sft_preset or load_sft_recipe)")
        self.init_model, self.init_data = init_folders(init)
        self.init = str(init)
        ctx = kw.get("ctx")
        folder = Path(out) / "tokenizer"
        if (ctx is None or ctx.rank == 0) and not (folder / "tokenizer.json").is_file():
            GLM5Tokenizer.from_pretrained(self.init_model).save_pretrained(
                folder
            )  # --init's, never retrained
        super().__init__(recipe, out, **kw)

    def _tokenizer(self) -> Any:

        self._barrier()
        return GLM5Tokenizer.from_pretrained(self.out / "tokenizer")

    def _data(self) -> tuple[Any, Any, Any]:

        if self.rank == 0:
            build_sft_data(self.out / "data", self.tok, self.recipe, self.init_data)
        self._barrier()
        train, val = build_sft_data(self.out / "data", self.tok, self.recipe, self.init_data)
        seq = self.recipe.seq_len
        return PackedSequences(train, seq), PackedSequences(val, seq), train

    def _model(self) -> Any:

        model = GLM5ForCausalLM.from_pretrained(str(self.init_model), dtype=torch.float32)
        if model.config.vocab_size != self.tok.vocab_size:
            raise ValueError(
                f"--init {self.init}: the model has {model.config.vocab_size} ids but its tokenizer "
                f"{self.tok.vocab_size}"
            )
        if self.recipe.mtp_depth and not model.config.num_nextn_predict_layers:
            raise ValueError(f"--init {self.init} has no MTP layer; set mtp_depth = 0 in the SFT recipe")
        return parallelize(model.to(self.device), self.ctx, self.recipe.activation_checkpointing).train()

    def trainer_state(self) -> dict[str, Any]:
        return {**super().trainer_state(), "init": self.init}

    def finish(self) -> dict[str, Any]:
        summary = super().finish()
        if self.rank == 0 and self.recipe.heldout_eval > 0:
            with self.phase(f"scoring {self.recipe.heldout_eval} held-out frontier items per difficulty"):
                summary["heldout"] = evaluate_frontier(
                    self.out / "model", self.recipe.heldout_eval, self.out / "eval-heldout"
                )
            summary["init"] = self.init
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary
