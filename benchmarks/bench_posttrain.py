"""Post-training ablation: which RL reward keeps what the SFT model knows while cutting hallucination.

One SFT policy (pre-train -> SFT, `make demo`'s recipes) is trained with RL from the same weights under each
reward variant of glm5.rl.posttrain (binary, abstain, abstain+kl, generous, bold+kl) and 3 seeds, then scored greedily
on held-out frontier items (glm5.eval.frontier: easy one-digit sums, hard three-digit sums, unanswerable
questions, calculator tool use; never trained on). The table gives, per variant, the mean and the range over
seeds of overall accuracy, abstention and hallucination rate (wrong / (wrong + abstained)), abstention on
unanswerable and hard items, easy-item accuracy, tool-call validity and tool-use accuracy, and how many seeds
meet the demo's targets (hallucination -50% relative to SFT, accuracy >= 90% of SFT's, abstention on
unanswerable >= 80%).

    python benchmarks/bench_posttrain.py --init runs/demo/sft          # the SFT run of `make demo`
    python benchmarks/bench_posttrain.py                               # pre-trains and fine-tunes first
    python benchmarks/bench_posttrain.py --quick                       # toy sizes: a smoke run

Writes benchmarks/results/bench_posttrain.{json,md}. Runs are interleaved (seed-major) so that a change in the
machine's load spreads over every variant.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_results  # noqa: E402  benchmarks/common.py

COLUMNS = (
    ("accuracy", "accuracy"),
    ("abstention", "abstention_rate"),
    ("hallucination", "hallucination_rate"),
    ("unanswerable abstained", ("unanswerable", "abstention_rate")),
    ("hard abstained", ("hard", "abstention_rate")),
    ("easy right", ("easy", "accuracy")),
    ("tool call valid", "tool_call_valid"),
    ("tool right", ("tool", "accuracy")),
)


def value(numbers: dict[str, Any], key: Any) -> float | None:
    if isinstance(key, tuple):
        return numbers["per_difficulty"].get(key[0], {}).get(key[1])
    return numbers.get(key)


def prepare(work: Path, quick: bool) -> Path:
    """Pre-train and fine-tune with the demo's recipes (smoke recipes with --quick); returns the SFT folder."""
    from glm5.demo import pretrain, sft

    if not (work / "pretrain" / "model" / "config.json").is_file():
        pretrain(work / "pretrain", quick)
    if not (work / "sft" / "model" / "config.json").is_file():
        sft(work / "pretrain", work / "sft", quick)
    return work / "sft"


def meets(sft: dict[str, Any], rl: dict[str, Any]) -> bool:
    from glm5.demo import target_checks

    return all(t["met"] for t in target_checks(sft, rl)[:3])  # the RL targets (tool validity is SFT's)


def fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    return f"{100 * mean:.0f}% ({100 * min(vals):.0f}-{100 * max(vals):.0f})"


def table(results: dict[str, Any]) -> str:
    head = "| variant | " + " | ".join(c for c, _ in COLUMNS) + " | seeds meeting targets |"
    lines = [head, "|---|" + "---|" * (len(COLUMNS) + 1)]
    sft = results["sft"]
    lines.append("| SFT (start) | " + " | ".join(fmt([value(sft, k)]) for _, k in COLUMNS) + " | - |")
    for name, runs in results["variants"].items():
        cells = [fmt([value(r["heldout"], k) for r in runs]) for _, k in COLUMNS]
        met = sum(meets(sft, r["heldout"]) for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {met}/{len(runs)} |")
    s = results["settings"]
    notes = [
        "",
        f"Held-out items: {s['eval_items']} per difficulty; RL: {s['steps']} updates per run, seeds {s['seeds']}; "
        "cells: mean over seeds (min-max). Hallucination = wrong / (wrong + abstained).",
        f"Machine: {s['machine']}; wall time {results['wall_s'] / 60:.1f} min (the cores were shared with other "
        "jobs; the runs are interleaved seed-major).",
        "",
    ]
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--init", type=Path, help="an SFT run folder (default: pre-train and fine-tune first)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench-posttrain"), help="scratch folder")
    parser.add_argument("--variants", default="binary,abstain,abstain+kl,generous,bold+kl")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="RL updates per run (default: the demo's)")
    parser.add_argument("--eval-items", type=int, default=40, help="held-out items per difficulty")
    parser.add_argument("--quick", action="store_true", help="toy sizes, one seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's default, 1)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from glm5.demo import RL_STEPS
    from glm5.eval.frontier import evaluate_frontier
    from glm5.rl.cli import run_rl
    from glm5.rl.posttrain import VARIANTS, posttrain_recipe

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = args.steps or (2 if args.quick else RL_STEPS)
    items = 3 if args.quick else args.eval_items
    t0 = time.time()
    init = args.init or prepare(args.work, args.quick)
    model = init / "model" if (init / "model" / "config.json").is_file() else init
    sft = evaluate_frontier(model, items)
    results: dict[str, Any] = {
        "settings": {
            "init": str(init),
            "steps": steps,
            "seeds": seeds,
            "eval_items": items,
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        },
        "sft": sft,
        "variants": {v: [] for v in variants},
    }
    for seed in seeds:
        for variant in variants:
            recipe = posttrain_recipe(variant, steps=steps, seed=seed)
            if args.quick:
                recipe = recipe.replace(task_counts={k: 6 for k in recipe.task_counts})
            out = args.work / f"rl-{variant}-seed{seed}"
            start = time.time()
            summary = run_rl(recipe, out, init=str(model), quiet=True)
            heldout = evaluate_frontier(out / "model", items)
            run = {
                "seed": seed,
                "wall_s": time.time() - start,
                "buffer": summary["buffer"],
                "heldout": heldout,
            }
            results["variants"][variant].append(run)
            print(
                f"{variant} seed {seed}: accuracy {heldout['accuracy']:.2f} abstention "
                f"{heldout['abstention_rate']:.2f} hallucination {heldout['hallucination_rate']} "
                f"({run['wall_s']:.0f} s)",
                flush=True,
            )
    results["wall_s"] = time.time() - t0
    save_results(RESULTS, "bench_posttrain" + ("_quick" if args.quick else ""), results, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
