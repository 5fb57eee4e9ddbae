"""One call on a lent GPU: the `gpu`-marked tests, then a short decode / prefill / training-step benchmark.

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out DIR         # results to DIR/gpu_check.{json,md} (default results/)

Under 5 minutes on one GPU: the tests first (at most --test-timeout seconds), then, on the bench-tiny model
(benchmarks/configs/bench-tiny.json, random weights) in bf16, batch-1 and batch-8 greedy decode and one-prompt
prefill, eager vs the compiled decode step (`EngineConfig.compile`: torch.compile, CUDA graphs through
"reduce-overhead"), the tokens of both compared, and a training step in fp32 vs bf16 autocast with the dtype
`glm5 train --dtype auto` picks. Each phase has its own deadline; what finished is written even when a later
phase fails or runs out of time. Exits 2 with "no CUDA device" where there is none, 1 when a test or a token
comparison failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import CONFIG_PATH, RESULTS  # noqa: E402  (benchmarks/common.py)

from glm5.device import synchronize  # noqa: E402

DECODE_NEW = 64
PROMPT_LEN = 32
DEVICE = "cuda"
"""Where the benchmark phases run; --dry-run-cpu sets "cpu" to check this script without a GPU."""
BACKEND = "inductor"
DTYPE = torch.bfloat16
"""The inference benchmarks' dtype (a dry run uses float32: bf16 decode is slow on most CPUs)."""


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (
            f"no CUDA device: torch {torch.__version__} ({build}) sees no GPU; run `make gpu-check` on a machine "
            "with an NVIDIA (or ROCm) GPU and a CUDA build of PyTorch"
        )
    return None


def run_tests(timeout: float) -> dict:
    """pytest -m gpu over tests/ in a child process: counts and the tail of its output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        return {"ok": False, "error": f"timed out after {timeout:.0f}s", "tail": str(tail)}
    tail = (proc.stdout + proc.stderr)[-4000:]
    summary = next(
        (ln for ln in reversed(tail.splitlines()) if " in " in ln and ("passed" in ln or "failed" in ln)), ""
    )
    return {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "summary": summary.strip("= "),
        "seconds": time.perf_counter() - start,
        "tail": tail,
    }


def _model(dtype: torch.dtype):  # noqa: ANN202
    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    return GLM5ForCausalLM(cfg).eval().to(DEVICE, dtype)


def _prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab, (count, length), generator=gen).tolist()


def _timed_generate(llm, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:  # noqa: ANN001
    from glm5.engine import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    synchronize(DEVICE)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    synchronize(DEVICE)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def bench_decode(deadline: float) -> dict:
    """Decode tokens/s at batch 1 and 8, eager vs compiled; the compiled step's tokens vs eager's."""
    from glm5.engine import LLM

    model = _model(DTYPE)
    vocab = model.config.vocab_size
    rows: dict = {}
    for compile_setting in ("off", "on"):
        llm = LLM(
            model,
            compile=compile_setting,
            compile_backend=BACKEND,
            fused_decode=False,  # on a GPU it is off anyway; on a dry run the compiled step is what is checked
            enable_prefix_caching=False,
        )
        for batch in (1, 8):
            if time.time() > deadline:
                rows[f"{compile_setting}/b{batch}"] = {"error": "skipped: out of time"}
                continue
            prompts = _prompts(vocab, batch, PROMPT_LEN)
            warm, tokens = _timed_generate(llm, prompts, DECODE_NEW)  # compiles / records graphs
            times = [_timed_generate(llm, prompts, DECODE_NEW)[0] for _ in range(3)]
            rows[f"{compile_setting}/b{batch}"] = {
                "tokens_per_s": batch * DECODE_NEW / statistics.median(times),
                "first_run_s": warm,
                "tokens": tokens,
            }
        step = llm.engine.executor.runner.compiled
        if step is not None:
            rows["compile_failed"] = step.failed
    for batch in (1, 8):
        on, off = rows.get(f"on/b{batch}", {}), rows.get(f"off/b{batch}", {})
        if "tokens" in on and "tokens" in off:
            rows[f"same_tokens/b{batch}"] = on.pop("tokens") == off.pop("tokens")
    return rows


def bench_prefill(deadline: float) -> dict:
    """One-prompt prefill tokens/s (max_tokens=1) at 512 and 2048 tokens, bf16, eager."""
    from glm5.engine import LLM

    model = _model(DTYPE)
    llm = LLM(model, enable_prefix_caching=False, max_num_batched_tokens=4096)
    rows = {}
    for length in (512, 2048):
        if time.time() > deadline:
            rows[str(length)] = {"error": "skipped: out of time"}
            continue
        prompts = _prompts(model.config.vocab_size, 1, length)
        _timed_generate(llm, prompts, 1)
        times = [_timed_generate(llm, prompts, 1)[0] for _ in range(3)]
        rows[str(length)] = {"tokens_per_s": length / statistics.median(times)}
    return rows


def bench_train_step() -> dict:
    """bench-tiny LM training step (8 x 256 tokens, AdamW) in fp32 and bf16 autocast; the auto dtype."""
    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.device import autocast, train_dtype

    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (8, 257), device=DEVICE)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        times = []
        for i in range(6):
            synchronize(DEVICE)
            start = time.perf_counter()
            with autocast(DEVICE, dtype):
                logits = model(ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(DEVICE)
            if i:
                times.append(time.perf_counter() - start)
        out[name] = {"tokens_per_s": 8 * 256 / statistics.median(times)}
    dtype, reason = train_dtype(DEVICE, "auto")
    out["auto"] = f"{str(dtype).removeprefix('torch.')} ({reason})"
    return out


def markdown(r: dict) -> str:
    lines = [
        f"# gpu-check: {r['device']} (sm {r['capability']}), torch {r['torch']}, CUDA {r['cuda']}",
        "",
    ]
    tests = r["tests"]
    lines.append(
        f"- gpu tests: {'ok' if tests.get('ok') else 'FAILED'} -- {tests.get('summary') or tests.get('error')}"
    )
    d = r.get("decode", {})
    for batch in (1, 8):
        off, on = d.get(f"off/b{batch}", {}), d.get(f"on/b{batch}", {})
        if "tokens_per_s" in off and "tokens_per_s" in on:
            eager, compiled = off["tokens_per_s"], on["tokens_per_s"]
            lines.append(
                f"- decode batch {batch} (bench-tiny {str(DTYPE)[6:]}, {DECODE_NEW} new tokens): "
                f"eager {eager:.0f} tok/s, compiled {compiled:.0f} tok/s ({compiled / eager:.2f}x; "
                f"first compiled run {on['first_run_s']:.1f} s); same tokens: {d.get(f'same_tokens/b{batch}')}"
            )
        else:
            lines.append(f"- decode batch {batch}: {off.get('error') or on.get('error') or 'not run'}")
    if d.get("compile_failed"):
        lines.append(f"- compiled decode fell back to eager: {d['compile_failed']}")
    for length, row in r.get("prefill", {}).items():
        lines.append(
            f"- prefill {length} tokens: {row.get('tokens_per_s', 0):.0f} tok/s {row.get('error', '')}"
        )
    t = r.get("train", {})
    if "fp32" in t:
        lines.append(
            f"- train step (bench-tiny, 8 x 256, LM loss): fp32 {t['fp32']['tokens_per_s']:.0f} tok/s, bf16 autocast "
            f"{t['bf16']['tokens_per_s']:.0f} tok/s; `--dtype auto` picks {t['auto']}"
        )
    for phase, err in r.get("errors", {}).items():
        lines.append(f"- {phase}: ERROR {err}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_check.json / gpu_check.md")
    parser.add_argument("--test-timeout", type=float, default=150.0, help="seconds for the gpu tests")
    parser.add_argument(
        "--budget", type=float, default=270.0, help="seconds for everything (phases stop early)"
    )
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="check this script on a CPU: no tests, eager compile backend",
    )
    args = parser.parse_args(argv)
    global DEVICE, BACKEND, DTYPE, DECODE_NEW
    reason = no_cuda_reason()
    if args.dry_run_cpu:
        DEVICE, BACKEND, DTYPE, DECODE_NEW, reason = "cpu", "eager", torch.float32, 8, None
    if reason:
        print(f"gpu-check: {reason}", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.budget
    cuda = DEVICE == "cuda"
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else "-",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "errors": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(result))

    print("gpu-check: running the gpu-marked tests", flush=True)
    if cuda:
        result["tests"] = run_tests(min(args.test_timeout, max(10.0, deadline - time.time() - 90)))
    else:
        result["tests"] = {"ok": True, "summary": "not run (dry run on a CPU)"}
    save()
    for phase, fn in (
        ("decode", lambda: bench_decode(deadline - 40)),
        ("prefill", lambda: bench_prefill(deadline - 20)),
        ("train", bench_train_step),
    ):
        if time.time() > deadline:
            result["errors"][phase] = "skipped: out of time"
            continue
        print(f"gpu-check: {phase}", flush=True)
        try:
            result[phase] = fn()
        except Exception as e:  # noqa: BLE001 - record it, keep what finished
            result["errors"][phase] = f"{type(e).__name__}: {e}"
        save()
    result["seconds"] = time.time() - start
    save()
    print(markdown(result))
    same = all(v for k, v in result.get("decode", {}).items() if k.startswith("same_tokens/"))
    return 0 if result["tests"].get("ok") and same and not result["errors"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
