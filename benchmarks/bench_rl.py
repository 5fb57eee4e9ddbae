"""RL system benchmark: fully-async vs synchronous wall time under long-tailed generation, and the hallucination
rate after RL with the abstention-aware reward vs the plain math reward.

1. Throughput. The digits task on the real engine with Pareto-distributed per-token delays (a few requests
   are many times slower than the median, as long generations are). The same number of optimizer updates is
   run synchronously (eta = 0, generate then train) and fully asynchronously (eta = 1, generation on its own
   thread, partial rollouts aborted at each update and continued). Target: async >= 1.5x faster.
2. Hallucination. One tiny chat policy, warm-started on easy arithmetic + unanswerable questions, is trained
   with RL twice from the same weights: plain `math` reward (+1 right, 0 otherwise: guessing costs nothing)
   and `math-abstain` (+1 right / 0 "I don't know" / -1 wrong). Hallucination rate = share of held-out
   unanswerable questions answered instead of declined (greedy), before and after each run.

    python benchmarks/bench_rl.py            # full run
    python benchmarks/bench_rl.py --quick    # fewer steps: a smoke run

Writes benchmarks/results/bench_rl.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402  benchmarks/common.py

DELAY = {"alpha": 1.1, "scale": 0.004, "cap": 0.25}
"""Seconds per token: Pareto(1.1) with a 4 ms minimum, capped at 250 ms (median ~7 ms, p99 ~250 ms)."""


def throughput(mode: str, steps: int) -> dict:
    from glm5.rl.controller import build_local, run_loop
    from glm5.rl.recipes import build_task, recipe_preset

    base = recipe_preset("digits-sync" if mode == "sync" else "digits-async")
    rollout = {**base.rollout, "max_new_tokens": 6, "filter_zero_variance": False}
    if mode == "async":
        rollout.update(update_mode="abort", partial_rollout=True)
    recipe = base.replace(
        steps=steps,
        delay=DELAY,
        rollout=rollout,
        buffer={**base.buffer, "max_concurrent": 4 * base.buffer["batch_size"]},
    )
    system = build_local(recipe, build_task(recipe, None, log=lambda *_: None))
    t0 = time.perf_counter()
    records = run_loop(
        system["buffer"],
        system["rollout"],
        system["trainer"],
        system["transport"],
        steps=steps,
        overlap=recipe.overlap,
    )
    wall = time.perf_counter() - t0
    return {
        "mode": mode,
        "steps": steps,
        "wall_s": wall,
        "s_per_update": wall / steps,
        "samples": sum(r["num_samples"] for r in records),
        "staleness_mean": sum(r["staleness_mean"] for r in records) / steps,
        "staleness_max": max(r["staleness_max"] for r in records),
        "train_s": sum(r["train_s"] for r in records),
        "wait_s": sum(r["wait_s"] for r in records),
        "final_rollout_reward": records[-1].get("rollout_reward"),
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def hallucination(steps: int, sft_steps: int) -> dict:
    from glm5.rl.controller import build_local, run_loop
    from glm5.rl.recipes import build_task, recipe_preset
    from glm5.rl.rollout import evaluate_policy

    base = recipe_preset("math-abstain").replace(steps=steps, sft_steps=sft_steps, eval_prompts=60)
    task = build_task(base, None, log=lambda *_: None)
    start = copy.deepcopy(task["model"].state_dict())
    out = {}
    for name, reward in (("math", "math"), ("math-abstain", "abstain")):
        from glm5.rl.rewards import get_reward_fn

        recipe = base.replace(name=name, reward=reward)
        task["model"].load_state_dict(start)
        run_task = dict(task, reward_fn=get_reward_fn(reward))
        system = build_local(recipe, run_task)
        kw = dict(
            max_new_tokens=recipe.configs()[1].max_new_tokens,
            tokenizer=task["tokenizer"],
            reply_fn=task["reply_fn"],
            env=None,
        )
        before = evaluate_policy(system["engine"], task["eval"], get_reward_fn("abstain"), **kw)
        t0 = time.perf_counter()
        run_loop(
            system["buffer"],
            system["rollout"],
            system["trainer"],
            system["transport"],
            steps=steps,
            overlap=recipe.overlap,
        )
        after = evaluate_policy(system["engine"], task["eval"], get_reward_fn("abstain"), **kw)
        strip = ("examples",)
        out[name] = {
            "before": {k: v for k, v in before.items() if k not in strip},
            "after": {k: v for k, v in after.items() if k not in strip},
            "wall_s": time.perf_counter() - t0,
        }
    return out


def markdown(r: dict) -> str:
    m, s, a = r["meta"], r["sync"], r["async"]
    lines = [
        f"Digits task on the glm5 engine, long-tailed per-token delays {DELAY}, {s['steps']} updates each, "
        f"torch {m['torch']}, {m['threads']} thread(s), {m['cpu']}.",
        "",
        "| mode | wall time | s / update | mean / max staleness | trainer busy | trainer waiting |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in (s, a):
        lines.append(
            f"| {row['mode']} | {row['wall_s']:.1f} s | {row['s_per_update']:.2f} | "
            f"{row['staleness_mean']:.2f} / {row['staleness_max']} | {row['train_s']:.1f} s | {row['wait_s']:.1f} s |"
        )
    lines += ["", f"**fully-async speedup: {r['speedup']:.2f}x** (target >= 1.5x)", ""]
    h = r["hallucination"]
    lines += [
        "Held-out questions (one-digit sums and unanswerable questions, greedy), tiny warm-started chat "
        f"policy, {m['rl_steps']} RL steps from the same weights. Hallucination rate = wrong / (wrong + "
        "abstentions) over the replies that are not correct (glm5.eval's definition):",
        "",
        "| reward | hallucination before | after | accuracy before | after | abstention after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in h.items():
        b, a2 = row["before"], row["after"]
        lines.append(
            f"| {name} | {pct(b['hallucination_rate'])} | {pct(a2['hallucination_rate'])} | {b['accuracy']:.0%} "
            f"| {a2['accuracy']:.0%} | {a2['abstention_rate']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    updates, rl_steps, sft = (6, 6, 100) if args.quick else (16, 30, 200)
    result = {
        "meta": {
            "torch": torch.__version__,
            "threads": args.threads,
            "updates": updates,
            "rl_steps": rl_steps,
            "sft_steps": sft,
            "cpu": platform.processor() or platform.machine(),
            "delay": DELAY,
        }
    }
    for mode in ("sync", "async"):
        print(f"throughput: {mode}", flush=True)
        result[mode] = throughput(mode, updates)
    result["speedup"] = result["sync"]["wall_s"] / result["async"]["wall_s"]
    print("hallucination: math vs math-abstain", flush=True)
    result["hallucination"] = hallucination(rl_steps, sft)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (args.out / f"bench_rl{suffix}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    (args.out / f"bench_rl{suffix}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
