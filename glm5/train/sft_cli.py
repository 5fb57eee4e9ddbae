"""CLI subcommand `glm5 sft`; ``register(subparsers)`` adds it to the `glm5` parser (no torch at import).

    glm5 sft --init runs/tiny --data demo --out runs/sft          # a named SFT recipe
    glm5 sft --init runs/tiny --data sft.toml --out runs/sft      # a recipe file (fields of SFTRecipe)

An existing --out folder with a checkpoint is resumed (same recipe).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from glm5.argtypes import existing_dir, output_path, positive_float, positive_int, text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sft`` to a parent parser's subparsers."""
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning of a `glm5 train` checkpoint on GLM chat tasks (assistant-only loss)",
        description="Fine-tune a pre-trained run on the synthetic GLM-format chat tasks (arithmetic with short "
        "thinking, calculator tool calls and their observations, abstention on unanswerable questions) plus a "
        "share of its pre-training text; the loss is on assistant tokens only. Writes the same artefacts as "
        "`glm5 train` (metrics.jsonl, loss.png, checkpoints, DIR/model in the HF layout, summary.json with "
        "held-out accuracy, abstention and hallucination rates per difficulty).",
    )
    p.add_argument(
        "--init", required=True, metavar="RUN", type=existing_dir, help="a `glm5 train` output folder"
    )
    p.add_argument(
        "--data",
        default="demo",
        metavar="RECIPE",
        type=text,
        help="SFT recipe: demo (default), smoke, or a .toml/.json file of SFTRecipe fields",
    )
    p.add_argument(
        "--steps", type=positive_int, metavar="N", help="optimiser steps (a bound with --time-limit)"
    )
    p.add_argument(
        "--time-limit", type=positive_float, metavar="MINUTES", help="wall-clock budget of the run"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        type=output_path,
        help="output folder; resumed if it has a checkpoint",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    from rich.console import Console  # lazy: torch-free CLI start-up

    from glm5.train.cli import print_summary  # lazy: torch-free CLI start-up
    from glm5.train.sft import SFTTrainer, init_folders, load_sft_recipe  # lazy: torch-free CLI start-up

    started = time.time()
    recipe = load_sft_recipe(args.data, args.steps, args.time_limit)
    init_folders(args.init)  # a bad --init fails before the output folder is made
    out = Path(args.out)
    new_folder = not out.exists()
    try:
        trainer = SFTTrainer(recipe, out, init=args.init, quiet=args.quiet, started=started)
    except BaseException:
        if new_folder:
            shutil.rmtree(out, ignore_errors=True)
        raise
    summary = trainer.run()
    console = Console()
    print_summary(console, summary, out, time.time() - started)
    held = summary.get("heldout")
    if held:
        pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        console.print(
            f"held-out frontier items: accuracy {pct(held['accuracy'])}, abstention {pct(held['abstention_rate'])}, "
            f"hallucination {pct(held['hallucination_rate'])}, tool calls valid {pct(held['tool_call_valid'])}"
        )
    return 0
