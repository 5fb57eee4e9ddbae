"""Reports of an `EvalResult`: results.json, a Markdown report, PNG bar charts, and a before/after comparison."""

from __future__ import annotations

from pathlib import Path

from glm5.eval.runner import EvalResult

METRICS = (
    ("accuracy", "accuracy_ci"),
    ("abstention_rate", "abstention_ci"),
    ("hallucination_rate", "hallucination_ci"),
)
LABELS = {"accuracy": "accuracy", "abstention_rate": "abstention", "hallucination_rate": "hallucination"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _with_ci(m: dict, key: str, ci_key: str) -> str:
    ci = m.get(ci_key)
    if m.get(key) is None:
        return "—"
    return _pct(m[key]) + (f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else "")


def markdown_report(result: EvalResult) -> str:
    """The report: settings, a metrics table (Wilson 95% intervals in brackets), perplexity, a few samples."""
    s = result.settings
    ks = [str(k) for k in s.get("ks", [1])]
    lines = [
        f"# Evaluation of {result.backend}",
        "",
        f"{s['num']} questions per task, {s['samples']} sample(s) each, seed {s['seed']}, temperature "
        f"{s['temperature']}, max_tokens {s['max_tokens']}, thinking {'on' if s['thinking'] else 'off'}; "
        f"{result.elapsed_s:.1f} s.",
        "",
        "Hallucination rate = wrong / (wrong + abstentions) over the replies that are not correct.",
        "",
        "| task | questions | accuracy | abstention | hallucination | "
        + " | ".join(f"pass@{k}" for k in ks)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(ks),
    ]
    for task, m in result.metrics.items():
        passes = [_pct(m["pass_at_k"].get(k)) if k in m["pass_at_k"] else "—" for k in ks]
        name = f"**{task}**" if task == "overall" else task
        lines.append(
            f"| {name} | {m['questions']} | "
            + " | ".join(_with_ci(m, k, c) for k, c in METRICS)
            + " | "
            + " | ".join(passes)
            + " |"
        )
    if result.perplexity:
        p = result.perplexity
        lines += [
            "",
            f"Held-out perplexity: **{p['perplexity']:.2f}** (loss {p['loss']:.4f} nats over {p['tokens']:,} "
            f"tokens; {p['source']}, {p['windows']} windows of {p['seq_len']}).",
        ]
    for note in result.notes:
        lines += ["", f"Note: {note}"]
    lines += ["", "## Samples", ""]
    shown: dict[str, int] = {}
    for r in result.records:
        if shown.get(r["task"], 0) >= 3:
            continue
        shown[r["task"]] = shown.get(r["task"], 0) + 1
        sample = r["samples"][0]
        mark = "correct" if sample["correct"] else ("abstained" if sample["abstained"] else "wrong")
        reply = sample["reply"].replace("\n", " ")[:200] or "(empty)"
        lines.append(
            f"- [{r['task']}] {r['prompt'][:120]} — expected `{r['expected']}`, got `{reply}` ({mark}, "
            f"{len(sample['turns'])} turn(s))"
        )
    return "\n".join(lines) + "\n"


def _bars(
    ax, groups: list[str], series: list[tuple[str, list[float], list[tuple[float, float] | None]]]
) -> None:  # noqa: ANN001
    width = 0.8 / len(series)
    for i, (label, values, cis) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        err = [
            [max(v - ci[0], 0) if ci else 0 for v, ci in zip(values, cis)],
            [max(ci[1] - v, 0) if ci else 0 for v, ci in zip(values, cis)],
        ]
        ax.bar(xs, values, width, label=label, yerr=err, capsize=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)


def plot_metrics(result: EvalResult, path: str | Path) -> Path:
    """Bar chart: accuracy, abstention and hallucination rate per task, with Wilson 95% error bars."""
    import matplotlib  # lazy: optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency

    tasks = list(result.metrics)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 3.6))
    series = [
        (LABELS[k], [result.metrics[t][k] or 0.0 for t in tasks], [result.metrics[t][c] for t in tasks])
        for k, c in METRICS
    ]
    _bars(ax, tasks, series)
    ax.set_title(f"{result.backend}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """DIR/results.json, DIR/report.md and DIR/metrics.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": result.save(out / "results.json"), "report": out / "report.md"}
    paths["report"].write_text(markdown_report(result))
    if result.metrics:
        paths["plot"] = plot_metrics(result, out / "metrics.png")
    return paths


def _load(x: EvalResult | str | Path) -> EvalResult:
    if isinstance(x, EvalResult):
        return x
    path = Path(x)
    return EvalResult.load(path / "results.json" if path.is_dir() else path)


def compare(
    before: EvalResult | str | Path,
    after: EvalResult | str | Path,
    out_dir: str | Path | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> str:
    """A before/after Markdown table (per task and metric, with the change in points); with out_dir, also
    DIR/comparison.md and DIR/comparison.png. Arguments: results, results.json paths or eval folders."""
    a, b = _load(before), _load(after)
    tasks = [t for t in a.metrics if t in b.metrics]
    lines = [f"| task | metric | {labels[0]} | {labels[1]} | change |", "|---|---|---:|---:|---:|"]
    for t in tasks:
        for key, _ in METRICS:
            x, y = a.metrics[t][key], b.metrics[t][key]
            delta = "—" if x is None or y is None else f"{100 * (y - x):+.1f} pt"
            lines.append(f"| {t} | {LABELS[key]} | {_pct(x)} | {_pct(y)} | {delta} |")
    if a.perplexity and b.perplexity:
        x, y = a.perplexity["perplexity"], b.perplexity["perplexity"]
        lines.append(f"| held-out | perplexity | {x:.2f} | {y:.2f} | {y - x:+.2f} |")
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        import matplotlib  # lazy: optional dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: optional dependency

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(text)
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
        for ax, (key, ci) in zip(axes, METRICS):
            series = [
                (label, [r.metrics[t][key] or 0.0 for t in tasks], [r.metrics[t][ci] for t in tasks])
                for label, r in zip(labels, (a, b))
            ]
            _bars(ax, tasks, series)
            ax.set_title(LABELS[key])
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=110)
        plt.close(fig)
    return text
