"""Training throughput and MFU: glm5's full pre-training step vs HF transformers' GlmMoeDsaForCausalLM, in fp32
and in bf16 autocast.

Same bench-tiny weights (benchmarks/configs/bench-tiny.json), same batch (8 x 256 tokens), same AdamW, fp32
master weights; each side in fp32 and under bf16 autocast (the forward; the loss in fp32). glm5 is
measured twice: on the same work as HF (LM loss only), and on the step `glm5 train` runs: LM + MTP (one MTP
layer added to bench-tiny, depth 1) + the DSA indexer KL loss + the sequence-wise balance loss, clipping, and
the aux-loss-free router-bias update. HF trains the LM loss only (it runs its indexer without gradients and
has no MTP). Each measurement runs in a fresh process, all six interleaved. The ratios compare each side at its
best dtype on this machine (bf16 only pays where the CPU has AVX512-BF16/AMX); the dtype `glm5 train --dtype
auto` picks here is reported too. MFU = model FLOPs per token x tokens/s / the matmul peak measured in this run
for the dtype of the row, where
model FLOPs = 6 x active main-model parameters (lm_head included, embedding lookup excluded) + causal
attention (6 x layers x heads x (qk + v dims) x mean keys per query) — the same count for both sides, so the
MTP and indexer work glm5 does on top is not credited.

    python benchmarks/bench_train.py                 # full run (3 repeats, 4 timed steps each, both dtypes)
    python benchmarks/bench_train.py --quick         # 1 repeat, 2 timed steps: a smoke run
    python benchmarks/bench_train.py --dtypes fp32   # one dtype only (bf16 is ~100x slower on AVX2-only CPUs)

Writes benchmarks/results/bench_train.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CONFIG_PATH, RESULTS, run_in_fresh_process, save_results  # benchmarks/common.py

BATCH, SEQ = 8, 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("hf", "glm5-lm", "glm5")


def model_flops_per_token(cfg, seq_len: int, mtp: bool = False) -> float:  # noqa: ANN001
    """Training FLOPs per token of the main model (see the module docstring); mtp=True adds one MTP depth
    (its decoder layer, eh_proj and a second pass through the shared LM head)."""
    from glm5.plan import parameter_table

    table = parameter_table(cfg)
    active = table.active_with_head
    layers = cfg.num_hidden_layers
    if mtp:
        active += table.mtp_active + table.component_params("lm_head")
        layers += 1
    attention = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    return 6.0 * active + 6.0 * attention


def matmul_peak(
    dtype: torch.dtype, threads: int, n: int = 2048, seconds: float = 2.0, clock: str = "wall"
) -> float:
    """Measured GFLOP/s of an n x n matmul in `dtype` (the best of repeated timings), on the clock the steps
    are timed with ("cpu": process CPU time, as a loaded machine's steps). A dtype without fast kernels here
    (bf16 on an AVX2 CPU runs ~500x slower than fp32) is measured at n = 512 to stay short."""
    torch.set_num_threads(threads)
    now = time.process_time if clock == "cpu" else time.perf_counter
    probe = torch.randn(512, 512, dtype=dtype)
    start = now()
    probe @ probe
    if 2 * 512**3 / max(now() - start, 1e-9) < 20e9:
        n = 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = now()
        a @ b
        best = min(best, now() - start)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def _glm5_step(model, opt, ids, recipe, routers, dtype):  # noqa: ANN001
    from glm5.data.packing import Batch
    from glm5.device import autocast
    from glm5.train.optim import clip_grad_norm
    from glm5.train.pretrain import step_counts, training_losses, update_router_bias
    from glm5.train.recipe import Stage

    batch = Batch(ids[:, :-1], ids[:, 1:])
    counts = step_counts([batch], recipe.mtp_depth)
    targets = {
        "targets": batch.targets,
        "mtp_targets": [batch.mtp_targets(d) for d in range(recipe.mtp_depth)],
    }
    with autocast("cpu", dtype):  # as Trainer.train_step: the forward under autocast, heads fused with the CE
        out = model(batch.input_ids, mtp_depth=recipe.mtp_depth, return_stats=True, **targets)
    objective, _ = training_losses(
        out, batch, counts, recipe, Stage("sparse", 1.0, dsa=True), model.config.num_experts_per_tok
    )
    objective.backward()
    clip_grad_norm([p for n, p in model.named_parameters() if ".indexer." not in n], 1.0)
    clip_grad_norm([p for n, p in model.named_parameters() if ".indexer." in n], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loads = torch.stack([s.router.expert_load for s in out.stats if s.router is not None])
    update_router_bias(routers, loads, recipe.bias_update_rate)


def _hf_step(model, opt, ids, dtype, glm5: bool = False):  # noqa: ANN001
    from glm5.device import autocast

    with autocast("cpu", dtype):
        if glm5:  # glm5's training forward: the LM head fused with its cross-entropy (glm5.model.loss)
            loss = model(ids[:, :-1], targets=ids[:, 1:], mtp_targets=[]).lm_loss_sum / ids[:, 1:].numel()
        else:
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    if not glm5:
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def worker(  # noqa: ANN001
    impl: str, dtype_name: str, weights: str, threads: int, steps: int, clock: str, allocator: str, queue
) -> None:
    """Time `steps` training steps (after one warm-up step) in this fresh process; clock "cpu" counts this
    process's CPU time (steady on a shared machine with --threads 1), "wall" the elapsed time. allocator
    "tuned": glibc malloc as `glm5 train` sets it (glm5.train.pretrain.tune_cpu_allocator), for every side."""
    try:
        from safetensors.torch import load_file

        from glm5.train.pretrain import tune_cpu_allocator

        if allocator == "tuned":
            tune_cpu_allocator()

        from glm5 import GLM5Config, GLM5ForCausalLM
        from glm5.train.optim import build_optimizer
        from glm5.train.recipe import TrainRecipe

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        dtype = DTYPES[dtype_name]
        cfg = GLM5Config.from_hf_config(CONFIG_PATH)
        state = load_file(weights)
        ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
        if impl == "glm5-lm":  # the same work as HF: LM loss only, no MTP, no indexer/balance losses
            model = GLM5ForCausalLM(cfg)
            model.load_hf_state_dict(state)
            model.train()
            opt = torch.optim.AdamW(
                model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
            )
            step = lambda: _hf_step(model, opt, ids, dtype, glm5=True)
        elif impl == "glm5":
            recipe = TrainRecipe(mtp_depth=1)
            model = GLM5ForCausalLM(cfg.replace(num_nextn_predict_layers=1))
            model.load_hf_state_dict(state, strict=False)  # main weights; the MTP layer keeps its fresh init
            model.train()
            opt = build_optimizer(model, recipe, distributed=False)
            routers = [m.mlp.gate for m in model.modules() if hasattr(getattr(m, "mlp", None), "gate")]
            step = lambda: _glm5_step(model, opt, ids, recipe, routers, dtype)
        else:
            import transformers

            model = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**cfg.to_hf_config()))
            model.load_state_dict(state, strict=False)
            model.train()
            opt = torch.optim.AdamW(
                model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
            )
            step = lambda: _hf_step(model, opt, ids, dtype)
        step()  # warm-up (allocations)
        times = []
        now = time.process_time if clock == "cpu" else time.perf_counter
        for _ in range(steps):
            start = now()
            step()
            times.append(now() - start)
        seconds = statistics.median(times)
        queue.put({"seconds": seconds, "tokens_per_s": BATCH * SEQ / seconds})
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def peak_worker(threads: int, clock: str, queue) -> None:  # noqa: ANN001
    from glm5.device import train_dtype

    torch.set_num_threads(threads)
    auto, reason = train_dtype("cpu", "auto")
    queue.put(
        {
            "float32": matmul_peak(torch.float32, threads, clock=clock),
            "bfloat16": matmul_peak(torch.bfloat16, threads, clock=clock),
            "auto": str(auto).removeprefix("torch."),
            "auto_reason": reason,
        }
    )


WHAT = {
    "hf": ("HF transformers", "LM loss"),
    "glm5-lm": ("glm5", "LM loss (the same work as HF)"),
    "glm5": ("glm5", "LM + MTP + indexer KL + balance (`glm5 train`)"),
}
PEAK_KEY = {"fp32": "float32", "bf16": "bfloat16"}


def best(r: dict, impl: str) -> str | None:
    """The dtype at which `impl` trained fastest here (None when every run of it failed)."""
    ok = [d for d in r["meta"]["dtypes"] if "error" not in r["runs"][f"{impl}/{d}"]]
    return max(ok, key=lambda d: r["runs"][f"{impl}/{d}"]["tokens_per_s"]) if ok else None


def markdown(r: dict) -> str:
    m = r["meta"]
    peaks = m["peak_gflops"]
    clock = "times are process CPU time (a loaded machine)" if m.get("clock") == "cpu" else "wall-clock times"
    allocator = (
        "every side with the glibc malloc settings `glm5 train` applies on CPU"
        if m.get("allocator") == "tuned"
        else "glibc malloc defaults"
    )
    lines = [
        f"bench-tiny ({m['params'] / 1e6:.1f}M params; glm5 adds a {m['mtp_params'] / 1e6:.1f}M MTP layer), "
        f"train step {BATCH} x {SEQ} tokens, AdamW, fp32 master weights, torch {m['torch']}, {m['threads']} "
        f"threads, {m['cpu']} ({m['cpu_flags']}); median of {m['repeats']} fresh processes x {m['steps']} steps, "
        f"all runs interleaved; {clock}; {allocator}. Matmul peak measured in this run: "
        f"{peaks['float32']:.0f} GFLOP/s fp32, {peaks['bfloat16']:.1f} GFLOP/s bf16. `glm5 train --dtype auto` "
        f"picks {peaks['auto']} here ({peaks['auto_reason']}). "
        f"Model FLOPs {m['flops_per_token'] / 1e6:.1f} MFLOP/token (same count for both).",
        "",
        "| implementation | what it trains | dtype | step time | tokens/s | MFU (vs that dtype's peak) | vs HF |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    hf_best = best(r, "hf")
    hf = r["runs"][f"hf/{hf_best}"] if hf_best else None
    for impl in IMPLS:
        name, what = WHAT[impl]
        for d in m["dtypes"]:
            row = r["runs"][f"{impl}/{d}"]
            if "error" in row:
                lines.append(f"| {name} | {what} | {d} | {row['error']} | | | |")
                continue
            ratio = f"{row['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf else "n/a"
            if d == best(r, impl):
                ratio = f"**{ratio}**"
            mfu = f"{row['mfu']:.1%}" + (
                f" ({row['mfu_with_mtp']:.1%} with MTP)" if "mfu_with_mtp" in row else ""
            )
            lines.append(
                f"| {name} | {what} | {d} | {row['seconds']:.2f} s | {row['tokens_per_s']:,.0f} | {mfu} | {ratio} |"
            )
    lines += [
        "",
        f"vs HF: against HF at its best dtype here ({hf_best}); **bold**: each glm5 row at its best dtype.",
    ]
    for impl, target in (("glm5", 1.0), ("glm5-lm", 2.0)):
        key = f"speedup_{impl}"
        if key in r:
            verdict = "met" if r[key] >= target else "NOT met"
            lines.append(
                f"- {WHAT[impl][1]}: {r[key]:.2f}x HF's LM-only step, each at its best dtype "
                f"(target >= {target:.1f}x: {verdict})"
            )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{i}/{d}" for i in IMPLS for d in r["meta"]["dtypes"] if "error" not in r["runs"][f"{i}/{d}"]]
    colors = ["#999" if k.startswith("hf/") else "#7b9" if k.startswith("glm5-lm/") else "#3a7" for k in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(keys, [r["runs"][k]["tokens_per_s"] for k in keys], color=colors)
    ax1.set(ylabel="training tokens/s", title="train step 8 x 256 (bench-tiny)")
    ax2.bar(keys, [100 * r["runs"][k]["mfu"] for k in keys], color=colors)
    ax2.set(ylabel="MFU (% of that dtype's measured peak)", title="model FLOPs utilisation")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_flags() -> str:
    """The CPU's matmul-relevant ISA flags (what decides whether bf16 pays)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "flags unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 timed steps (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtypes", default="fp32,bf16", help="comma-separated dtypes to measure: fp32, bf16 (default both)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (a quiet machine); cpu: the process's CPU time, steady on a loaded machine "
        "(use it with --threads 1: with more, OpenMP spin-waits count too)",
    )
    parser.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: every side (HF too) runs with the glibc malloc settings `glm5 train` applies on CPU "
        "(freed memory is reused, not returned and faulted in again); default: glibc's defaults",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes {args.dtypes!r}: use a comma-separated list of {', '.join(DTYPES)}")
    from safetensors.torch import save_file

    from glm5 import GLM5Config, GLM5ForCausalLM

    repeats, steps = (1, 2) if args.quick else (3, 4)
    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg)
    mtp = GLM5ForCausalLM(cfg.replace(num_nextn_predict_layers=1))
    result = {
        "meta": {
            "config": "bench-tiny",
            "params": model.num_parameters(),
            "mtp_params": mtp.num_parameters() - model.num_parameters(),
            "torch": torch.__version__,
            "threads": args.threads,
            "dtypes": dtypes,
            "clock": args.clock,
            "allocator": args.allocator,
            "repeats": repeats,
            "steps": steps,
            "batch": [BATCH, SEQ],
            "cpu": platform.processor() or platform.machine(),
            "cpu_flags": _cpu_flags(),
            "flops_per_token": model_flops_per_token(cfg, SEQ),
            "flops_per_token_with_mtp": model_flops_per_token(mtp.config, SEQ, mtp=True),
        }
    }
    result["meta"]["peak_gflops"] = run_in_fresh_process(peak_worker, (args.threads, args.clock), timeout=300)
    runs: dict[str, list[dict]] = {f"{i}/{d}": [] for i in IMPLS for d in dtypes}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        save_file({k: v.contiguous() for k, v in model.hf_state_dict(fused_experts=True).items()}, weights)
        for i in range(repeats):
            for key in runs:  # interleaved: machine drift hits every side alike
                impl, d = key.split("/")
                print(f"repeat {i + 1}/{repeats}: {key}", flush=True)
                runs[key].append(
                    run_in_fresh_process(
                        worker,
                        (impl, d, weights, args.threads, steps, args.clock, args.allocator),
                        timeout=1800,
                    )
                )
    result["runs"] = {}
    for key, got in runs.items():
        d = key.split("/")[1]
        peak = result["meta"]["peak_gflops"][PEAK_KEY[d]] * 1e9
        ok = [r for r in got if "error" not in r]
        row = {k: statistics.median(r[k] for r in ok) for k in ok[0]} if ok else got[0]
        if ok:
            row["mfu"] = row["tokens_per_s"] * result["meta"]["flops_per_token"] / peak
        if ok and key.startswith("glm5/"):  # the hardware also did the MTP depth's work
            row["mfu_with_mtp"] = row["tokens_per_s"] * result["meta"]["flops_per_token_with_mtp"] / peak
        result["runs"][key] = row
    hf_best = best(result, "hf")
    for impl in ("glm5-lm", "glm5"):
        ours = best(result, impl)
        if hf_best and ours:
            result[f"best_dtype_{impl}"] = ours
            result[f"speedup_{impl}"] = (
                result["runs"][f"{impl}/{ours}"]["tokens_per_s"]
                / result["runs"][f"hf/{hf_best}"]["tokens_per_s"]
            )
    result["best_dtype_hf"] = hf_best
    suffix = (
        ("_quick" if args.quick else "")
        + ("_cpuclock" if args.clock == "cpu" else "")
        + ("_defaultmalloc" if args.allocator == "default" else "")
    )
    save_results(args.out, f"bench_train{suffix}", result, markdown(result), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
