"""The `glm5` command line: argparse subcommands that parse arguments and call library functions.

Each subcommand sets `func`, a callable taking the parsed arguments and returning an exit code. User errors
(`ValueError`, `OSError`) become one red line on stderr and exit code 2, without a traceback. Command groups of
other packages register themselves (`glm5.tokenizer.cli.register(subparsers)`).
"""

from __future__ import annotations

import argparse
import os
import sys

from glm5 import __version__
from glm5.config import PRESETS, GLM5Config

EXIT_USAGE = 2


def _error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"glm5: error: {message}", style="red"))


def _load_config(preset: str | None, path: str | None) -> tuple[GLM5Config, str]:
    """The config named on the command line and a label for it; ValueError naming the fix otherwise."""
    presets = ", ".join(PRESETS)
    if preset is None and path is None:
        raise ValueError(f"give --preset NAME ({presets}) or PATH (a config.json or a checkpoint folder)")
    if preset is not None:
        return GLM5Config.from_preset(preset), preset
    if not os.path.exists(path) and path in PRESETS:
        raise ValueError(f"no file or folder {path!r}; for the preset write: glm5 info --preset {path}")
    if not os.path.exists(path):
        raise ValueError(f"no file or folder {path!r}; pass a config.json or a checkpoint folder holding one")
    return GLM5Config.from_hf_config(path), path


def cmd_info(args: argparse.Namespace) -> int:
    """`glm5 info`: parameters by component, active parameters, weight memory and KV cache of a config."""
    from rich.console import Console

    from glm5.plan import format_table, parameter_table, summarize_config

    cfg, label = _load_config(args.preset, args.path)
    table = parameter_table(cfg)
    Console().print(format_table(table, title=f"{label}: {summarize_config(cfg)}"))
    return 0


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser(
        "info",
        help="parameters, active parameters, memory and KV cache per token",
        description="Count parameters (built on the meta device: no memory used), active parameters per "
        "token, BF16/FP8 weight memory and the KV cache of a preset or of a checkpoint's config.json.",
    )
    source = info.add_mutually_exclusive_group()
    source.add_argument("--preset", metavar="NAME", help=f"a named config: {', '.join(PRESETS)}")
    source.add_argument(
        "path", nargs="?", metavar="PATH", help="a config.json, or a checkpoint folder holding one"
    )
    info.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The `glm5` argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="glm5", description="GLM-5: model, checkpoints, planning and serving."
    )
    parser.add_argument("--version", action="version", version=f"glm5 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(subparsers)
    from glm5.tokenizer.cli import register as add_tokenizer_commands

    add_tokenizer_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `glm5 ...` with `argv` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error or the help text
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(func(args))
    except (ValueError, OSError) as e:
        _error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
