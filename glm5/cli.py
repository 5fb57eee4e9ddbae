"""The `glm5` command line: argparse subcommands that parse arguments and call library functions.

Each subcommand sets `func`, a callable taking the parsed arguments and returning an exit code. Every user error
is one `glm5: error: ...` line on stderr and exit code 2, without a traceback: a bad flag value (the `type=`
validators of `glm5.argtypes` reject it while parsing, before anything loads or is written), an argparse usage
error, and a `ValueError` / `OSError` a command raises (its message names the flag, file or tensor and the fix).
Command groups of other packages register themselves (`glm5.tokenizer.cli.register(subparsers)`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from glm5 import __version__
from glm5.argtypes import (
    existing_file,
    float_range,
    fraction,
    nonnegative_float,
    output_path,
    positive_int,
    print_error,
    text,
)
from glm5.config import PRESETS, GLM5Config

EXIT_USAGE = 2
COMMAND_GROUPS = (
    "glm5.tokenizer.cli",
    "glm5.train.cli",
    "glm5.train.sft_cli",
    "glm5.engine.cli",
    "glm5.eval.cli",
    "glm5.serve.cli",
    "glm5.rl.cli",
)
"""Modules with a `register(subparsers)` adding their subcommands; each must import without torch."""


_error = print_error


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `glm5: error: ...` line pointing at --help (subparsers inherit it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _error(f"{message} (see: {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


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
    from rich.console import Console  # lazy: torch-free CLI start-up

    from glm5.plan import format_table, parameter_table, summarize_config  # lazy: torch-free CLI start-up

    cfg, label = _load_config(args.preset, args.path)
    table = parameter_table(cfg)
    console = Console()
    console.print(format_table(table, title=f"{label}: {summarize_config(cfg)}"))
    if args.path is not None and _has_weights(args.path):
        from glm5.checkpoint.convert import summarize_checkpoint  # lazy: torch-free CLI start-up

        console.print()
        console.print(_checkpoint_table(summarize_checkpoint(args.path), table))
    return 0


def _has_weights(path: str) -> bool:
    from glm5.checkpoint.files import INDEX_FILE, SINGLE_FILE  # lazy: torch-free CLI start-up

    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in (INDEX_FILE, SINGLE_FILE)
    )


def _checkpoint_table(summary, params):
    """What the files hold: tensors and bytes of e4m3 weights, their scales and the unquantised tensors."""
    from rich.table import Table  # lazy: torch-free CLI start-up

    from glm5.checkpoint.convert import ROLES  # lazy: torch-free CLI start-up
    from glm5.plan import human_bytes  # lazy: torch-free CLI start-up

    out = Table(
        title=f"{summary.path}: {summary.num_files} safetensors file(s)",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    for column, justify in (
        ("stored as", "left"),
        ("tensors", "right"),
        ("bytes", "right"),
        ("", "right"),
        ("share", "right"),
    ):
        out.add_column(column, justify=justify, no_wrap=True)
    total = summary.total_bytes or 1
    roles = [r for r in ROLES if r in summary.counts] + sorted(set(summary.counts) - set(ROLES))
    for role in roles:
        n = summary.nbytes[role]
        out.add_row(role, f"{summary.counts[role]:,}", f"{n:,} B", human_bytes(n), f"{100 * n / total:.1f}%")
    out.add_section()
    out.add_row(
        "total",
        f"{summary.total_tensors:,}",
        f"{summary.total_bytes:,} B",
        human_bytes(summary.total_bytes),
        "",
    )
    quantized = "FP8 e4m3 weights" in summary.counts
    predicted = params.fp8_bytes(include_mtp=True) if quantized else params.bf16_bytes(include_mtp=True)
    out.add_row(
        f"predicted from config ({'FP8' if quantized else 'BF16'} layout)",
        "",
        f"{predicted:,} B",
        human_bytes(predicted),
        "",
    )
    if summary.index_total_size is not None:
        out.add_row("index metadata.total_size", "", f"{summary.index_total_size:,} B", "", "")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    """`glm5 convert SRC DST --to fp8|bf16`: stream a checkpoint into the other format, with a progress bar."""

    from rich.console import Console  # lazy: torch-free CLI start-up
    from rich.progress import (  # lazy: torch-free CLI start-up
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from glm5.checkpoint.convert import (  # lazy: torch-free CLI start-up
        convert_checkpoint,
        summarize_checkpoint,
    )

    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tensors]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    start = time.perf_counter()
    bar = Progress(*columns, console=console)
    state = {"tensors": 0, "total": 0, "task": None}

    def on_start(num_tensors: int, num_bytes: int) -> None:  # the source checked out: show the bar
        state["total"] = num_tensors
        state["task"] = bar.add_task(f"to {args.to}", total=num_bytes, tensors="", rate="")
        bar.start()

    def progress(tensors: int, nbytes: int) -> None:
        state["tensors"] += tensors
        rate = state["tensors"] / max(time.perf_counter() - start, 1e-9)
        bar.update(
            state["task"],
            advance=nbytes,
            tensors=f"{state['tensors']:,}/{state['total']:,} tensors",
            rate=f"{rate:,.0f} tensors/s",
        )

    try:
        convert_checkpoint(
            args.src,
            args.dst,
            args.to,
            max_shard_size=args.max_shard_size,
            progress=progress,
            on_start=on_start,
        )
    finally:
        bar.stop()
    before, after = summarize_checkpoint(args.src), summarize_checkpoint(args.dst)
    seconds = time.perf_counter() - start
    Console().print(
        f"wrote {args.dst}: {after.total_tensors:,} tensors, {after.total_bytes:,} B "
        f"({after.total_bytes / max(before.total_bytes, 1):.3f}x the source's {before.total_bytes:,} B) "
        f"in {seconds:.1f} s"
    )
    return 0


def _shard_size(value: str) -> str:
    """--max-shard-size: a positive size like 5GB (checked while parsing; the checkpoint code reads it again)."""
    from glm5.checkpoint.files import parse_size  # lazy: torch-free CLI start-up (imports torch)

    try:
        parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("max_shard_size", "the size")) from None
    return value


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between BF16 and block FP8",
        description="Stream a checkpoint folder into the published BF16 (zai-org/GLM-5) or block-FP8 "
        "(zai-org/GLM-5-FP8) layout, tensor by tensor. Other files (tokenizer, ...) are copied.",
    )
    convert.add_argument("src", metavar="SRC", type=text, help="checkpoint folder to read")
    convert.add_argument(
        "dst",
        metavar="DST",
        type=output_path,
        help="folder to write (written beside it, then renamed into place: a failure leaves nothing)",
    )
    convert.add_argument("--to", required=True, choices=("fp8", "bf16"), help="target format")
    convert.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        type=_shard_size,
        help="shard size limit, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    convert.set_defaults(func=cmd_convert)


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
        "path",
        nargs="?",
        metavar="PATH",
        help="a config.json, or a checkpoint folder (with weights: also what its files hold and what is quantised)",
    )
    info.set_defaults(func=cmd_info)


def cmd_plan(args: argparse.Namespace) -> int:
    """`glm5 plan`: devices, layout, memory per device, decode/prefill rooflines and cost of a deployment."""

    from rich.console import Console  # lazy: torch-free CLI start-up

    from glm5.hardware import HARDWARE, get_hardware, load_hardware_file  # lazy: torch-free CLI start-up
    from glm5.plan import PlanSettings, format_plan, plan  # lazy: torch-free CLI start-up

    if args.list_hardware:
        for hw in HARDWARE.values():
            Console(highlight=False).print(
                f"{hw.name:16} {hw.memory_gb:g} GB, {hw.bandwidth_tbs:g} TB/s, "
                f"{hw.bf16_tflops:g}/{hw.fp8_tflops:g} TFLOP/s bf16/8-bit, "
                f"{hw.interconnect_gbs:g} GB/s x {hw.scale_up}: {hw.source}"
            )
        return 0
    cfg, label = _load_config(args.preset or (None if args.path else "glm-5"), args.path)
    hw = load_hardware_file(args.hardware_file) if args.hardware_file else get_hardware(args.hardware)
    mtp_steps = args.mtp_steps if args.mtp_accept is not None else 0
    settings = PlanSettings(
        dtype=args.dtype,
        context=args.context,
        concurrency=args.concurrency,
        devices=args.devices,
        attn_tp=args.attn_tp,
        kv_dtype=args.kv_dtype,
        mtp_steps=mtp_steps,
        mtp_accept=args.mtp_accept if args.mtp_accept is not None else 1.0,
        bandwidth_efficiency=args.bandwidth_efficiency,
        mfu=args.mfu,
        margin=args.margin,
        price_per_hour=args.price_per_hour,
    )
    result = plan(cfg, hw, settings, preset=label)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    table = format_plan(result)
    console = Console()
    if (
        not console.is_terminal
    ):  # piped or redirected: no screen width to respect, so never wrap or cut a cell
        caption, table.caption = table.caption, None  # the caption is prose: it may wrap to the table's width
        natural = Console(width=10_000).measure(table).maximum
        table.caption = caption
        console = Console(width=max(console.width, natural))
    console.print(table)
    from glm5.plan import launch_commands  # lazy: torch-free CLI start-up

    folder = None if args.path is None else args.path.removesuffix("config.json").rstrip("/") or "."
    print("\n" + "\n".join(launch_commands(result, folder or "/path/to/checkpoint")))  # never wrapped
    return 0


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    # Defaults of glm5.plan (not imported here: it pulls in torch, and building the parser must stay light).
    DEFAULT_BANDWIDTH_EFFICIENCY, DEFAULT_MFU, DEFAULT_MARGIN = 0.6, 0.4, 0.1  # noqa: N806
    p = subparsers.add_parser(
        "plan",
        help="devices, layout, memory, decode/prefill speed and cost on a hardware catalog",
        description="Plan a deployment: memory per device (weights, MLA latent and indexer caches, activation "
        "margin), the minimum devices and a suggested TP/EP layout, decode tokens/s per user (bandwidth "
        "roofline) and prefill throughput (compute roofline), cost per million tokens, and what the reported "
        "GLM-5 serving speeds imply against this roofline.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", metavar="NAME", help=f"a named config: {', '.join(PRESETS)} (default glm-5)"
    )
    source.add_argument("path", nargs="?", metavar="PATH", help="a config.json or a checkpoint folder")
    p.add_argument(
        "--hardware",
        default="h200",
        metavar="NAME",
        help="h100, h200, b200, ascend-910b, ascend-910c, cloudmatrix-384 (default h200)",
    )
    p.add_argument(
        "--hardware-file",
        metavar="FILE",
        type=existing_file,
        help="a JSON file describing your own device (overrides --hardware)",
    )
    p.add_argument("--list-hardware", action="store_true", help="print the hardware catalog and exit")
    p.add_argument("--dtype", choices=("bf16", "fp8"), default="fp8", help="stored weights (default fp8)")
    p.add_argument(
        "--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="MLA latent cache (default bf16)"
    )
    p.add_argument(
        "--context", type=positive_int, default=200_000, help="tokens per sequence (default 200000)"
    )
    p.add_argument(
        "--concurrency", type=positive_int, default=32, help="sequences decoded at once (default 32)"
    )
    p.add_argument(
        "--devices",
        type=positive_int,
        help="use this many devices (default: the smallest power of two that fits)",
    )
    p.add_argument(
        "--attn-tp", type=positive_int, help="attention tensor parallelism (default: least memory)"
    )
    p.add_argument(
        "--mtp-accept",
        type=float_range(1.0, name="acceptance"),
        metavar="L",
        help="enable MTP speculative decoding with this acceptance length (tokens per step, e.g. 3.5)",
    )
    p.add_argument(
        "--mtp-steps",
        type=positive_int,
        default=3,
        help="MTP draft tokens per step with --mtp-accept (default 3)",
    )
    p.add_argument(
        "--bandwidth-efficiency",
        type=fraction,
        default=DEFAULT_BANDWIDTH_EFFICIENCY,
        help=f"share of peak HBM bandwidth decode reaches (default {DEFAULT_BANDWIDTH_EFFICIENCY})",
    )
    p.add_argument("--mfu", type=fraction, default=DEFAULT_MFU, help=f"prefill MFU (default {DEFAULT_MFU})")
    p.add_argument(
        "--margin",
        type=float_range(0.0, 1.0, high_open=True, name="margin"),
        default=DEFAULT_MARGIN,
        help=f"share of device memory kept for activations etc. (default {DEFAULT_MARGIN})",
    )
    p.add_argument(
        "--price-per-hour",
        type=nonnegative_float,
        metavar="X",
        help="price of one device-hour, for cost per 1M tokens",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    """The `glm5` argument parser with every available subcommand."""
    parser = _Parser(prog="glm5", description="GLM-5: model, checkpoints, planning and serving.")
    parser.add_argument("--version", action="version", version=f"glm5 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(subparsers)
    _add_plan(subparsers)
    _add_convert(subparsers)
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(subparsers)
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
