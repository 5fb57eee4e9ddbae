"""Multi-process inference (issues 15, 16): one model sharded over 1 / TP2 / EP2 / TP2 x EP2 ranks, and
data-parallel attention DP2 + EP2 with each MoE token dispatch (all-gather + reduce-scatter, all-to-all), on a CPU.

Per layout, each in a fresh process (rank 0 = that process, which spawns the other ranks itself through
`LLM(path, tensor_parallel_size=T, expert_parallel_size=E[, data_parallel_size=D, moe_dispatch=...])`):

- per-rank weight bytes: measured on rank 0's loaded shard (`state_bytes` of the engine's model; the workers'
  shards live in other processes) next to the promise of `rank_weight_bytes` for every rank;
- peak RSS after loading, per rank: VmHWM of /proc/<pid>/status of rank 0 and of every worker (pids from the
  executor), read right after the LLM is built (and again after decoding);
- load time: the LLM constructor (process group, every rank's `load_sharded`, the runners);
- greedy decode tokens/s at batch 1 and batch 8 (a `prompt`-token prompt of random ids, `new` tokens each,
  timed from the step after the prefill to the last token), with `fused_decode` off in every layout so the
  comparison is like for like (the multi-process executor forces it off), plus the 1-rank fused number;
- whether each layout's greedy tokens equal the 1-rank (unfused) output.

Every rank runs one torch thread (the workers' fixed setting; rank 0 is set to match). On the 2-core reference
machine this cannot show a speed-up: 2 ranks share 2 cores with the front end, 4 ranks oversubscribe them, and
every layer adds all-reduces over gloo. The point is correctness, the memory each rank holds, and that it runs.

    python benchmarks/bench_parallel.py            # `small` preset, 128-token prompt, 64 new tokens, 3 runs
    python benchmarks/bench_parallel.py --quick    # `tiny` preset, 32-token prompt, 16 new tokens, 1 run

Writes benchmarks/results/bench_parallel.{json,md,png} (--quick: bench_parallel_quick.*).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, run_in_fresh_process, save_results  # benchmarks/common.py

LAYOUTS = [  # (name, tp, ep, dp, MoE dispatch, fused_decode); with dp > 1, ep = dp x tp (experts over all ranks)
    ("1 rank", 1, 1, 1, None, False),
    ("TP2", 2, 1, 1, None, False),
    ("EP2", 1, 2, 1, None, False),
    ("TP2 x EP2", 2, 2, 1, None, False),
    ("DP2 + EP2, allgather", 1, 2, 2, "allgather", False),
    ("DP2 + EP2, alltoall", 1, 2, 2, "alltoall", False),
    ("1 rank, fused", 1, 1, 1, None, True),
]


def world_of(tp: int, ep: int, dp: int) -> int:
    return ep if dp > 1 else tp * ep


def vm_hwm(pid: int, field: str = "VmHWM") -> int | None:
    """Peak resident set (VmHWM; or another /proc/<pid>/status field) of a live process, in bytes; None when it
    is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def prompts_for(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=g).tolist() for _ in range(count)]


def decode(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:  # noqa: ANN001
    """Greedy decode of the prompts as one batch: (tokens/s after the prefill step, every sequence's tokens)."""
    from glm5.engine import SamplingParams

    params = SamplingParams(max_tokens=new + 1, temperature=0.0, ignore_eos=True)
    requests = [engine.make_request(None, p, params) for p in prompts]
    for r in requests:
        engine.submit(r)
    while not all(r.seqs[0].num_output >= 1 for r in requests):  # prefill (one step when it fits the budget)
        engine.step()
    done = sum(r.seqs[0].num_output for r in requests)
    start = time.perf_counter()
    while not all(r.finished for r in requests):
        engine.step()
    seconds = time.perf_counter() - start
    total = sum(r.seqs[0].num_output for r in requests) - done
    return total / seconds, [list(engine.final_output(r).outputs[0].token_ids) for r in requests]


def run_layout(
    folder: str,
    tp: int,
    ep: int,
    dp: int,
    dispatch: str | None,
    fused: bool,
    prompt_len: int,
    new: int,
    threads: int,
) -> dict:
    from glm5 import GLM5Config
    from glm5.engine import LLM
    from glm5.engine.sharding import rank_weight_bytes, state_bytes

    torch.set_num_threads(threads)
    cfg = GLM5Config.from_hf_config(folder)
    base_rss = vm_hwm(os.getpid(), "VmRSS")  # torch + glm5 imported, nothing loaded
    start = time.perf_counter()
    llm = LLM(
        folder,
        tensor_parallel_size=tp,
        expert_parallel_size=ep,
        data_parallel_size=dp,
        moe_dispatch=dispatch or "alltoall",
        fused_decode=fused,
        enable_prefix_caching=False,
        kv_cache_memory=256 << 20,
    )
    load_s = time.perf_counter() - start
    try:
        engine = llm.engine
        executor = engine.executor
        pids = {0: os.getpid(), **(executor.pids() if hasattr(executor, "pids") else {})}
        load_rss = {r: vm_hwm(pid) for r, pid in sorted(pids.items())}
        load_now = {r: vm_hwm(pid, "VmRSS") for r, pid in sorted(pids.items())}
        model = engine.model
        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        measured = state_bytes(model) if model is not None else None
        world = world_of(tp, ep, dp)
        groups = dp if dp > 1 else ep  # TP groups: data-parallel ranks, or expert-parallel replicas
        promised = {
            r: rank_weight_bytes(cfg, tp, groups, rank=r, dtype=dtype, data_parallel=dp > 1)
            for r in range(world)
        }
        decode(engine, prompts_for(cfg.vocab_size, 1, 16, seed=99), 4)  # warm-up (not timed)
        tps1, out1 = decode(engine, prompts_for(cfg.vocab_size, 1, prompt_len, seed=1), new)
        tps8, out8 = decode(engine, prompts_for(cfg.vocab_size, 8, prompt_len, seed=8), new)
        end_rss = {r: vm_hwm(pid) for r, pid in sorted(pids.items())}
        fused_on = engine.fused is not None
    finally:
        llm.shutdown()
    return {
        "tp": tp,
        "ep": ep,
        "dp": dp,
        "dispatch": dispatch,
        "world": world_of(tp, ep, dp),
        "fused_decode": fused_on,
        "dtype": str(dtype).removeprefix("torch."),
        "load_s": load_s,
        "rank0_rss_before_load": base_rss,
        "rank0_weight_bytes_measured": measured,
        "weight_bytes_promised": {str(r): b for r, b in promised.items()},
        "load_peak_rss": {str(r): b for r, b in load_rss.items()},
        "load_rss_after": {str(r): b for r, b in load_now.items()},
        "end_peak_rss": {str(r): b for r, b in end_rss.items()},
        "tokens_per_s_b1": tps1,
        "tokens_per_s_b8": tps8,
        "outputs_b1": out1,
        "outputs_b8": out8,
    }


def worker(args: tuple, queue) -> None:  # noqa: ANN001
    try:
        warnings.filterwarnings("ignore")
        queue.put(run_layout(*args))
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def write_checkpoint(preset: str, folder: str) -> tuple:
    """Random weights of the preset (seed 0, a non-zero router bias) saved with save_pretrained."""
    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.manual_seed(0)
    cfg = GLM5Config.from_preset(preset)
    model = GLM5ForCausalLM(cfg)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.01)
    model.save_pretrained(folder)
    return cfg, model.num_parameters()


# ------------------------------------------------------------------------------------------------- report
def _mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 1e6:.1f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    bases = [
        row["result"]["rank0_rss_before_load"] for row in results["rows"] if "error" not in row["result"]
    ]
    bases = [b for b in bases if b is not None]
    lo, hi = (f"{min(bases) / 1e6:.0f}", f"{max(bases) / 1e6:.0f}") if bases else ("n/a", "n/a")
    base = lo if lo == hi else f"{lo}-{hi}"
    lines = [
        f"`{meta['preset']}` preset ({meta['params'] / 1e6:.1f}M params, random weights, {meta['dtype']}), "
        f"torch {meta['torch']}, {meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch thread per rank; "
        f"greedy decode of a {meta['prompt_len']}-token prompt, {meta['new_tokens']} new tokens per sequence; "
        "each layout in a fresh process (rank 0 spawns the other ranks). Weight bytes: rank 0 measured on its "
        "loaded shard (`state_bytes`) / promised by `rank_weight_bytes` for every rank. Peak RSS: VmHWM per "
        f"rank right after loading; before loading, with torch and glm5 imported, rank 0 already holds "
        f"{base} MB (VmRSS), and every worker about as much. Same output: greedy tokens (batch 1 and batch 8) "
        f"equal the 1-rank unfused output (in every run). Times: the median of {meta['repeats']} run(s) per layout, "
        "the layouts interleaved.",
        "",
        "| layout | ranks | rank-0 weights measured (MB) | weights promised per rank (MB) "
        "| load peak RSS per rank (MB) | load time (s) | batch 1 tok/s | batch 8 tok/s | same output |",
        "|---|---:|---:|---|---|---:|---:|---:|:---:|",
    ]
    for row in results["rows"]:
        r = row["result"]
        if "error" in r:
            world = world_of(row["tp"], row["ep"], row.get("dp", 1))
            lines.append(f"| {row['name']} | {world} | {r['error']} | | | | | | |")
            continue
        promised = " / ".join(_mb(b) for b in r["weight_bytes_promised"].values())
        rss = " / ".join(_mb(b) for b in r["load_peak_rss"].values())
        same = {True: "yes", False: "**NO**", None: "(reference)"}[row["same_output"]]
        lines.append(
            f"| {row['name']} | {r['world']} | {_mb(r['rank0_weight_bytes_measured'])} | {promised} | {rss} | "
            f"{r['load_s']:.1f} | {r['tokens_per_s_b1']:.1f} | {r['tokens_per_s_b8']:.1f} | {same} |"
        )
    lines += [
        "",
        f"Per-rank columns list ranks 0 / 1 / ... . This machine has {meta['cores']} cores: the sharded layouts "
        "cannot be faster here (2 ranks plus the front end share the cores, 4 ranks oversubscribe them, and "
        "every layer adds gloo all-reduces), so the tokens/s show the cost of the collectives on a CPU, not "
        "what tensor or expert parallelism buys on accelerators. What the table shows is that every layout "
        "runs, gives the 1-rank greedy tokens, and that each rank holds and loads only its share of the "
        "weights. The fused row is the single-process engine's default CPU decode path (the fused step is not "
        "shard-aware, so the multi-process executor turns it off), for reference; its tokens can differ from "
        "the unfused path's by float rounding. The machine may be shared with other work: the tokens/s "
        "carry that noise.",
    ]
    one = next(
        (
            row["result"]
            for row in results["rows"]
            if world_of(row["tp"], row["ep"], row.get("dp", 1)) == 1 and "error" not in row["result"]
        ),
        None,
    )
    if one is not None:
        lines += [
            "",
            f"The 1-rank rows load through `GLM5ForCausalLM.from_pretrained` (LLM's single-process path), the "
            f"sharded rows through `load_sharded`: rank 0 of `1 rank` peaks at {_mb(one['load_peak_rss']['0'])} MB "
            f"while loading but holds {_mb(one['load_rss_after']['0'])} MB (VmRSS) once loaded, so its peak "
            "includes a transient copy of the weights that the sharded ranks' loading does not make.",
        ]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if "error" not in row["result"]]
    names = [row["name"] for row in rows]
    xs = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.38
    ax1.bar([x - w / 2 for x in xs], [row["result"]["tokens_per_s_b1"] for row in rows], w, label="batch 1")
    ax1.bar([x + w / 2 for x in xs], [row["result"]["tokens_per_s_b8"] for row in rows], w, label="batch 8")
    ax1.set(
        ylabel="tokens/s",
        title=f"greedy decode ({results['meta']['preset']}, {results['meta']['cores']} CPU cores)",
    )
    ax1.set_xticks(list(xs), names, rotation=20)
    ax1.legend()
    ax1.grid(axis="y", alpha=0.3)
    most = max(row["result"]["world"] for row in rows)
    w2 = 0.8 / most
    for rank in range(most):
        vals = [row["result"]["weight_bytes_promised"].get(str(rank), 0) / 1e6 for row in rows]
        ax2.bar([x - 0.4 + w2 * (rank + 0.5) for x in xs], vals, w2, label=f"rank {rank}")
    ax2.set(ylabel="MB", title="weight bytes per rank (rank_weight_bytes)")
    ax2.set_xticks(list(xs), names, rotation=20)
    ax2.legend()
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------- MoE token dispatch
DISPATCH_TOKENS = (1, 8, 64, 256)


def _dispatch_rank(rank: int, world: int, port: int, tokens: tuple, rounds: int, calls: int, queue) -> None:  # noqa: ANN001
    """One rank of the dispatch benchmark: the `small` preset's first MoE layer, sharded DP-attention over
    `world` ranks (TP 1), both dispatches timed on the same layer and inputs, interleaved."""
    import torch.distributed as dist

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.engine.sharding import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = GLM5Config.from_preset("small").replace(num_hidden_layers=2, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    plan = shard_model(model, 0, 1, rank, world, data_parallel=True)
    moe = next(m for m in model.modules() if hasattr(m, "layer_id"))
    disp = plan.dispatcher
    out: dict = {}
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for n in tokens:
            for idle in (False, True):  # idle: every rank but 0 has no tokens (they run the dummy step)
                mine = 0 if idle and rank else n
                x = torch.randn(mine, cfg.hidden_size, generator=g)
                w, idx, _ = moe.gate(x)
                for _ in range(rounds):
                    for mode in ("allgather", "alltoall"):
                        disp.mode = mode
                        dist.barrier()
                        start = time.perf_counter()
                        for _ in range(calls):
                            if mine:
                                disp.exchange(moe.layer_id, x, idx, w)
                            else:
                                x0, i0, w0 = disp._empty()
                                disp._run(disp._meta(0, -1, 0, x0.device), x0, i0, w0)
                        took = (time.perf_counter() - start) / calls
                        out.setdefault(f"{n}/{int(idle)}/{mode}", []).append(took)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def _dispatch_world(world: int, rounds: int, calls: int, queue) -> None:  # noqa: ANN001
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    inner = ctx.Queue()
    procs = [
        ctx.Process(target=_dispatch_rank, args=(r, world, port, DISPATCH_TOKENS, rounds, calls, inner))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    res = inner.get(timeout=1800)
    for p in procs:
        p.join(60)
    queue.put(res)


def dispatch_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"MoE token dispatch under data-parallel attention: one MoE layer of the `small` preset (hidden "
        f"{meta['hidden']}, {meta['experts']} experts, top-{meta['topk']}) sharded over W ranks (TP 1, experts "
        f"E/W per rank), gloo on one machine ({meta['cpu']}, {meta['cores']} cores, 1 torch thread per rank), "
        f"torch {meta['torch']}. Time per `MoEDispatcher` call on rank 0 (the exchange and the local experts), "
        f"median of {meta['rounds']} rounds of {meta['calls']} calls, the two dispatches interleaved on the same "
        "layer and inputs. 'all ranks' = every rank has N tokens; 'rank 0 only' = the others run the dummy step "
        "(0 tokens). The machine may be shared with other work: the times carry that noise.",
        "",
        "| ranks | tokens per rank | load | allgather (ms) | alltoall (ms) | alltoall / allgather |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['world']} | {row['tokens']} | {'rank 0 only' if row['idle'] else 'all ranks'} | "
            f"{row['allgather'] * 1e3:.2f} | {row['alltoall'] * 1e3:.2f} | {row['alltoall'] / row['allgather']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def dispatch_main(args: argparse.Namespace) -> int:
    from glm5 import GLM5Config

    cfg = GLM5Config.from_preset("small")
    meta = {
        "hidden": cfg.hidden_size,
        "experts": cfg.n_routed_experts,
        "topk": cfg.num_experts_per_tok,
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.repeats or 5,
        "calls": 20,
    }
    results: dict = {"meta": meta, "rows": []}
    for world in (2, 4):
        print(f"dispatch, {world} ranks ...", flush=True)
        res = run_in_fresh_process(_dispatch_world, (world, meta["rounds"], meta["calls"]), 3600)
        if "error" in res:
            raise SystemExit(f"{world} ranks: {res['error']}")
        for n in DISPATCH_TOKENS:
            for idle in (0, 1):
                row = {"world": world, "tokens": n, "idle": bool(idle)}
                for mode in ("allgather", "alltoall"):
                    row[mode] = statistics.median(res[f"{n}/{idle}/{mode}"])
                    row[f"{mode}_runs"] = res[f"{n}/{idle}/{mode}"]
                results["rows"].append(row)
    save_results(args.out, "bench_parallel_dispatch", results, dispatch_markdown(results))
    return 0


# ------------------------------------------------------------------------------ planner vs engine bytes
PLAN_LAYOUTS = [(1, 2), (2, 1), (2, 2)]  # (attention TP, DP) on `small`, loaded by the engine
PLAN_LAYOUTS_GLM5 = [(1, 8), (1, 16), (8, 2), (4, 4), (2, 16)]  # meta-built glm-5


def _planned(cfg, dtype: str, t: int, d: int, mtp: bool) -> float:  # noqa: ANN001
    from glm5.hardware import HARDWARE
    from glm5.plan import PlanSettings, device_memory, parameter_table

    s = PlanSettings(dtype=dtype, devices=t * d, attn_tp=t, mtp_steps=1 if mtp else 0)
    return device_memory(parameter_table(cfg), HARDWARE["h200"], s, t * d, t).weights


def _engine_bytes(folder: str, t: int, d: int, queue) -> None:  # noqa: ANN001
    """Rank 0's weight bytes as the engine holds them (BF16, the layout's flags), in a fresh process."""
    from glm5.engine import LLM
    from glm5.engine.sharding import state_bytes

    try:
        torch.set_num_threads(1)
        layout = {"tensor_parallel_size": t}
        if d > 1:
            layout.update(expert_parallel_size=t * d, data_parallel_size=d)
        with LLM(folder, dtype=torch.bfloat16, kv_cache_memory=16 << 20, **layout) as llm:
            queue.put({"bytes": state_bytes(llm.engine.model)})
    except Exception as e:  # report, don't hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def plan_rows(cfg, preset: str, layouts: list, dtypes: tuple, folder: str | None) -> list[dict]:  # noqa: ANN001
    from glm5.engine.sharding import rank_weight_bytes

    rows = []
    for dtype in dtypes:
        for t, d in layouts:
            row = {"preset": preset, "dtype": dtype, "tp": t, "dp": d}
            row["planned"] = _planned(cfg, dtype, t, d, mtp=True)
            row["planned_no_mtp"] = _planned(cfg, dtype, t, d, mtp=False)
            try:
                row["meta"] = {
                    str(r): rank_weight_bytes(
                        cfg, t, d, rank=r, dtype=torch.bfloat16, fp8=dtype == "fp8", data_parallel=d > 1
                    )
                    for r in range(t * d)
                }
            except ValueError as e:  # e.g. an FP8-kept split off the 128-blocks
                row["meta_error"] = str(e).split(";")[0]
                rows.append(row)
                continue
            if folder is not None and dtype == "bf16":
                res = run_in_fresh_process(_engine_bytes, (folder, t, d), 600)
                row["engine_rank0"] = res.get("bytes")
                row["engine_error"] = res.get("error")
            rows.append(row)
    return rows


def plan_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "Per-rank weight bytes: what `glm5 plan` predicts for a layout (`device_memory(...).weights`, the busiest "
        "rank; with the MTP layer, which the engine always loads) against what the engine holds for the same "
        "layout: `rank_weight_bytes` (the model built and sharded on the meta device, every rank; the largest "
        "shown) and, for `small`, rank 0's loaded shard in a real multi-process engine (`state_bytes`, BF16). "
        "Plan dtype bf16 = the BF16 checkpoint, fp8 = block FP8 kept (`--fp8 keep`). The remaining difference is "
        "the routers, which the plan counts in the checkpoint's BF16 and the engine holds in fp32. "
        f"torch {meta['torch']}, {meta['cpu']}.",
        "",
        "| model | weights | layout | planned per rank | meta-built (max over ranks) | engine rank 0 | "
        "planned / held |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        layout = f"TP{row['tp']} x DP{row['dp']}" + (f", EP{row['tp'] * row['dp']}" if row["dp"] > 1 else "")
        if "meta_error" in row:
            lines.append(
                f"| {row['preset']} | {row['dtype']} | {layout} | | refused: {row['meta_error']} | | |"
            )
            continue
        held = max(row["meta"].values())
        engine = row.get("engine_rank0")
        lines.append(
            f"| {row['preset']} | {row['dtype']} | {layout} | {_gb(row['planned'])} | {_gb(held)} | "
            f"{_gb(engine) if engine else (row.get('engine_error') or '-')} | {row['planned'] / held:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _gb(b: float) -> str:
    return f"{b / 1e9:,.3f} GB" if b >= 1e9 else f"{b / 1e6:,.2f} MB"


def plan_main(args: argparse.Namespace) -> int:
    from glm5 import GLM5Config

    results: dict = {
        "meta": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "small")
        cfg, _ = write_checkpoint("small", folder)
        results["rows"] += plan_rows(cfg, "small", PLAN_LAYOUTS, ("bf16",), folder)
    results["rows"] += plan_rows(
        GLM5Config.from_preset("glm-5"), "glm-5", PLAN_LAYOUTS_GLM5, ("bf16", "fp8"), None
    )
    save_results(args.out, "bench_parallel_plan", results, plan_markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, short prompts (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of rank 0 (the workers run 1)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; quick 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 64; quick 16)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per layout, median (default 3; quick 1)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these layouts (by name; the 1-rank reference always runs)",
    )
    parser.add_argument(
        "--dispatch",
        action="store_true",
        help="time the two MoE token dispatches (bench_parallel_dispatch.*)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="glm5 plan's per-rank weight bytes against the engine's (bench_parallel_plan.*)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.dispatch:
        return dispatch_main(args)
    if args.plan:
        return plan_main(args)
    preset = "tiny" if args.quick else "small"
    prompt_len = args.prompt_len or (32 if args.quick else 128)
    new = args.new_tokens or (16 if args.quick else 64)
    meta = {
        "preset": preset,
        "torch": torch.__version__,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "prompt_len": prompt_len,
        "new_tokens": new,
        "quick": args.quick,
    }
    results: dict = {"meta": meta, "rows": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, preset)
        cfg, meta["params"] = write_checkpoint(preset, folder)
        meta["dtype"] = cfg.torch_dtype
        repeats = args.repeats or (1 if args.quick else 3)
        meta["repeats"] = repeats
        layouts = [lay for lay in LAYOUTS if not args.only or lay[0] in args.only or lay[0] == LAYOUTS[0][0]]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in layouts}
        for rep in range(repeats):  # layouts interleaved: machine drift hits every layout alike
            for name, tp, ep, dp, dispatch, fused in layouts:
                print(f"{name} (run {rep + 1}/{repeats}) ...", flush=True)
                res = run_in_fresh_process(
                    worker, ((folder, tp, ep, dp, dispatch, fused, prompt_len, new, args.threads),), 1800
                )
                print(f"  { ({k: v for k, v in res.items() if not k.startswith('outputs')}) }", flush=True)
                runs[name].append(res)
        ok0 = [r for r in runs[layouts[0][0]] if "error" not in r]
        reference = (ok0[0]["outputs_b1"], ok0[0]["outputs_b8"]) if ok0 else None
        for i, (name, tp, ep, dp, dispatch, fused) in enumerate(layouts):
            ok = [r for r in runs[name] if "error" not in r]
            if not ok:
                res, same = runs[name][0], None
            else:
                res = dict(ok[0])  # memory and bytes of the first run; timings: the median over the runs
                for key in ("load_s", "tokens_per_s_b1", "tokens_per_s_b8"):
                    res[key] = statistics.median(r[key] for r in ok)
                res["runs"] = [
                    {k: r[k] for k in ("load_s", "tokens_per_s_b1", "tokens_per_s_b8")} for r in ok
                ]
                res["failed_runs"] = len(runs[name]) - len(ok)
                agree = reference is not None and all(
                    (r["outputs_b1"], r["outputs_b8"]) == reference for r in ok
                )
                same = (None if agree else False) if i == 0 else agree
            results["rows"].append(
                {
                    "name": name,
                    "tp": tp,
                    "ep": ep,
                    "dp": dp,
                    "dispatch": dispatch,
                    "fused": fused,
                    "same_output": same,
                    "result": res,
                }
            )
    meta["total_s"] = time.perf_counter() - t0
    stem = "bench_parallel_quick" if args.quick else "bench_parallel"
    save_results(args.out, stem, results, markdown(results), plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
