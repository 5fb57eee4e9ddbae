"""`glm5 eval`: score a local checkpoint or an OpenAI-compatible endpoint on the eval tasks, with a progress bar;
writes DIR/results.json, DIR/report.md and DIR/metrics.png. Imports nothing heavy until it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm5.argtypes import existing_dir, int_range, nonnegative_float, output_path, positive_int, text

TASKS = (
    "arithmetic",
    "easy_arithmetic",
    "unanswerable",
    "tool_use",
    "word_problem",
    "frontier_easy",
    "frontier_hard",
    "frontier_unanswerable",
    "frontier_tool",
    "perplexity",
)
"""Every task name (glm5.eval.tasks.ALL_TASKS, spelled out: importing it here would slow every `glm5` command)."""


def _k_list(value: str) -> list[int]:
    """--k: comma-separated integers >= 1."""
    try:
        ks = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1 such as 1,5, got {value!r}")
    return ks


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console  # lazy: torch-free CLI start-up
    from rich.progress import (  # lazy: torch-free CLI start-up
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table  # lazy: torch-free CLI start-up

    from glm5.eval.backends import (  # lazy: torch-free CLI start-up
        GenerationOptions,
        LocalBackend,
        OpenAIBackend,
    )
    from glm5.eval.report import write_report  # lazy: torch-free CLI start-up
    from glm5.eval.runner import evaluate  # lazy: torch-free CLI start-up
    from glm5.eval.tasks import PERPLEXITY, QA_TASKS, parse_task_list  # lazy: torch-free CLI start-up

    tasks = parse_task_list(args.tasks)
    if args.model:
        backend = LocalBackend(args.model)
    else:
        backend = OpenAIBackend(
            args.base_url, args.api_key, args.served_model, max_concurrency=args.concurrency
        )
    data = args.data
    if data is None and args.model and PERPLEXITY in tasks:
        guess = Path(args.model).parent / "data"  # the pre-training run's token folder next to its export
        data = str(guess) if (guess / "val.json").is_file() else None
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    options = GenerationOptions(
        max_tokens=args.max_tokens, temperature=temperature, seed=args.seed, thinking=not args.no_thinking
    )
    ks = args.k
    console = Console(stderr=True)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("questions"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        ids = {t: bar.add_task(t, total=args.num if t in QA_TASKS else 1) for t in tasks}

        def progress(task: str, done: int, total: int) -> None:
            bar.update(ids[task], completed=done, total=total)

        result = evaluate(
            backend,
            tasks,
            num=args.num,
            seed=args.seed,
            samples=args.samples,
            ks=ks,
            options=options,
            perplexity_source=data,
            seq_len=args.seq_len,
            num_windows=args.windows,
            progress=progress,
        )
    paths = write_report(result, args.out)
    table = Table(title=f"{result.backend}: {result.elapsed_s:.1f} s", title_justify="left", show_edge=False)
    for col in (
        "task",
        "questions",
        "accuracy",
        "abstention",
        "hallucination",
        *[f"pass@{k}" for k in result.settings["ks"]],
    ):
        table.add_column(col, justify="left" if col == "task" else "right")
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for task, m in result.metrics.items():
        table.add_row(
            task,
            str(m["questions"]),
            pct(m["accuracy"]),
            pct(m["abstention_rate"]),
            pct(m["hallucination_rate"]),
            *[pct(m["pass_at_k"].get(str(k))) for k in result.settings["ks"]],
        )
    out = Console()
    out.print(table)
    if result.perplexity:
        out.print(
            f"held-out perplexity {result.perplexity['perplexity']:.2f} ({result.perplexity['source']})"
        )
    for note in result.notes:
        out.print(f"note: {note}")
    out.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a checkpoint or an OpenAI-compatible endpoint: accuracy, abstention, hallucination, pass@k, "
        "perplexity",
        description="Evaluate on synthetic arithmetic, unanswerable and calculator tool-use questions (multi-turn: "
        "the calculator runs locally) and held-out perplexity (local models only). Writes DIR/results.json, "
        "DIR/report.md and DIR/metrics.png.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        metavar="PATH",
        type=existing_dir,
        help="a checkpoint folder (config.json, safetensors, tokenizer.json)",
    )
    source.add_argument(
        "--base-url",
        metavar="URL",
        type=text,
        help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1",
    )
    p.add_argument("--api-key", metavar="K", help="API key for --base-url (default $OPENAI_API_KEY)")
    p.add_argument(
        "--served-model", metavar="NAME", help="model name at the endpoint (default: the first listed)"
    )
    p.add_argument(
        "--tasks",
        default="arithmetic,unanswerable,tool_use,perplexity",
        type=text,
        help=f"comma-separated, from: {', '.join(TASKS)} (default arithmetic,unanswerable,tool_use,"
        "perplexity)",
    )
    p.add_argument("--num", type=positive_int, default=20, help="questions per task (default 20)")
    p.add_argument(
        "--seed",
        type=int_range(0, name="seed"),
        default=12_345,
        help="question and sampling seed (default 12345)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=1, help="samples per question, for pass@k (default 1)"
    )
    p.add_argument("--k", metavar="K1,K2", type=_k_list, help="pass@k values (default: 1 and --samples)")
    p.add_argument(
        "--temperature", type=nonnegative_float, help="default 0 (greedy) with one sample, 1.0 with more"
    )
    p.add_argument("--max-tokens", type=positive_int, default=256, help="tokens per model turn (default 256)")
    p.add_argument("--no-thinking", action="store_true", help="ask for replies without a thinking block")
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="parallel requests to an endpoint (default 8)"
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        type=text,
        help="perplexity data: a token folder with val.json, or a text file "
        "(default: MODEL/../data when it exists)",
    )
    p.add_argument("--seq-len", type=positive_int, default=256, help="perplexity window length (default 256)")
    p.add_argument("--windows", type=positive_int, default=32, help="perplexity windows (default 32)")
    p.add_argument(
        "--out",
        default="eval-results",
        metavar="DIR",
        type=output_path,
        help="output folder (default eval-results)",
    )
    p.set_defaults(func=cmd_eval)
