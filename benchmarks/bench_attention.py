"""CPU decode at GLM-5's attention widths: the native kernel next to the fused step's torch back end and the model.

`small` has 8 heads of 144-wide latents and a top-256 DSA; GLM-5 has 64 heads of 576-wide latents (512 + 64 rope),
a 192-wide nope part, 256-wide values and a top-2048 DSA scored by 32 indexer heads of 128. This benchmark keeps
exactly those attention widths on a 2-layer model with a small hidden size and FFN (random fp32 weights written by
save_pretrained), so that a decode step is mostly attention and the indexer: what a CPU server decoding GLM-5 at
long context spends besides streaming the weights. Batch-1 greedy decode after a prompt of 2K tokens (every key
attended: context <= top-k) and 8K (DSA: 2,048 selected of 8K), `LLM`'s defaults, a fresh process per measurement,
rounds interleaved, medians of decode tok/s for:

- `native`: the fused decode step in the native kernel (glm5/kernels/decode_layer.c);
- `torch`: the same fused step on its torch back end (GLM5_NATIVE=0), the peer in this run;
- `model`: the model's own decode forward (EngineConfig.fused_decode=False).

    python benchmarks/bench_attention.py            # 3 rounds, contexts 2K / 8K
    python benchmarks/bench_attention.py --quick    # 1 round, context 2K

Writes benchmarks/results/bench_attention.{json,md,png} (--quick: bench_attention_quick.*).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, run_in_fresh_process, save_results  # benchmarks/common.py

VARIANTS = ("native", "torch", "model")
DECODE_TOKENS = 64
GLM5_ATTENTION = dict(  # GLM-5's attention and indexer widths (docs/model.md), the rest small
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=64,
    num_key_value_heads=64,
    q_lora_rank=256,
    kv_lora_rank=512,
    qk_nope_head_dim=192,
    qk_rope_head_dim=64,
    v_head_dim=256,
    index_n_heads=32,
    index_head_dim=128,
    index_topk=2048,
    index_topk_pattern=None,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    num_nextn_predict_layers=0,
    max_position_embeddings=16384,
    torch_dtype="float32",
)


def write_checkpoint(folder: str, queue) -> None:  # noqa: ANN001
    import torch

    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    GLM5ForCausalLM(GLM5Config.from_preset("tiny").replace(**GLM5_ATTENTION)).save_pretrained(folder)
    queue.put({"ok": True})


def decode(folder: str, variant: str, context: int, threads: int, queue) -> None:  # noqa: ANN001
    if variant == "torch":
        os.environ["GLM5_NATIVE"] = "0"  # read when the kernel would first load
    import torch

    from glm5.engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    options = {"fused_decode": False} if variant == "model" else {}
    llm = LLM(folder, max_model_len=context + DECODE_TOKENS + 32, max_num_seqs=1, **options)
    engine = llm.engine
    prompt = torch.randint(1, 512, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    engine.add_request(
        "r", prompt, SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    )
    seq = None
    while seq is None or seq.num_output == 0:  # prefill and the first token
        engine.step()
        seq = engine.requests["r"].seqs[0]
    start, first = time.perf_counter(), seq.num_output
    while engine.has_unfinished_requests():
        engine.step()
    queue.put({"tok_per_s": (DECODE_TOKENS - first) / (time.perf_counter() - start)})


def markdown(results: dict) -> str:
    contexts = results["contexts"]
    lines = [
        f"# bench_attention: GLM-5's attention widths on a 2-layer model, batch-1 greedy decode of {DECODE_TOKENS} "
        f"tokens, {results['threads']} threads",
        "",
        f"{results['machine']}. 64 heads, latents 512 + 64, nope 192, v 256, DSA top-2048 scored by 32 x 128 "
        f"indexer heads; hidden 256. Medians of {results['rounds']} interleaved rounds (the rounds' range in "
        "brackets), a fresh process per measurement. `torch` is the same fused step on its torch back end, "
        "`model` the model's decode forward.",
        "",
        "| decode tok/s | " + " | ".join(f"context {c}" for c in contexts) + " |",
        "|---|" + "---:|" * len(contexts),
    ]
    for v in VARIANTS:
        cells = []
        for c in contexts:
            runs = results["runs"][v][str(c)]
            cells.append(
                f"{statistics.median(runs):.1f} ({min(runs):.1f}-{max(runs):.1f})" if runs else "failed"
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    for peer in VARIANTS[1:]:
        cells = []
        for c in contexts:
            a, b = results["runs"]["native"][str(c)], results["runs"][peer][str(c)]
            cells.append(f"{statistics.median(a) / statistics.median(b):.2f}x" if a and b else "-")
        lines.append(f"| native / {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = results["contexts"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        meds = [statistics.median(r) if (r := results["runs"][v][str(c)]) else 0.0 for c in contexts]
        ax.bar([k + i * width for k in range(len(contexts))], meds, width, label=v)
    ax.set_xticks([k + width for k in range(len(contexts))], [f"context {c}" for c in contexts])
    ax.set_ylabel("decode tok/s")
    ax.set_title("GLM-5 attention widths, 2 layers, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, context 2K")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    contexts = [2048] if args.quick else [2048, 8192]

    from bench_cpu import cpu_info

    from glm5.kernels import native

    cpu, flags = cpu_info()
    machine = f"{cpu}; flags {flags}; native kernel: {native.isa() or 'unavailable'}"
    runs: dict[str, dict[str, list[float]]] = {v: {str(c): [] for c in contexts} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_attention_") as folder:
        made = run_in_fresh_process(write_checkpoint, (folder,), 600)
        if "error" in made:
            print(f"writing the checkpoint failed: {made['error']}", file=sys.stderr)
            return 1
        for r in range(rounds):
            for c in contexts:
                for v in VARIANTS:
                    got = run_in_fresh_process(decode, (folder, v, c, args.threads), 1800)
                    if "error" in got:
                        print(f"round {r + 1}/{rounds} {v} @ {c}: {got['error']}", file=sys.stderr)
                        continue
                    runs[v][str(c)].append(got["tok_per_s"])
                    print(
                        f"round {r + 1}/{rounds} {v:>6} @ {c}: decode {got['tok_per_s']:.1f} tok/s",
                        flush=True,
                    )
    results = {
        "machine": machine,
        "threads": args.threads,
        "rounds": rounds,
        "contexts": contexts,
        "runs": runs,
    }
    save_results(
        args.out,
        "bench_attention_quick" if args.quick else "bench_attention",
        results,
        markdown(results),
        plot,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
