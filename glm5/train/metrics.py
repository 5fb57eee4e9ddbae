"""What a training run shows and leaves behind: a live rich progress bar, metrics as JSON lines, PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def start(self, resume_step: int | None) -> MetricsLog:
        """A new run empties the file; a resumed one drops the lines of steps it will redo."""
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _step(line) < resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        return self

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except ValueError:
        return -1


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TrainProgress:
    """A rich progress bar: step, loss, tokens/s, expert balance, stage, elapsed and ETA (nothing when quiet)."""

    def __init__(self, total: int, done: int, quiet: bool, console: Console | None = None) -> None:
        self.console = console or Console()
        self.quiet = quiet
        columns = [
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        self.progress = Progress(*columns, console=self.console, disable=quiet)
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, record: dict[str, Any], total: int) -> None:
        info = (
            f"loss {record['loss']:.3f} lm {record['lm']:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"balance {record['expert_imbalance']:.2f}  {record['stage']}"
        )
        if record.get("skipped"):
            info = f"[red]step skipped: {record['skipped']}[/red]  " + info
        self.progress.update(self.task, completed=record["step"] + 1, total=total, info=info)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(records: list[dict[str, Any]], path: str | Path, baseline: float | None = None) -> None:
    """Total, LM (+ validation and the unigram baseline), MTP and indexer losses against the step."""
    import matplotlib  # lazy: optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if "val_lm" in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    panels = [
        ("loss", "total loss"),
        ("lm", "LM loss (next token)"),
        ("mtp", "MTP loss (token t+2)"),
        ("indexer", "indexer KL (attention || indexer)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(*_series(train, key), lw=1, label="train")
        if key == "lm" and val:
            ax.plot(*_series(val, "val_lm"), "o-", label="validation")
            if baseline is not None:
                ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.2f}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for start, name in _stage_starts(train):
        for ax in axes.flat:
            ax.axvline(start, color="k", alpha=0.15)
        top = axes.flat[0].get_ylim()[1]
        axes.flat[0].text(start, top, f" {name}", fontsize=7, va="top", rotation=90)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("glm5 pre-training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stage_starts(train: list[dict[str, Any]]) -> list[tuple[int, str]]:
    out, last = [], None
    for r in train:
        if r.get("stage") != last:
            out.append((r["step"], r.get("stage", "")))
            last = r.get("stage")
    return out


def plot_expert_load(
    records: list[dict[str, Any]],
    final_load: list[list[float]],
    path: str | Path,
    layer_names: list[str] | None = None,
) -> None:
    """Left: max/mean expert load per MoE layer over training (1 = perfectly balanced).
    Right: the share of tokens each expert received in the last step, per layer."""
    import matplotlib  # lazy: optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency

    train = [r for r in records if r.get("kind") == "train" and r.get("imbalance_per_layer")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        for i in range(len(train[0]["imbalance_per_layer"])):
            name = layer_names[i] if layer_names else f"MoE {i}"
            ax1.plot(
                [r["step"] for r in train], [r["imbalance_per_layer"][i] for r in train], lw=1, label=name
            )
    ax1.axhline(1.0, color="gray", ls="--")
    ax1.set(xlabel="step", ylabel="max load / mean load", title="expert load imbalance")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    if final_load:
        shares = [[x / max(sum(row), 1e-9) for x in row] for row in final_load]
        im = ax2.imshow(shares, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax2, label="share of routed tokens")
        if layer_names:
            ax2.set_yticks(range(len(layer_names)), layer_names)
    ax2.set(xlabel="expert", title="expert load, last step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
