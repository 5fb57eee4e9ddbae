"""CLI subcommand `glm5 train`; ``register(subparsers)`` adds it to the `glm5` parser.

    glm5 train --preset tiny --out runs/tiny [--config recipe.toml] [--steps N] [--time-limit MINUTES]
               [--dtype auto|bf16|fp32]
    torchrun --nproc_per_node 2 -m glm5.cli train --preset tiny --out runs/tiny2     # FSDP2 + expert parallel

An existing --out folder with a checkpoint is resumed (same recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from glm5.argtypes import output_path, positive_float, positive_int, text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to a parent parser's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="pre-train a GLM-5-shaped model (LM + MTP + DSA indexer, MoE balancing)",
        description="Pre-train from scratch on the embedded corpus + synthetic chat tasks. The output folder ends "
        "with a loadable HF-layout checkpoint and its tokenizer in DIR/model, metrics.jsonl, loss.png, "
        "expert_load.png and "
        "summary.json. Run under torchrun for several processes (FSDP2 + expert parallel).",
    )
    # no choices=: importing the recipes pulls in torch, and every `glm5` command builds this parser
    p.add_argument(
        "--preset",
        default="tiny",
        type=text,
        help="named recipe: tiny (default; ~10M params) or smoke (seconds)",
    )
    p.add_argument(
        "--config", metavar="RECIPE", type=text, help="a .toml/.json recipe file: fields to change"
    )
    p.add_argument(
        "--steps", type=positive_int, metavar="N", help="optimiser steps (an upper bound with --time-limit)"
    )
    p.add_argument(
        "--time-limit", type=positive_float, metavar="MINUTES", help="wall-clock budget of the whole run"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        type=output_path,
        help="output folder (runs/NAME); resumed if it has a checkpoint",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        help="compute dtype (default: the recipe's, auto = bf16 autocast where a probe finds it faster, else fp32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


DTYPE_NAMES = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}
"""`--dtype` value -> the recipe's `dtype`."""


def load_recipe(  # noqa: ANN201
    preset: str, config: str | None, steps: int | None, time_limit: float | None, dtype: str | None = None
):
    """The recipe: --preset (or the file's `preset`), changed by the file, then by --steps / --time-limit /
    --dtype."""
    from glm5.train.recipe import (  # lazy: torch-free CLI start-up
        TrainRecipe,
        read_recipe_file,
        recipe_preset,
    )

    if config:
        values = read_recipe_file(config)
        # a wrong type would surface as a TypeError deep inside
        check_recipe_values(values, TrainRecipe, config)
        try:
            recipe = TrainRecipe.from_dict({"preset": preset, **values})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config}: {e}") from None
    else:
        recipe = recipe_preset(preset)
    changes = {}
    if steps is not None:
        changes["steps"] = steps
    if time_limit is not None:
        changes["time_limit_minutes"] = time_limit
    if dtype is not None:
        changes["dtype"] = DTYPE_NAMES[dtype]
    recipe = recipe.replace(**changes) if changes else recipe
    try:
        recipe.model_config()  # the model overrides and mtp_depth, checked before the run folder is made
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config or f'recipe {preset}'}: {e}") from None
    return recipe


# --- recipe file values: type and range of every field a file sets, checked before anything is written -----------
RANGES: dict[str, tuple[str, float]] = {
    "lr": (">", 0),
    "indexer_lr": (">", 0),
    "min_lr_ratio": ("[0,1]", 0),
    "warmup_steps": (">=", 0),
    "weight_decay": (">=", 0),
    "grad_clip": (">=", 0),
    "mtp_depth": (">=", 0),
    "mtp_weight": (">=", 0),
    "indexer_weight": (">=", 0),
    "bias_update_rate": (">=", 0),
    "seq_aux_weight": (">=", 0),
    "log_every": (">=", 1),
    "eval_every": (">=", 0),
    "eval_batches": (">=", 1),
    "checkpoint_every": (">=", 0),
    "keep_checkpoints": (">=", 1),
    "sample_tokens": (">=", 1),
    "expert_parallel": (">=", 0),
    "time_limit_minutes": (">", 0),
    "seq_len": (">=", 1),
    "batch_size": (">=", 1),
    "grad_accum": (">=", 1),
    "steps": (">=", 1),
    "vocab_size": (">=", 1),
    "betas": ("[0,1)", 0),
    "eval_tasks": (">=", 0),
    "max_corpus_bytes": (">=", 1),
    "chat_tasks": (">=", 0),
    "fraction": ("(0,1]", 0),
}
"""Allowed values per field name (recipe, data and stage fields); lists and tables apply it to each entry."""


def check_recipe_values(values: dict[str, Any], cls: type, source: str, prefix: str = "") -> None:
    """ValueError naming `source`, the field, the rule and the value for the first field of `values` (a recipe
    file's table for dataclass `cls`) that is unknown, of the wrong type or out of range."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        name = prefix + key
        if key == "preset" and not prefix:
            continue
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ValueError(f"{source}: unknown field {name!r}; {cls.__name__} fields: {known}")
        hint = hints[key]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, dict):
            check_recipe_values(value, nested, source, f"{name}.")
            continue
        if nested is not None and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                check_recipe_values(item, nested, source, f"{name}[{i}].")
            continue
        if not _fits(value, hint):
            raise ValueError(f"{source}: {name} must be {_describe(hint)}, got {value!r}")
        rule = RANGES.get(key)
        if rule is not None and value is not None:
            entries = (
                value.values()
                if isinstance(value, dict)
                else value
                if isinstance(value, (list, tuple))
                else [value]
            )
            for entry in entries:
                if not _in_range(entry, rule[0], rule[1]):
                    op, bound = rule
                    want = f"in {op}" if op.startswith(("[", "(")) else f"{op} {bound:g}"
                    raise ValueError(f"{source}: {name} must be {want}, got {value!r}")


def _in_range(value: float, op: str, bound: float) -> bool:
    return {
        ">": value > bound,
        ">=": value >= bound,
        "[0,1]": 0 <= value <= 1,
        "[0,1)": 0 <= value < 1,
        "(0,1]": 0 < value <= 1,
    }[op]


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (DataSpec; Stage for a list of stages), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return (
            isinstance(value, list) and all(_fits(v, args[0]) for v in value)
            if args
            else isinstance(value, list)
        )
    if origin is tuple:
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and len(value) == len(items) and all(map(_fits, value, items))
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items()
        )
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        type(None): "left out",
    }
    if hint in names:
        return names[hint]
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} " + " and ".join(
            _describe(a).removeprefix("an ").removeprefix("a ") + "s" for a in dict.fromkeys(args)
        )
    if origin is dict:
        return f"a table of {_describe(args[1]).removeprefix('an ').removeprefix('a ')}s"
    return getattr(hint, "__name__", str(hint))


def run_train(args: argparse.Namespace) -> int:
    """``glm5 train``: train, evaluate, export; prints a summary on rank 0."""
    from glm5.train.parallel import init_distributed, shutdown  # lazy: torch-free CLI start-up
    from glm5.train.pretrain import Trainer  # lazy: torch-free CLI start-up

    started = time.time()
    recipe = load_recipe(args.preset, args.config, args.steps, args.time_limit, getattr(args, "dtype", None))
    out = Path(args.out)
    new_folder = not out.exists()
    ctx = init_distributed(recipe.expert_parallel or None)
    try:
        try:
            trainer = Trainer(recipe, out, ctx, quiet=args.quiet, started=started)
        except BaseException:
            if new_folder and (
                ctx is None or ctx.is_main
            ):  # a set-up that failed leaves no half-made run folder
                shutil.rmtree(out, ignore_errors=True)
            raise
        summary = trainer.run()
    finally:
        shutdown(ctx)
    if ctx is None or ctx.is_main:
        print_summary(Console(), summary, Path(args.out), time.time() - started)
    return 0


def print_summary(console: Console, s: dict, out: Path, seconds: float) -> None:
    table = Table(title="glm5 train", show_header=False)
    gain = s["unigram_baseline"] - s["val_lm"]
    rows = [
        ("steps", str(s["step"]) + (f" ({s['dtype']})" if "dtype" in s else "")),
        ("validation loss", f"{s['val_lm']:.3f} nats (perplexity {s['val_perplexity']:.1f})"),
        ("unigram baseline", f"{s['unigram_baseline']:.3f} nats ({gain:+.3f} learned from context)"),
        ("held-out chat accuracy", ", ".join(f"{k} {v:.0%}" for k, v in s["accuracy"].items())),
        ("skipped steps", str(len(s["skipped_steps"]))),
        ("wall time", f"{seconds / 60:.1f} min"),
        (
            "checkpoint (HF layout)",
            f"{out}/model (GLM5ForCausalLM.from_pretrained, GLM5Tokenizer.from_pretrained)",
        ),
        ("metrics / plots", f"{out}/metrics.jsonl, loss.png, expert_load.png, summary.json"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for sample in s["code"][:2]:
        console.print(Text.assemble(("code ", "bold"), f"{sample['prompt']!r} -> {sample['completion']!r}"))
    for sample in s["chat"][:4]:
        mark = ("ok ", "green") if sample["correct"] else ("wrong ", "red")
        console.print(
            Text.assemble(
                (f"{sample['kind']} ", "bold"),
                mark,
                f"{sample['prompt']!r} -> {sample['transcript'][:200]!r}",
            )
        )
