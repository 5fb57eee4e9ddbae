"""Checkpoint loading memory: peak RSS of glm5's streaming `from_pretrained` against the checkpoint size.

Writes a random checkpoint of the `small` config (bfloat16, 20 MB shards) in the published BF16 and FP8
layouts, then loads each in a fresh process and reports the peak resident memory above the process's
baseline (VmHWM - VmRSS before loading, after a warm-up load of a tiny checkpoint so that lazy imports and
one-time set-up are excluded), as a multiple of the checkpoint's tensor bytes.
A loader that materialised the weights twice (a state dict, then the model) would show >= 2x; glm5 streams
into a meta-built model, so the target is ~1x. transformers' `from_pretrained` on the same BF16 folder runs
in the same way as the peer.

    python benchmarks/bench_checkpoint.py            # ~1 minute on 2 cores
    python benchmarks/bench_checkpoint.py --preset tiny

Writes benchmarks/results/bench_checkpoint.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(impl: str, path: str, fp8: str):
    if impl == "glm5":
        from glm5 import GLM5ForCausalLM

        return GLM5ForCausalLM.from_pretrained(path, fp8=fp8)
    import transformers

    return transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def worker(impl: str, path: str, warmup: str, fp8: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    from glm5.model.fp8 import weight_bytes

    _load(impl, warmup, fp8)  # lazy imports and one-time set-up are not part of the per-checkpoint cost
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    model = _load(impl, path, fp8)
    seconds = time.perf_counter() - start
    weights = weight_bytes(model)
    queue.put(
        {
            "seconds": seconds,
            "peak_above_baseline": (_status_kib("VmHWM") - baseline) * 1024,
            "baseline": baseline * 1024,
            "weights_in_memory": weights,
        }
    )


def measure(impl: str, path: Path, warmup: Path, fp8: str = "dequantize", threads: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker, args=(impl, str(path), str(warmup), fp8, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable times on a shared machine)"
    )
    parser.add_argument("--shard", default="20MB", help="max_shard_size of the written checkpoints")
    args = parser.parse_args()

    from glm5 import GLM5Config
    from glm5.checkpoint.files import CheckpointFolder
    from glm5.checkpoint.synthetic import write_random_checkpoint

    cfg = GLM5Config.from_preset(args.preset).replace(torch_dtype="bfloat16")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("bf16", "fp8"):
            write_random_checkpoint(cfg, Path(tmp) / layout, fp8=layout == "fp8", max_shard_size=args.shard)
            tiny = GLM5Config.from_preset("tiny").replace(torch_dtype="bfloat16", num_nextn_predict_layers=0)
            write_random_checkpoint(tiny, Path(tmp) / f"warmup-{layout}", fp8=layout == "fp8")
        size = {
            layout: sum(t.nbytes for t in CheckpointFolder(Path(tmp) / layout).tensors.values())
            for layout in ("bf16", "fp8")
        }
        runs = [("glm5", "bf16", "dequantize"), ("glm5", "fp8", "keep"), ("glm5", "fp8", "dequantize")]
        try:
            import transformers  # noqa: F401

            runs.append(("hf", "bf16", "-"))
        except ImportError:
            pass
        for impl, layout, mode in runs:
            r = measure(impl, Path(tmp) / layout, Path(tmp) / f"warmup-{layout}", mode, args.threads)
            r.update(
                impl=impl,
                layout=layout,
                fp8=mode,
                checkpoint_bytes=size[layout],
                peak_over_checkpoint=r["peak_above_baseline"] / size[layout],
            )
            rows.append(r)
            print(
                f"{impl:5s} {layout:5s} {mode:10s} checkpoint {size[layout] / 1e6:8.1f} MB  peak +"
                f"{r['peak_above_baseline'] / 1e6:8.1f} MB ({r['peak_over_checkpoint']:.2f}x)  "
                f"weights {r['weights_in_memory'] / 1e6:8.1f} MB  {r['seconds']:.2f} s"
            )
    meta = {
        "preset": args.preset,
        "shard": args.shard,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_checkpoint.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n")
    lines = [
        f"{args.preset} config in bfloat16, {args.shard} shards, torch {meta['torch']}, {args.threads} threads; "
        "each load "
        "in a fresh process after a warm-up load of a tiny checkpoint; peak = VmHWM - VmRSS before loading.",
        "",
        "| loader | checkpoint | mode | checkpoint bytes | peak RSS above baseline | peak / checkpoint "
        "| weights in memory | time |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['layout']} | {r['fp8']} | {r['checkpoint_bytes'] / 1e6:,.1f} MB | "
            f"{r['peak_above_baseline'] / 1e6:,.1f} MB | **{r['peak_over_checkpoint']:.2f}x** | "
            f"{r['weights_in_memory'] / 1e6:,.1f} MB | {r['seconds']:.2f} s |"
        )
    (RESULTS / "bench_checkpoint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
