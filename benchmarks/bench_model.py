"""glm5 vs HF transformers GlmMoeDsaForCausalLM on the bench-tiny config with identical weights.

Workloads (docs/performance.md): prefill of 1 x {2K, 8K, 16K} tokens (time, peak RSS) and one AdamW training step
on 8 x 256 tokens (forward + backward + step). Every measurement runs in a fresh process (so the peak RSS
belongs to that workload alone), glm5 and HF interleaved, and the report gives glm5/HF ratios.

    python benchmarks/bench_model.py                    # the full run (~10 minutes on 2 cores)
    python benchmarks/bench_model.py --quick            # 2K/4K prefill, one repeat: a smoke run

Writes benchmarks/results/bench_model.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CONFIG_PATH, RESULTS, build, run_in_fresh_process  # benchmarks/common.py


def logits_of(impl: str, model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits if impl == "glm5" else model(input_ids=ids, use_cache=False).logits


def worker(impl: str, workload: str, size: int, weights: str, threads: int, queue) -> None:
    """Run one workload in this (fresh) process and report seconds and peak RSS."""
    try:
        cfg, model = build(impl, weights, threads)
        gen = torch.Generator().manual_seed(size)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if workload == "prefill":
            ids = torch.randint(0, cfg.vocab_size, (1, size), generator=gen)
            with torch.no_grad():
                start = time.perf_counter()
                logits_of(impl, model, ids)
                seconds = time.perf_counter() - start
            tokens = size
        else:  # train: AdamW step on 8 x size tokens; median of 3 after one warm-up step
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, cfg.vocab_size, (8, size + 1), generator=gen)
            times = []
            for _ in range(4):
                start = time.perf_counter()
                logits = logits_of(impl, model, ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times[1:])
            tokens = 8 * size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        queue.put(
            {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_rss": peak, "rss_before": rss_before}
        )
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def check_parity(weights: str, threads: int) -> float:
    """Max |logits difference| at 2x index_topk tokens (so DSA is active): the two sides run the same model."""
    cfg, ours = build("glm5", weights, threads)
    _, ref = build("hf", weights, threads)
    ids = torch.randint(
        0, cfg.vocab_size, (1, 2 * cfg.index_topk), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return (logits_of("glm5", ours, ids) - logits_of("hf", ref, ids)).abs().max().item()


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"bench-tiny ({meta['params'] / 1e6:.1f}M params), fp32, torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpu']}; median of {meta['repeats']} runs, each in a fresh process; glm5/HF logits max diff "
        f"{meta['parity_max_abs_diff']:.1e}.",
        "",
        "| workload | HF time | glm5 time | speed-up | HF peak RSS | glm5 peak RSS | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        hf, ours = row["hf"], row["glm5"]
        if "error" in hf or "error" in ours:
            lines.append(f"| {row['name']} | {hf.get('error', '')} | {ours.get('error', '')} | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {hf['seconds']:.2f} s | {ours['seconds']:.2f} s | "
            f"**{hf['seconds'] / ours['seconds']:.1f}x** | {hf['peak_rss'] / 1e9:.2f} GB | "
            f"{ours['peak_rss'] / 1e9:.2f} GB | {ours['peak_rss'] / hf['peak_rss']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in results["rows"]
        if r["workload"] == "prefill" and "error" not in r["hf"] and "error" not in r["glm5"]
    ]
    sizes = [r["size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for impl, style in (("hf", "o--"), ("glm5", "s-")):
        ax1.plot(sizes, [r[impl]["seconds"] for r in rows], style, label=impl)
        ax2.plot(sizes, [r[impl]["peak_rss"] / 1e9 for r in rows], style, label=impl)
    ax1.set(
        xlabel="prompt tokens", ylabel="prefill seconds", title="prefill time (bench-tiny, CPU)", yscale="log"
    )
    ax2.set(xlabel="prompt tokens", ylabel="peak RSS (GB)", title="prefill peak memory")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from safetensors.torch import save_file

    from glm5 import GLM5Config, GLM5ForCausalLM

    prefill_sizes = [2048, 4096] if args.quick else [2048, 8192, 16384]
    repeats = args.repeats or (1 if args.quick else 2)
    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg)
    for module in model.modules():  # a realistic, non-zero router bias
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.01)
    workloads = [("prefill", n, f"prefill 1 x {n:,}") for n in prefill_sizes] + [
        ("train", 256, "train step 8 x 256")
    ]
    results = {
        "meta": {
            "config": "bench-tiny",
            "params": model.num_parameters(),
            "torch": torch.__version__,
            "threads": args.threads,
            "dtype": "float32",
            "repeats": repeats,
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        save_file({k: v.contiguous() for k, v in model.hf_state_dict(fused_experts=True).items()}, weights)
        results["meta"]["parity_max_abs_diff"] = check_parity(weights, args.threads)
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns) as progress:
            task = progress.add_task("benchmark", total=len(workloads) * repeats * 2)
            for workload, size, name in workloads:
                runs: dict[str, list[dict]] = {"hf": [], "glm5": []}
                for _ in range(repeats):
                    for impl in ("hf", "glm5"):  # interleaved: machine drift hits both sides alike
                        progress.update(task, description=f"{name}: {impl}")
                        runs[impl].append(
                            run_in_fresh_process(worker, (impl, workload, size, weights, args.threads), 900)
                        )
                        progress.advance(task)
                row = {"name": name, "workload": workload, "size": size}
                for impl, got in runs.items():
                    ok = [r for r in got if "error" not in r]
                    row[impl] = (
                        {key: statistics.median(r[key] for r in ok) for key in ok[0]} if ok else got[0]
                    )
                results["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_model.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "bench_model.md").write_text(table)
    plot(results, args.out / "bench_model.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
