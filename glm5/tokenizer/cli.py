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

from glm5.argtypes import output_path, positive_int, print_error
from glm5.tokenizer.chat import render_chat
from glm5.tokenizer.tokenizer import SPECIAL_TOKENS, GLM5Tokenizer, default_corpus_files, expand_corpus_paths

MAX_VOCAB_SIZE = 1 << 20
"""Largest --vocab-size: 2^20 ids is 5x GLM-5's 154,880. Ids the corpus cannot fill with merges are padded with
reserved tokens, each held in memory and in tokenizer.json, so a larger number only costs memory."""
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""256 byte symbols and the GLM special tokens."""


def _vocab_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
    if n < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_VOCAB_SIZE} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {n:,}"
        )
    if n > MAX_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_VOCAB_SIZE:,} (2^20; GLM-5 has 154,880): ids no merge fills are padded with "
            f"reserved tokens that only take memory, got {n:,}"
        )
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tokenizer train`` and ``chat-template`` to a parent parser's subparsers."""
    tok = subparsers.add_parser(
        "tokenizer",
        help="train a GLM-5 tokenizer (byte-level BPE + the GLM special tokens)",
        description="Tokenizer commands. `glm5 tokenizer train` trains a byte-level BPE with every GLM-5 special "
        "token as one id; `glm5 chat-template` prints the prompt a messages file renders to.",
    )
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
        type=_vocab_size,
        required=True,
        metavar="N",
        help=f"total vocabulary size, {len(SPECIAL_TOKENS)} special tokens included "
        f"({MIN_VOCAB_SIZE}-{MAX_VOCAB_SIZE:,})",
    )
    train.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        type=output_path,
        help="folder for tokenizer.json + tokenizer_config.json",
    )
    train.add_argument(
        "--min-frequency", type=positive_int, default=2, help="minimum pair count for a merge (default 2)"
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
    """``glm5 tokenizer train``: train, save, print a summary table (a bad corpus: one error line, exit code 2)."""
    console = Console(stderr=True)
    try:
        files = expand_corpus_paths(args.corpus) if args.corpus else default_corpus_files()
    except ValueError as exc:
        print_error(f"--corpus: {exc}")
        return 2
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        print_error(f"--corpus: the {len(files)} file(s) given hold no text (0 bytes); pass files with text")
        return 2
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

        tokenizer = GLM5Tokenizer.train(
            files, args.vocab_size, min_frequency=args.min_frequency, on_bytes=on_bytes
        )
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
    """``glm5 chat-template``: print the render of a messages file (bad input: one error line, exit code 2)."""
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
        print_error(str(exc))
        return 2
    sys.stdout.write(text + "\n")
    return 0
