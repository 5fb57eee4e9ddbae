"""CPU decode by weight format: glm5 on the `small` preset (fp32, bf16, int8, block FP8) next to llama.cpp (issue 19).

For each weight format a random `small` checkpoint (seed 0) is written by save_pretrained (fp32; bf16 and FP8
through glm5's converter, `glm5 convert --to bf16 / fp8`; int8 is made at load from the bf16 one, as llama.cpp
makes Q8_0 from a bf16 GGUF), loaded with `LLM(path, weights=...)`, and measured in a fresh process per
measurement: batch-1 greedy decode of 128 tokens after a prompt of 32 / 512 / 2K / 8K tokens (and 32K, where DSA
reads 2,048 keys of the context instead of all), prefill tok/s of that prompt, and the process's peak RSS next to
its weight bytes + KV cache bytes. Rounds are interleaved (every format and context once per round), the table
shows medians. Each round also measures the memory bandwidth (a STREAM-like copy of 256 MB arrays with the same
threads): the roofline of a format is bandwidth / the bytes one decode step reads (every matrix of the layers
and lm_head in its stored format, the top-k experts' share of the banks, the cache entries DSA reads).

llama.cpp's numbers are constants quoted from issue 19 (same 2-core AVX-512 machine, same preset and workload,
2 threads); they are not re-measured here (no llama.cpp in this environment).

    python benchmarks/bench_cpu.py                     # 3 rounds, contexts 32 / 512 / 2K / 8K / 32K
    python benchmarks/bench_cpu.py --quick             # 1 round, contexts 32 / 2K, fp32 and fp8
    python benchmarks/bench_cpu.py --decode-steps 1    # one token per engine step (the streaming engines' default)

glm5 runs as `LLM(...)` does by default: 8 greedy tokens per engine step, one kernel call for them
(glm5.engine.llm.OFFLINE_DECODE_STEPS); `--decode-steps N` sets EngineConfig.decode_steps instead.
Writes benchmarks/results/bench_cpu.{json,md,png} (--quick: bench_cpu_quick.*; --decode-steps N:
bench_cpu_steps<N>.*).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, run_in_fresh_process, save_results  # benchmarks/common.py

NEW_TOKENS = 128
WARMUP_TOKENS = 16  # one short greedy request before each measurement
LLAMA_CPP = {  # issue 19: llama.cpp on the same machine, `small`, batch 1, 128 decoded tokens, 2 threads, medians
    "F32": {"decode": {32: 169, 512: 150, 2048: 126, 8192: 87}, "prefill": {512: 940, 2048: 559, 8192: 211}},
    "Q8_0": {
        "decode": {32: 366, 512: 289, 2048: 199, 8192: 110},
        "prefill": {512: 1020, 2048: 578, 8192: 211},
    },
    "BF16": {
        "decode": {32: 269, 512: 232, 2048: 185, 8192: 100},
        "prefill": {512: 903, 2048: 584, 8192: 209},
    },
}
LLAMA_RSS_MB = {"F32": "539-638", "Q8_0": "165-264", "BF16": "285-384"}
COUNTERPART = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "fp8": "Q8_0"}
CHECKPOINT = {"fp32": "fp32", "bf16": "bf16", "int8": "bf16", "fp8": "fp8"}
SHARD = "64MB"
"""Shard size of the bench checkpoints: the loader maps one shard at a time, so a shard is what loading adds to
the peak; GLM-5-FP8's 5 GB shards are 1/140 of its weights, a 64 MB shard ~1/8 of `small` in fp32."""


def peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------- checkpoints
def write_checkpoints(root: str) -> dict:
    """small, random weights (seed 0, a non-zero router bias), as fp32 / bf16 / FP8 checkpoint folders."""
    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.checkpoint.convert import convert_checkpoint

    root = Path(root)
    if (root / "fp8" / "config.json").exists():
        return {}
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_preset("small")).eval()
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.01)
    model.save_pretrained(str(root / "fp32"), max_shard_size=SHARD)
    convert_checkpoint(root / "fp32", root / "bf16", "bf16", max_shard_size=SHARD)
    convert_checkpoint(root / "fp32", root / "fp8", "fp8", max_shard_size=SHARD)
    return {}


# ------------------------------------------------------------------------------------------------- accounting
def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of a matrix module as held (FP8 / int8 scales included)."""
    return tensor_bytes(*module.parameters(), *module.buffers())


def decode_bytes(model: torch.nn.Module, context: int) -> int:
    """Bytes one batch-1 decode step reads at `context`: every layer's matrices (the routed experts: top_k of E),
    lm_head, one embedding row, and the cache: each indexer layer's keys of the whole context, the selected
    latents (at most index_topk) of every layer."""
    from glm5.model.moe import MoE

    cfg = model.config
    total = stored_bytes(model.lm_head) + cfg.hidden_size * model.model.embed_tokens.weight.element_size()
    width = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        total += stored_bytes(attn) - (0 if attn.indexer is None else stored_bytes(attn.indexer.k_norm))
        if isinstance(mlp, MoE):
            total += (
                stored_bytes(mlp.gate) + stored_bytes(mlp.experts) * mlp.gate.top_k // mlp.gate.num_experts
            )
            total += 0 if mlp.shared_experts is None else stored_bytes(mlp.shared_experts)
        else:
            total += stored_bytes(mlp)
        total += min(context, cfg.index_topk) * width
        if attn.indexer is not None:
            total += context * cfg.index_head_dim * 4
    return total


# ------------------------------------------------------------------------------------------------- workers
def run_decode(
    weights: str, folder: str, context: int, threads: int, decode_steps: int | None = None
) -> dict:
    """Load `folder` as `weights`, prefill a random `context`-token prompt, decode NEW_TOKENS greedily
    (`decode_steps` tokens per engine step: EngineConfig.decode_steps; None: LLM's default)."""
    from glm5.engine import LLM, SamplingParams
    from glm5.kernels import native
    from glm5.model.fp8 import weight_bytes

    torch.set_num_threads(threads)
    start = time.perf_counter()
    llm = LLM(
        folder,
        weights=weights,
        max_model_len=context + NEW_TOKENS + 8,
        max_num_seqs=1,
        **({} if decode_steps is None else {"decode_steps": decode_steps}),
    )
    load_s = time.perf_counter() - start
    load_rss = peak_rss()  # loading's own peak: weights (mapped or copied), conversions, the cache allocated
    engine = llm.engine
    model = engine.fused.model
    prompt = torch.randint(
        1, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(context)
    )
    params = SamplingParams(max_tokens=NEW_TOKENS + 1, temperature=0.0, ignore_eos=True)
    # warm-up, as llama-bench does: a short request first, so the measurement does not include the first touch of
    # every memory-mapped weight page or the kernel's first calls
    warm = torch.randint(
        1, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(-1 - context)
    )
    llm.generate([warm.tolist()], SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    engine.add_request("r", prompt.tolist(), params)
    seq = None
    while seq is None or seq.num_output == 0:
        engine.step()
        seq = engine.requests["r"].seqs[0]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    decode_s = time.perf_counter() - start
    executor = engine.executor
    kv = executor.num_blocks * executor.bytes_per_block + executor.num_blocks * (
        executor.mtp_bytes_per_block or 0
    )
    return {
        "decode_tok_s": NEW_TOKENS / decode_s,
        "prefill_tok_s": context / prefill_s,
        "load_s": load_s,
        "peak_rss": peak_rss(),
        "load_rss": load_rss,
        "weight_bytes": weight_bytes(model),
        "kv_bytes": kv,
        "decode_bytes": decode_bytes(model, context),
        "kernel": native.describe() if engine.fused.lib is not None else "torch ops",
    }


def run_baseline(threads: int) -> dict:
    """The peak RSS of a process that imports glm5 and torch and loads the kernel, holding no model: what every
    measurement's peak includes besides weights, cache and activations."""
    from glm5.engine import LLM  # noqa: F401
    from glm5.kernels import native

    torch.set_num_threads(threads)
    native.load()
    return {"peak_rss": peak_rss()}


def run_bandwidth(threads: int) -> dict:
    """STREAM-like copy: best of 5 copies of a 256 MB fp32 array (bytes read + written / s)."""
    torch.set_num_threads(threads)
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * tensor_bytes(a) / (time.perf_counter() - start))
    return {"bytes_per_s": best}


def worker(fn_name: str, args: tuple, queue) -> None:  # noqa: ANN001
    try:
        warnings.filterwarnings("ignore")
        queue.put(globals()[fn_name](*args))
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


# ------------------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    meta, rows, contexts = results["meta"], results["rows"], results["contexts"]
    bw = results["bandwidth_bytes_per_s"]
    base = results["baseline_rss"] / 2**20
    lines = [
        f"# bench_cpu: `small` ({meta['params'] / 1e6:.1f}M parameters), batch-1 greedy decode of {NEW_TOKENS} "
        f"tokens, {meta['threads']} threads"
        + f", glm5 with `decode_steps={meta['decode_steps']}`"
        + (" (`LLM`'s default)" if meta.get("decode_steps_default") else ""),
        "",
        f"{meta['cpu']}; flags {meta['simd_flags']}; {meta['kernel']}. Medians of {meta['rounds']} interleaved "
        "rounds (glm5's decode: the rounds' range in brackets), a fresh process per measurement; machine load "
        f"average {meta['load']} during the run (other jobs share its 2 cores: numbers are noisy). STREAM-like "
        "copy bandwidth "
        f"{bw / 1e9:.1f} GB/s (median). Runtime RSS (import glm5 + torch, the kernel loaded, no model): "
        f"{base:.0f} MB; `peak - runtime` compares the rest with weights + KV cache (the peak includes prefill's "
        "activations, a 2,048-token chunk against the whole context; `peak RSS of loading` is the peak once "
        "`LLM(...)` returns: weights mapped or copied, conversions, the cache allocated). "
        f"Checkpoint shards of {SHARD}. "
        "llama.cpp: quoted from issue 19, not re-measured.",
        "",
        "| engine / weights | "
        + " | ".join(f"decode @{c}" for c in contexts)
        + " | "
        + " | ".join(f"prefill @{c}" for c in contexts if c >= 512)
        + " | peak RSS | weights + KV | peak RSS of loading |",
        "|---|" + "---:|" * (len(contexts) + sum(c >= 512 for c in contexts) + 3),
    ]
    for name, ref in LLAMA_CPP.items():
        dec = [str(ref["decode"].get(c, "")) for c in contexts]
        pre = [str(ref["prefill"].get(c, "")) for c in contexts if c >= 512]
        lines.append(
            f"| llama.cpp {name} (issue 19) | " + " | ".join(dec + pre) + f" | {LLAMA_RSS_MB[name]} MB | | |"
        )

    def spread(row: dict) -> str:  # the median, and the rounds' range when there are several
        runs = [r["decode_tok_s"] for r in row.get("runs", [])]
        lo_hi = f" ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else ""
        return f"{row['decode_tok_s']:.0f}{lo_hi}"

    for fmt, by_ctx in rows.items():
        dec = [spread(by_ctx[str(c)]) for c in contexts]
        pre = [f"{by_ctx[str(c)]['prefill_tok_s']:.0f}" for c in contexts if c >= 512]
        rss = [by_ctx[str(c)]["peak_rss"] / 2**20 for c in contexts]
        held = [(by_ctx[str(c)]["weight_bytes"] + by_ctx[str(c)]["kv_bytes"]) / 2**20 for c in contexts]
        over = max((r - base) / h for r, h in zip(rss, held))
        load = [by_ctx[str(c)].get("load_rss", 0) / 2**20 for c in contexts]
        load_over = max((r - base) / h for r, h in zip(load, held))
        lines.append(
            f"| glm5 {fmt} | " + " | ".join(dec + pre) + f" | {min(rss):.0f}-{max(rss):.0f} MB | "
            f"{min(held):.0f}-{max(held):.0f} MB (peak - runtime: x{over:.2f} max) | "
            f"{min(load):.0f}-{max(load):.0f} MB (x{load_over:.2f} max) |"
        )
    lines += [
        "",
        "Ratios to llama.cpp (decode; its counterpart format: fp32 -> F32, bf16 -> BF16, int8 and fp8 -> Q8_0) "
        "and the fraction of the bandwidth roofline (bandwidth / bytes read per decoded token):",
        "",
        "| glm5 weights | "
        + " | ".join(f"x llama.cpp @{c}" for c in contexts if c <= 8192)
        + " | "
        + " | ".join(f"roofline @{c}" for c in contexts)
        + " |",
        "|---|" + "---:|" * (sum(c <= 8192 for c in contexts) + len(contexts)),
    ]
    for fmt, by_ctx in rows.items():
        ref = LLAMA_CPP[COUNTERPART[fmt]]["decode"]
        ratio = [f"{by_ctx[str(c)]['decode_tok_s'] / ref[c]:.2f}" for c in contexts if c <= 8192]
        roof = []
        for c in contexts:
            r = by_ctx[str(c)]
            ceiling = bw / r["decode_bytes"]
            roof.append(f"{r['decode_tok_s'] / ceiling:.0%} of {ceiling:.0f}")
        lines.append(f"| {fmt} | " + " | ".join(ratio + roof) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = results["contexts"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for fmt, by_ctx in results["rows"].items():
        ax.plot(contexts, [by_ctx[str(c)]["decode_tok_s"] for c in contexts], "o-", label=f"glm5 {fmt}")
    for name, ref in LLAMA_CPP.items():
        cs = sorted(ref["decode"])
        ax.plot(cs, [ref["decode"][c] for c in cs], "x--", label=f"llama.cpp {name} (issue 19)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("batch-1 decode tok/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_info() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                wanted = ("avx2", "fma", "f16c", "avx512", "amx", "avx_vnni")
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted)))
    except OSError:
        pass
    return model, flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, contexts 32 / 2K, fp32 and fp8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--formats", default=None, help="comma-separated subset of fp32,bf16,int8,fp8")
    parser.add_argument("--contexts", default=None, help="comma-separated prompt lengths")
    parser.add_argument("--checkpoints", type=Path, default=None, help="folder to keep the checkpoints in")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="EngineConfig.decode_steps for glm5 (default: LLM's, 8; results go to bench_cpu_steps<N>.*)",
    )
    args = parser.parse_args(argv)
    formats = (args.formats or ("fp32,fp8" if args.quick else "fp32,bf16,int8,fp8")).split(",")
    contexts = [
        int(c) for c in (args.contexts or ("32,2048" if args.quick else "32,512,2048,8192,32768")).split(",")
    ]
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.checkpoints or Path(tmp)
        # keeps this process small
        made = run_in_fresh_process(worker, ("write_checkpoints", (str(root),)), 600)
        if "error" in made:
            print(f"writing the checkpoints: {made['error']}", file=sys.stderr)
            return 1
        runs: dict[tuple[str, int], list[dict]] = {}
        bandwidth = []
        baseline = run_in_fresh_process(worker, ("run_baseline", (args.threads,)), 120)["peak_rss"]
        for rnd in range(rounds):
            bandwidth.append(
                run_in_fresh_process(worker, ("run_bandwidth", (args.threads,)), 120)["bytes_per_s"]
            )
            for context in contexts:
                for fmt in formats:
                    folder = str(root / CHECKPOINT[fmt])
                    r = run_in_fresh_process(
                        worker, ("run_decode", (fmt, folder, context, args.threads, args.decode_steps)), 1800
                    )
                    if "error" in r:
                        print(f"{fmt} @{context}: {r['error']}", file=sys.stderr)
                        return 1
                    runs.setdefault((fmt, context), []).append(r)
                    print(
                        f"round {rnd + 1}/{rounds} {fmt:>4} @{context:>5}: decode {r['decode_tok_s']:.1f} tok/s, "
                        f"prefill {r['prefill_tok_s']:.0f} tok/s, peak RSS {r['peak_rss'] / 2**20:.0f} MB",
                        file=sys.stderr,
                    )
    from glm5.engine.llm import OFFLINE_DECODE_STEPS

    steps = OFFLINE_DECODE_STEPS if args.decode_steps is None else args.decode_steps
    rows: dict[str, dict[str, dict]] = {}
    for (fmt, context), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        rows.setdefault(fmt, {})[str(context)] = {**med, "kernel": rs[0]["kernel"], "runs": rs}
    cpu, flags = cpu_info()
    from glm5 import GLM5Config
    from glm5.plan import parameter_table

    results = {
        "meta": {
            "cpu": cpu,
            "simd_flags": flags,
            "threads": args.threads,
            "rounds": rounds,
            "torch": torch.__version__,
            "params": parameter_table(GLM5Config.from_preset("small")).total_main,
            "kernel": rows[formats[0]][str(contexts[0])]["kernel"],
            "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "decode_steps": steps,
            "decode_steps_default": args.decode_steps is None,
        },
        "contexts": contexts,
        "bandwidth_bytes_per_s": statistics.median(bandwidth),
        "bandwidth_runs": bandwidth,
        "baseline_rss": baseline,
        "llama_cpp_issue_19": LLAMA_CPP,
        "rows": rows,
    }
    name = "bench_cpu_quick" if args.quick else "bench_cpu"
    if args.decode_steps is not None:
        name += f"_steps{args.decode_steps}"
    save_results(args.out, name, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
