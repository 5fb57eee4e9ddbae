"""CLI subcommand `glm5 train`; ``register(subparsers)`` adds it to the `glm5` parser.

    glm5 train --preset tiny --out runs/tiny [--config recipe.toml] [--steps N] [--time-limit MINUTES]
    torchrun --nproc_per_node 2 -m glm5.cli train --preset tiny --out runs/tiny2     # FSDP2 + expert parallel

An existing --out folder with a checkpoint is resumed (same recipe).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to a parent parser's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="pre-train a GLM-5-shaped model (LM + MTP + DSA indexer, MoE balancing)",
        description="Pre-train from scratch on the embedded corpus + synthetic chat tasks. The output folder ends "
        "with a loadable HF-layout checkpoint and its tokenizer in DIR/model, metrics.jsonl, loss.png, expert_load.png and "
        "summary.json. Run under torchrun for several processes (FSDP2 + expert parallel).",
    )
    # no choices=: importing the recipes pulls in torch, and every `glm5` command builds this parser
    p.add_argument("--preset", default="tiny", help="named recipe: tiny (default; ~10M params) or smoke (seconds)")
    p.add_argument("--config", metavar="RECIPE", help="a .toml/.json recipe file: fields to change")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps (an upper bound with --time-limit)")
    p.add_argument("--time-limit", type=float, metavar="MINUTES", help="wall-clock budget of the whole run")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (runs/NAME); resumed if it has a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def load_recipe(preset: str, config: str | None, steps: int | None, time_limit: float | None):  # noqa: ANN201
    """The recipe: --preset (or the file's `preset`), changed by the file, then by --steps / --time-limit."""
    from glm5.train.recipe import TrainRecipe, recipe_preset

    recipe = TrainRecipe.from_file(config, preset) if config else recipe_preset(preset)
    changes = {}
    if steps is not None:
        changes["steps"] = steps
    if time_limit is not None:
        changes["time_limit_minutes"] = time_limit
    return recipe.replace(**changes) if changes else recipe


def run_train(args: argparse.Namespace) -> int:
    """``glm5 train``: train, evaluate, export; prints a summary on rank 0."""
    from glm5.train.parallel import init_distributed, shutdown
    from glm5.train.pretrain import Trainer

    started = time.time()
    recipe = load_recipe(args.preset, args.config, args.steps, args.time_limit)
    ctx = init_distributed(recipe.expert_parallel or None)
    try:
        trainer = Trainer(recipe, args.out, ctx, quiet=args.quiet, started=started)
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
        ("steps", str(s["step"])),
        ("validation loss", f"{s['val_lm']:.3f} nats (perplexity {s['val_perplexity']:.1f})"),
        ("unigram baseline", f"{s['unigram_baseline']:.3f} nats ({gain:+.3f} learned from context)"),
        ("held-out chat accuracy", ", ".join(f"{k} {v:.0%}" for k, v in s["accuracy"].items())),
        ("skipped steps", str(len(s["skipped_steps"]))),
        ("wall time", f"{seconds / 60:.1f} min"),
        ("checkpoint (HF layout)", f"{out}/model (GLM5ForCausalLM.from_pretrained, GLM5Tokenizer.from_pretrained)"),
        ("metrics / plots", f"{out}/metrics.jsonl, loss.png, expert_load.png, summary.json"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for sample in s["code"][:2]:
        console.print(Text.assemble(("code ", "bold"), f"{sample['prompt']!r} -> {sample['completion']!r}"))
    for sample in s["chat"][:4]:
        mark = ("ok ", "green") if sample["correct"] else ("wrong ", "red")
        console.print(Text.assemble((f"{sample['kind']} ", "bold"), mark,
                                    f"{sample['prompt']!r} -> {sample['transcript'][:200]!r}"))  # fmt: skip
