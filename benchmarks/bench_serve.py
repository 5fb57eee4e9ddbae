"""The OpenAI-compatible server under load: throughput and latency percentiles at 1 / 8 / 32 concurrent clients.

The server is the real `glm5 serve` command in its own process (bench-tiny config, random weights, a tokenizer
trained on the fly, saved as a checkpoint folder); clients stream /v1/completions over HTTP (token-id prompts of
`--prompt-len` tokens, `--max-tokens` new tokens each, ignore_eos). Each level sends `--requests-per-client` x
concurrency requests, each client sending its next request when the previous one ends. Reported per level:
output tokens/s, requests/s, and p50 / p90 / p99 of time to first token (TTFT), inter-token latency (ITL, between
streamed chunks) and end-to-end latency. The peer in the same run is the engine itself, in-process without HTTP
(`LLM.generate` of the same requests): the ratio is what the HTTP layer, SSE and the asyncio front end cost.

    python benchmarks/bench_serve.py            # 32-token prompts, 64 new tokens, 4 requests per client
    python benchmarks/bench_serve.py --quick    # 16 new tokens, 2 requests per client

Writes benchmarks/results/bench_serve.{json,md} (--quick: bench_serve_quick.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import CONFIG_PATH, RESULTS, save_results  # benchmarks/common.py

LEVELS = (1, 8, 32)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def make_checkpoint(folder: Path) -> None:
    """bench-tiny with random weights + a BPE tokenizer trained on a few stdlib files, saved as a checkpoint."""
    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.tokenizer import GLM5Tokenizer
    from glm5.tokenizer.tokenizer import default_corpus_files

    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    root = Path(sysconfig.get_paths()["stdlib"])
    tok = GLM5Tokenizer.train(
        [f for f in default_corpus_files() if f.parent == root][:6], vocab_size=cfg.vocab_size
    )
    torch.manual_seed(0)
    GLM5ForCausalLM(cfg.replace(eos_token_id=tok.eos_token_ids)).save_pretrained(str(folder))
    tok.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, threads: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "glm5.cli",
        "serve",
        "--model",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--log-level",
        "warning",
        "--max-model-len",
        "1024",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server did not come up within 300 s")


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {
        "ttft": stamps[0] - start if stamps else end - start,
        "e2e": end - start,
        "tokens": tokens,
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
    }


async def run_level(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    queue = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                results.append(await one_request(client, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    e2e = [r["e2e"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    row = {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "requests_s": len(results) / wall,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = percentile(values, q) * 1000
        row[f"{name}_mean_ms"] = statistics.fmean(values) * 1000 if values else float("nan")
    return row


def engine_throughput(folder: Path, prompts: list[list[int]], max_tokens: int, threads: int) -> float:
    """Output tokens/s of the same requests through `LLM.generate` in this process (no HTTP)."""
    from glm5.engine import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(str(folder), max_model_len=1024)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([[7] * len(prompts[0])], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        "# bench_serve: `glm5 serve` under concurrent streaming clients",
        "",
        f"bench-tiny config, random weights, {m['prompt_len']}-token prompts, {m['max_tokens']} new tokens per "
        f"request, greedy, {m['threads']} torch thread(s); {m['machine']}. Clients stream /v1/completions over "
        "HTTP on loopback; engine = the same requests through `LLM.generate` in-process.",
        "",
        "| clients | requests | output tok/s | req/s | engine tok/s | HTTP / engine | TTFT p50 / p90 / p99 (ms) "
        "| ITL p50 / p90 / p99 (ms) | e2e p50 / p90 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results["rows"]:

        def pct(k: str, r: dict = r) -> str:
            return " / ".join(f"{r[f'{k}_p{q}_ms']:.0f}" for q in (50, 90, 99))

        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | {r['requests_s']:.2f} | "
            f"{r['engine_tok_s']:.1f} | {r['output_tok_s'] / r['engine_tok_s']:.2f} | {pct('ttft')} | {pct('itl')} | "
            f"{pct('e2e')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 requests per client")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--requests-per-client", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    per_client = args.requests_per_client or (2 if args.quick else 4)
    results: dict = {
        "meta": {
            "prompt_len": args.prompt_len,
            "max_tokens": max_tokens,
            "threads": args.threads,
            "requests_per_client": per_client,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        make_checkpoint(folder)
        port = free_port()
        server = start_server(folder, port, args.threads)
        try:
            g = torch.Generator().manual_seed(0)
            for level in LEVELS:
                prompts = [
                    torch.randint(1, 8000, (args.prompt_len,), generator=g).tolist()
                    for _ in range(level * per_client)
                ]
                warm = [[7] * args.prompt_len]  # shares no cached block with the measured prompts
                asyncio.run(run_level(f"http://127.0.0.1:{port}", warm, 1, 4))
                row = asyncio.run(run_level(f"http://127.0.0.1:{port}", prompts, level, max_tokens))
                results["rows"].append(row)
                print(
                    f"{level} clients: {row['output_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(60)
        for row, level in zip(results["rows"], LEVELS):
            g = torch.Generator().manual_seed(0)
            prompts = [
                torch.randint(1, 8000, (args.prompt_len,), generator=g).tolist()
                for _ in range(level * per_client)
            ]
            row["engine_tok_s"] = engine_throughput(folder, prompts, max_tokens, args.threads)
    stem = "bench_serve_quick" if args.quick else "bench_serve"
    save_results(args.out, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
