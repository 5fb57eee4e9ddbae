"""CLI subcommands `glm5 tokenizer train` and `glm5 chat-template`; ``register(subparsers)`` adds them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from glm5.tokenizer.chat import render_chat
from glm5.tokenizer.tokenizer import SPECIAL_TOKENS, GLM5Tokenizer, default_corpus_files, expand_corpus_paths


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tokenizer train`` and ``chat-template`` to a parent parser's subparsers."""
    tok = subparsers.add_parser("tokenizer", help="train or inspect a GLM-5 tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE with every GLM-5 special token as one id",
        description="Train a byte-level BPE offline; the GLM special tokens follow the BPE vocabulary.",
    )
    train.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="text files or folders (default: the CPython stdlib .py files)",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help=f"total vocabulary size, {len(SPECIAL_TOKENS)} special tokens included",
    )
    train.add_argument(
        "--out", required=True, metavar="DIR", help="folder for tokenizer.json + tokenizer_config.json"
    )
    train.add_argument(
        "--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)"
    )
    train.set_defaults(func=run_train)

    chat = subparsers.add_parser(
        "chat-template",
        help="print the exact GLM-5 prompt for a messages file",
        description="Render OpenAI-style messages (a JSON list, or an object with 'messages' and "
        "optional 'tools') in the GLM-5 chat format, for debugging prompts.",
    )
    chat.add_argument("--messages", required=True, metavar="FILE.json", help="JSON list of messages")
    chat.add_argument("--tools", metavar="FILE.json", help="JSON list of OpenAI tools")
    chat.add_argument("--no-thinking", action="store_true", help="generation prompt <|assistant|></think>")
    chat.add_argument(
        "--keep-thinking",
        action="store_true",
        help="clear_thinking=False: keep the reasoning of earlier turns",
    )
    chat.add_argument("--no-generation-prompt", action="store_true", help="do not append <|assistant|>...")
    chat.set_defaults(func=run_chat_template)


def run_train(args: argparse.Namespace) -> int:
    """``glm5 tokenizer train``: train, save, print a summary table."""
    console = Console(stderr=True)
    try:
        files = expand_corpus_paths(args.corpus) if args.corpus else default_corpus_files()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    total = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"reading {len(files)} files", total=total)

        def on_bytes(n: int) -> None:
            progress.advance(task, n)
            if progress.tasks[task].completed >= total:
                progress.update(task, description="computing merges")

        try:
            tokenizer = GLM5Tokenizer.train(
                files, args.vocab_size, min_frequency=args.min_frequency, on_bytes=on_bytes
            )
        except ValueError as exc:
            console.print(f"[red]error:[/red] {exc}")
            return 2
        progress.update(task, description="done")
    out = tokenizer.save_pretrained(args.out)
    seconds = time.perf_counter() - start
    _summary(console, tokenizer, out, len(files), total, seconds)
    return 0


def _summary(
    console: Console, tok: GLM5Tokenizer, out: Path, num_files: int, num_bytes: int, secs: float
) -> None:
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    table = Table(title="glm5 tokenizer train", show_header=False)
    rows = [
        ("output", str(out)),
        ("corpus", f"{num_files} files, {num_bytes / 1e6:.2f} MB"),
        ("vocab size", f"{tok.vocab_size} ({first} BPE + {len(SPECIAL_TOKENS)} special)"),
        ("special ids", f"{first}..{tok.vocab_size - 1} ({SPECIAL_TOKENS[0]} first)"),
        ("eos ids", str(tok.eos_token_ids)),
        ("time", f"{secs:.2f} s ({num_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _load_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read {what} file {path!r}: {exc}") from exc


def run_chat_template(args: argparse.Namespace) -> int:
    """``glm5 chat-template``: print the render of a messages file."""
    try:
        data = _load_json(args.messages, "messages")
        tools = data.get("tools") if isinstance(data, dict) else None
        messages = data.get("messages") if isinstance(data, dict) else data
        if args.tools:
            tools = _load_json(args.tools, "tools")
        text = render_chat(
            messages,
            tools,
            enable_thinking=not args.no_thinking,
            clear_thinking=not args.keep_thinking,
            add_generation_prompt=not args.no_generation_prompt,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text + "\n")
    return 0
