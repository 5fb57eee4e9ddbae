"""glm5's inference engine vs HF transformers `generate` on the bench-tiny config with identical weights.

Workloads (docs/performance.md § bench_engine.py, issue 6):
- batch-1 greedy decode tokens/s at context 32 / 2K / 8K / 16K, and the time to first token of that prompt;
- throughput at 1 / 8 / 32 concurrent sequences (32-token prompts, 64 new tokens each); HF runs them one
  after another, glm5 batches them continuously;
- peak memory (RSS) of each of those runs, each in a fresh process;
- MTP speculative decoding: a tiny model with an MTP layer is trained briefly on a synthetic phrase corpus, then
  decodes with 0-3 draft tokens: acceptance length, tokens/s, speed-up, and whether the output equals plain
  greedy decoding;
- batch-1 decode on the `small` preset as a fraction of the memory-bandwidth roofline (active weight bytes per
  token / ~25 GB/s, docs/performance.md § Machine limits).

HF decodes from a prefilled cache: `generate(input_ids, past_key_values=...)` after one prefill forward, so its
decode rate is not diluted by prefill; glm5 is timed from its first token to its last. The decode rows also run
glm5's engine with `fused_decode=False` ("model forward only": every decode step is GLM5ForCausalLM.forward), to
show what the fused step and its native kernel (glm5/engine/fused.py, glm5/kernels/decode_layer.c) add.

    python benchmarks/bench_engine.py               # the full run (~30-40 minutes on 2 cores: HF's 16K prefill)
    python benchmarks/bench_engine.py --quick       # contexts 32 / 2K, 1 / 8 sequences, short MTP training

Writes benchmarks/results/bench_engine.{json,md,png} (--quick: bench_engine_quick.*).
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
from common import CONFIG_PATH, RESULTS, build, run_in_fresh_process, save_results  # benchmarks/common.py

BANDWIDTH = 25e9
"""Bytes/s of weight streaming on the reference 2-core machine (docs/performance.md § Machine limits: ~23-29 GB/s)."""


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompts_for(cfg, count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(count)]


# ------------------------------------------------------------------------------------------------- workers
@torch.no_grad()
def run_decode(impl: str, ctx: int, new: int, weights: str, threads: int) -> dict:
    """Batch-1 greedy decode after a ctx-token prompt: time to first token, then tokens/s over `new` tokens."""
    cfg, model = build("glm5" if impl.startswith("glm5") else impl, weights, threads)
    (prompt,) = prompts_for(cfg, 1, ctx, seed=ctx)
    if impl.startswith("glm5"):
        from glm5.engine import LLM, SamplingParams

        # "glm5-model": the engine without its fused decode step (every decode step is the model's forward)
        engine = LLM(model, fused_decode=impl == "glm5").engine
        start = time.perf_counter()
        engine.add_request("r", prompt, SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True))
        seq = None
        while seq is None or seq.num_output == 0:
            engine.step()
            seq = engine.requests["r"].seqs[0]
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        seconds = time.perf_counter() - start
    else:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        first = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            input_ids=torch.cat([ids, first], 1),
            past_key_values=out.past_key_values,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
        seconds = time.perf_counter() - start
    return {"tokens_per_s": new / seconds, "ttft_s": ttft, "peak_rss": peak_rss()}


@torch.no_grad()
def run_throughput(impl: str, concurrency: int, new: int, weights: str, threads: int) -> dict:
    """`concurrency` 32-token prompts, `new` greedy tokens each: generated tokens per second of wall time."""
    cfg, model = build(impl, weights, threads)
    prompts = prompts_for(cfg, concurrency, 32, seed=concurrency)
    start = time.perf_counter()
    if impl == "glm5":
        from glm5.engine import LLM, SamplingParams

        outs = LLM(model).generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
        seconds = time.perf_counter() - start
        extra = {"mean_ttft_s": statistics.mean(o.metrics.time_to_first_token for o in outs)}
    else:
        for p in prompts:  # HF generate has no continuous batching: one request after another
            model.generate(
                input_ids=torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
        seconds = time.perf_counter() - start
        extra = {}
    return {"tokens_per_s": concurrency * new / seconds, "seconds": seconds, "peak_rss": peak_rss(), **extra}


def run_roofline(preset: str, threads: int) -> dict:
    """glm5 batch-1 decode on a preset (random weights, fp32) against active weight bytes / bandwidth."""
    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine import LLM, SamplingParams
    from glm5.plan import parameter_table

    torch.set_num_threads(threads)
    cfg = GLM5Config.from_preset(preset).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    engine = LLM(model).engine
    (prompt,) = prompts_for(cfg, 1, 32, seed=1)
    engine.add_request("r", prompt, SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True))
    engine.step()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    tps = 64 / (time.perf_counter() - start)
    active = parameter_table(cfg).active_with_head * 4  # fp32 bytes streamed per token
    roof = BANDWIDTH / active
    return {
        "preset": preset,
        "tokens_per_s": tps,
        "active_weight_bytes": active,
        "roofline_tokens_per_s": roof,
        "fraction": tps / roof,
        "peak_rss": peak_rss(),
    }


def worker(fn_name: str, args: tuple, queue) -> None:
    try:
        warnings.filterwarnings("ignore")
        queue.put(globals()[fn_name](*args))
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def in_fresh_process(fn_name: str, args: tuple, timeout: float) -> dict:
    return run_in_fresh_process(worker, (fn_name, args), timeout)


# ------------------------------------------------------------------------------------------------- MTP
def phrase_corpus(vocab: int, num_phrases: int, phrase_len: int, seed: int):
    """Sequences that concatenate random phrases from a fixed phrase book: inside a phrase the next tokens are
    determined (an MTP layer can learn them), at phrase boundaries they are not."""
    g = torch.Generator().manual_seed(seed)
    book = torch.randint(2, vocab, (num_phrases, phrase_len), generator=g)

    def batch(n: int, length: int) -> torch.Tensor:
        picks = torch.randint(0, num_phrases, (n, length // phrase_len + 2), generator=g)
        offset = torch.randint(0, phrase_len, (n,), generator=g)
        seqs = book[picks].reshape(n, -1)
        return torch.stack([seqs[i, offset[i] : offset[i] + length] for i in range(n)])

    return batch


def run_mtp(steps: int, new: int, threads: int) -> dict:
    """Train a small GLM-5 with MTP on the phrase corpus, then decode with 0..3 draft tokens."""
    import torch.nn.functional as F

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine import LLM, SamplingParams, SpecMetrics

    torch.set_num_threads(threads)
    # 8 layers so that one MTP layer costs about what it costs in GLM-5 relative to the model (1 of 79 layers
    # there; on a CPU every layer costs about the same here, whatever its width)
    cfg = GLM5Config.from_preset("tiny").replace(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=8,
        intermediate_size=256,
        moe_intermediate_size=64,
        q_lora_rank=64,
        kv_lora_rank=32,
        eos_token_id=[0],
    )
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg)
    batch = phrase_corpus(cfg.vocab_size, num_phrases=48, phrase_len=8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        x = batch(16, 65)
        # three MTP depths with shared parameters, as GLM-5 trains them: depth d predicts token t + d + 2, and
        # the drafter applies the module recursively the same way
        out = model(x[:, :-1], mtp_depth=3)
        lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        mtp = (
            sum(
                F.cross_entropy(lg[:, : 63 - d].flatten(0, 1), x[:, d + 2 :].flatten())
                for d, lg in enumerate(out.mtp_logits)
            )
            / 3
        )
        (lm + 0.3 * mtp).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((lm.item(), mtp.item()))
    train_s = time.perf_counter() - start
    model.eval()
    prompts = batch(4, 32).tolist()
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    rows, reference = [], None
    # plain greedy one token per engine step (what speculation was first measured against), plain greedy as LLM
    # runs it by default (OFFLINE_DECODE_STEPS tokens per kernel call), then 1-3 drafts (speculation steps one
    # verification at a time whatever decode_steps says)
    for k, decode_steps in ((0, 1), (0, None), (1, None), (2, None), (3, None)):
        options = {} if decode_steps is None else {"decode_steps": decode_steps}
        llm = LLM(model, num_speculative_tokens=k, enable_prefix_caching=False, **options)
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
        if k:
            llm.engine.drafter.metrics = SpecMetrics()
        times, decode_times, outputs = [], [], []
        engine = llm.engine
        for i, p in enumerate(prompts):  # batch 1, one prompt at a time
            t0 = time.perf_counter()
            request = engine.make_request(f"k{k}-{i}", p, params)
            engine.submit(request)
            seq = request.seqs[0]
            while seq.num_output == 0:  # the prefill, ending with the first token
                engine.step()
            t1 = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            t2 = time.perf_counter()
            outputs.append(list(seq.output_ids))
            times.append(t2 - t0)
            decode_times.append((t2 - t1) / (seq.num_output - 1))
        reference = outputs if k == 0 else reference
        m = llm.engine.spec_metrics
        rows.append(
            {
                "k": k,
                "decode_steps": llm.engine.config.decode_steps,
                "tokens_per_s": len(prompts) * new / sum(times),
                "decode_tokens_per_s": len(prompts) / sum(decode_times),
                "acceptance_length": m.mean_acceptance_length if m else 1.0,
                "acceptance_rate": m.acceptance_rate if m else None,
                "accepted_per_position": m.accepted_per_position if m else [],
                "equals_plain_greedy": outputs == reference,
            }
        )
    for r in rows:  # against one token per step, and against LLM's default plain decode
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        r["decode_speedup_vs_default"] = r["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
    return {
        "train_steps": steps,
        "train_seconds": train_s,
        "final_lm_loss": losses[-1][0],
        "final_mtp_loss": losses[-1][1],
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"bench-tiny ({meta['params'] / 1e6:.1f}M params), fp32, torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['cpu']}; median of {meta['repeats']} runs, each in a fresh process, glm5 and HF interleaved; "
        f"glm5/HF logits max diff "
        f"{meta['parity_max_abs_diff']:.1e}.",
        "",
        "| workload | HF | glm5 | glm5 / HF | glm5, model forward only | HF peak RSS | glm5 peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        hf, ours = row["hf"], row["glm5"]
        if "error" in hf or "error" in ours:
            lines.append(f"| {row['name']} | {hf.get('error', '')} | {ours.get('error', '')} | | | | |")
            continue
        key, unit, fmt = row["metric"]
        ratio = ours[key] / hf[key] if key == "tokens_per_s" else hf[key] / ours[key]
        plain = row.get("glm5-model")
        plain_cell = (
            ""
            if not plain or "error" in plain or row["kind"] != "decode"
            else f"{fmt.format(plain[key])} {unit}"
        )
        lines.append(
            f"| {row['name']} | {fmt.format(hf[key])} {unit} | {fmt.format(ours[key])} {unit} | "
            f"**{ratio:.1f}x** | {plain_cell} | {hf['peak_rss'] / 1e9:.2f} GB | {ours['peak_rss'] / 1e9:.2f} GB |"
        )
    mtp = results.get("mtp")
    if mtp and "error" not in mtp:
        lines += [
            "",
            f"MTP speculative decoding, batch 1, greedy: a tiny model with an MTP layer trained "
            f"{mtp['train_steps']} steps ({mtp['train_seconds']:.0f} s) on a synthetic phrase corpus "
            f"(final LM loss {mtp['final_lm_loss']:.2f}, MTP loss {mtp['final_mtp_loss']:.2f}).",
            "",
            "Decode: the tokens after the first, per second of the steps that made them; end to end: every token "
            "of `max_tokens` over the whole request, prefill (the MTP layer's too) included.",
            "",
            "Speed-ups against plain greedy decoding one token per engine step (the first row) and, in the last "
            "speed-up column, against plain greedy as `LLM` runs it by default (several tokens per kernel call, "
            "the second row).",
            "",
            "| draft tokens | acceptance length | acceptance rate | decode tok/s | decode speed-up | end-to-end "
            "tok/s | end-to-end speed-up | decode vs `LLM`'s plain default | output = plain greedy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for r in mtp["rows"]:
            rate = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            name = f"0, {r['decode_steps']} per step" if r["k"] == 0 else str(r["k"])
            lines.append(
                f"| {name} | {r['acceptance_length']:.2f} | {rate} | {r['decode_tokens_per_s']:.0f} | "
                f"{r['decode_speedup']:.2f}x | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                f"{r.get('decode_speedup_vs_default', 1.0):.2f}x | {'yes' if r['equals_plain_greedy'] else 'NO'} |"
            )
    roof = results.get("roofline")
    if roof and "error" not in roof:
        lines += [
            "",
            f"Roofline (`{roof['preset']}` preset, fp32, batch-1 decode): {roof['tokens_per_s']:.0f} tok/s "
            f"vs {roof['roofline_tokens_per_s']:.0f} tok/s for {roof['active_weight_bytes'] / 1e6:.0f} MB of "
            f"active weights at {BANDWIDTH / 1e9:.0f} GB/s: **{roof['fraction']:.0%} of the roofline**.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = lambda r: "error" not in r["hf"] and "error" not in r["glm5"]  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, ax, xlabel, title in (
        ("decode", ax1, "context tokens", "batch-1 decode (bench-tiny, CPU)"),
        ("throughput", ax2, "concurrent sequences", "throughput"),
    ):
        rows = [r for r in results["rows"] if r["kind"] == kind and ok(r)]
        xs = [r["size"] for r in rows]
        for impl, style in (("hf", "o--"), ("glm5", "s-"), ("glm5-model", "^:")):
            if all(impl in r and "error" not in r[impl] for r in rows):
                label = "glm5, model forward only" if impl == "glm5-model" else impl
                ax.plot(xs, [r[impl]["tokens_per_s"] for r in rows], style, label=label)
        ax.set(xlabel=xlabel, ylabel="tokens/s", title=title, yscale="log")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_parity(weights: str, threads: int) -> float:
    cfg, ours = build("glm5", weights, threads)
    _, ref = build("hf", weights, threads)
    ids = torch.randint(
        0, cfg.vocab_size, (1, 2 * cfg.index_topk), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return (ours(ids).logits - ref(input_ids=ids, use_cache=False).logits).abs().max().item()


def workloads(quick: bool) -> list[tuple]:
    """(worker, size, row name, kind, (metric key, unit, format), worker args) per comparison row."""
    contexts = [32, 2048] if quick else [32, 2048, 8192, 16384]
    new = 16 if quick else 64
    decode = ("tokens_per_s", "tok/s", "{:.1f}")
    work = [("run_decode", c, f"decode at context {c:,}", "decode", decode, (c, new)) for c in contexts]
    ttft = ("ttft_s", "s", "{:.3f}")
    work += [
        ("run_decode", c, f"time to first token, {c:,}-token prompt", "ttft", ttft, (c, new))
        for c in contexts
        if c >= 2048
    ]
    throughput = ("tokens_per_s", "tok/s", "{:.0f}")
    work += [
        ("run_throughput", n, f"throughput, {n} concurrent x 64 tokens", "throughput", throughput, (n, 64))
        for n in ([1, 8] if quick else [1, 8, 32])
    ]
    return work


def bench_weights(path: str) -> int:
    """Save bench-tiny weights (seed 0, a realistic non-zero router bias) in HF names; returns the parameters."""
    from safetensors.torch import save_file

    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.from_hf_config(CONFIG_PATH))
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.01)
    save_file({k: v.contiguous() for k, v in model.hf_state_dict(fused_experts=True).items()}, path)
    return model.num_parameters()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per measurement, median (default 3; quick 1)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    work = workloads(args.quick)
    meta = {
        "config": "bench-tiny",
        "torch": torch.__version__,
        "threads": args.threads,
        "dtype": "float32",
        "quick": args.quick,
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
    }
    results: dict = {"meta": meta, "rows": []}
    measured: dict[tuple, dict] = {}
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with tempfile.TemporaryDirectory() as tmp, Progress(*columns) as progress:
        weights = os.path.join(tmp, "weights.safetensors")
        meta["params"] = bench_weights(weights)
        meta["parity_max_abs_diff"] = check_parity(weights, args.threads)
        repeats = args.repeats or (1 if args.quick else 3)
        meta["repeats"] = repeats
        runs_per_repeat = sum(3 if w[3] == "decode" else 2 for w in work)
        task = progress.add_task("benchmark", total=runs_per_repeat * repeats + 2)
        for fn, size, name, kind, metric, fn_args in work:
            row = {"name": name, "kind": kind, "size": size, "metric": metric}
            impls = ("hf", "glm5", "glm5-model") if kind == "decode" else ("hf", "glm5")
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(repeats):
                for impl in impls:  # interleaved: machine drift hits every side alike
                    progress.update(task, description=f"{name}: {impl}")
                    key = (fn, impl, fn_args)
                    if key not in measured:  # the TTFT rows reuse the decode runs
                        runs[impl].append(in_fresh_process(fn, (impl, *fn_args, weights, args.threads), 1800))
                    progress.advance(task)
            for impl, got in runs.items():
                key = (fn, impl, fn_args)
                ok = [r for r in got if "error" not in r]
                if key not in measured:
                    measured[key] = {k: statistics.median(r[k] for r in ok) for k in ok[0]} if ok else got[0]
                row[impl] = measured[key]
            results["rows"].append(row)
        progress.update(task, description="MTP: train + speculative decode")
        mtp_args = (120, 48, args.threads) if args.quick else (400, 96, args.threads)
        results["mtp"] = in_fresh_process("run_mtp", mtp_args, 3600)
        progress.advance(task)
        progress.update(task, description="roofline: small preset")
        results["roofline"] = in_fresh_process("run_roofline", ("small", args.threads), 1800)
        progress.advance(task)
    stem = "bench_engine_quick" if args.quick else "bench_engine"
    save_results(args.out, stem, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
