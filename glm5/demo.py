"""`make demo`: the whole GLM-5 lifecycle on a laptop CPU in about ten minutes.

1. Plan: what the real 744B GLM-5 needs on H200s (parameters, memory, devices, decode roofline).
2. Pre-train a tiny GLM-5 with every feature on (tokenizer trained offline, MLA + DSA dense/warm-up/sparse
   stages, MoE with aux-loss-free balancing, MTP) on the CPython standard library + synthetic GLM chat tasks.
3. Evaluate it (accuracy, abstention and hallucination rates, perplexity).
4. Asynchronous RL with the abstention-aware reward (+1 right / 0 "I don't know" / -1 wrong).
5. Evaluate again and compare.
6. Export the RL policy in the HF layout and as a block-FP8 checkpoint.
7. Serve the FP8 checkpoint (OpenAI-compatible) and query it with the `openai` SDK: a streamed answer with
   thinking, and a calculator tool call answered and continued.
8. A summary table; `runs/demo/report.md` holds the numbers and the plots.

`python -m glm5.demo --smoke` runs the same steps at toy sizes in about a minute (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


class Timer:
    """Wall time of each demo stage, for the summary."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, since: float) -> None:
        self.stages[name] = time.perf_counter() - since

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def plan_glm5() -> dict[str, Any]:
    """The planner's headline figures for GLM-5 in FP8 on H200, 200K context x 32 users."""
    from glm5.config import GLM5Config
    from glm5.hardware import get_hardware
    from glm5.plan import PlanSettings, parameter_table, plan

    cfg = GLM5Config.from_preset("glm-5")
    table = parameter_table(cfg)
    p = plan(cfg, get_hardware("h200"), PlanSettings(dtype="fp8", context=200_000, concurrency=32), "glm-5")
    return {
        "total_params": table.total_main,
        "active_params": table.active_no_embed,
        "bf16_gb": table.bf16_bytes() / 1e9,
        "fp8_gb": table.fp8_bytes() / 1e9,
        "devices": p.devices,
        "layout": f"TP{p.attn_tp} x DP{p.devices // p.attn_tp} attention, EP{p.devices}",
        "decode_tok_s_per_user": p.decode_per_user,
    }


def pretrain(out: Path, smoke: bool) -> dict[str, Any]:
    from glm5.train import Trainer, recipe_preset

    recipe = recipe_preset("smoke" if smoke else "demo")
    if smoke:
        tasks = {**recipe.data.chat_tasks, "easy_arithmetic": 40}
        recipe = recipe.replace(
            eval_tasks={"easy_arithmetic": 1, "unanswerable": 1},
            data=dataclasses.replace(recipe.data, chat_tasks=tasks),
        )
    summary = Trainer(recipe, out).run()
    return {"recipe": "smoke" if smoke else "demo", **summary}


def evaluate(model_dir: Path, data_dir: Path, out: Path, num: int) -> Any:
    from glm5.eval import GenerationOptions, LocalBackend, evaluate, write_report

    tasks = ["easy_arithmetic", "unanswerable", "tool_use", "perplexity"]
    result = evaluate(
        LocalBackend(str(model_dir)),
        tasks,
        num=num,
        perplexity_source=data_dir,
        options=GenerationOptions(max_tokens=48),
        num_windows=16,
    )
    write_report(result, out)
    return result


def reinforce(init: Path, out: Path, smoke: bool) -> dict[str, Any]:
    from glm5.rl.cli import run_rl
    from glm5.rl.recipes import recipe_preset

    recipe = recipe_preset("math-abstain")
    recipe = recipe.replace(steps=2, eval_prompts=4) if smoke else recipe.replace(steps=24, eval_prompts=12)
    return run_rl(recipe, out, init=str(init))


def export_fp8(src: Path, dst: Path) -> dict[str, Any]:
    from glm5.checkpoint.convert import convert_checkpoint

    if dst.exists():
        shutil.rmtree(dst)
    convert_checkpoint(src, dst, "fp8")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    return {"hf_dir": str(src), "fp8_dir": str(dst), "hf_bytes": size(src), "fp8_bytes": size(dst)}


def serve_and_query(model_dir: Path) -> dict[str, Any]:
    """Start `glm5 serve` on 127.0.0.1 in a thread and talk to it with the openai SDK."""
    from openai import OpenAI

    from glm5.data.tasks import CALCULATOR_TOOL, calculator
    from glm5.serve.app import create_app
    from glm5.serve.core import ServerConfig
    from glm5.serve.server import ServerThread, build_engine

    engine = build_engine(str(model_dir), fp8="keep")
    server = ServerThread(create_app(engine, ServerConfig(model_name="glm5-demo"))).start()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        question = "Calculate 3 + 4."
        reasoning, content, usage = "", "", None
        stream = client.chat.completions.create(
            model="glm5-demo",
            messages=[{"role": "user", "content": question}],
            max_tokens=48,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                content += choice.delta.content or ""
        tool_question = "What is 12345 * 678?"
        messages: list[dict[str, Any]] = [{"role": "user", "content": tool_question}]
        first = client.chat.completions.create(
            model="glm5-demo",
            messages=messages,
            tools=[CALCULATOR_TOOL],
            max_tokens=48,
            temperature=0.0,
            tool_choice={"type": "function", "function": {"name": "calculator"}},
        )
        msg = first.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
        final = None
        if msg.tool_calls:
            call = msg.tool_calls[0]
            try:
                result = calculator(json.loads(call.function.arguments).get("expression", ""))
            except (ValueError, AttributeError):
                result = "error: the arguments are not a JSON object with an expression"
            messages += [
                msg.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": result},
            ]
            second = client.chat.completions.create(
                model="glm5-demo", messages=messages, tools=[CALCULATOR_TOOL], max_tokens=32, temperature=0.0
            )
            final = {"tool_result": result, "reply": second.choices[0].message.content}
        return {
            "url": server.url,
            "streamed": {
                "question": question,
                "reasoning": reasoning,
                "content": content,
                "completion_tokens": usage.completion_tokens if usage else None,
            },
            "tool": {
                "question": tool_question,
                "finish_reason": first.choices[0].finish_reason,
                "calls": calls,
                "then": final,
            },
        }
    finally:
        server.stop()


def short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def eval_row(result: Any, task: str, key: str) -> float | None:
    return result.metrics.get(task, {}).get(key)


def summary_rows(s: dict[str, Any], before: Any, after: Any) -> list[tuple[str, str, str]]:
    """(stage, result, time) rows: printed as a rich table and written as Markdown in the report."""
    rows: list[tuple[str, str, str]] = []
    add = lambda *row: rows.append(row)  # noqa: E731
    times = s["times"]
    plan = s["plan"]
    add(
        "plan GLM-5 (H200, FP8, 200K x 32)",
        f"{plan['total_params'] / 1e9:.1f}B params, {plan['active_params'] / 1e9:.1f}B active, BF16 "
        f"{plan['bf16_gb']:,.0f} GB, FP8 {plan['fp8_gb']:,.0f} GB -> {plan['devices']} x H200 "
        f"({plan['layout']}), {plan['decode_tok_s_per_user']:.0f} tok/s/user at 60% of the bandwidth roofline",
        f"{times['plan']:.0f} s",
    )
    pt = s["pretrain"]
    add(
        "pre-train tiny GLM-5 (MLA+DSA+MoE+MTP)",
        f"{pt['step']} steps, val loss {pt['val_lm']:.2f} vs unigram {pt['unigram_baseline']:.2f} nats",
        f"{times['pretrain']:.0f} s",
    )
    for label, res, key in (
        ("eval before RL", before, "eval_before"),
        ("eval after RL", after, "eval_after"),
    ):
        ppl = (res.perplexity or {}).get("perplexity")
        add(
            label,
            f"1-digit sums {pct(eval_row(res, 'easy_arithmetic', 'accuracy'))} right, "
            f"{pct(eval_row(res, 'easy_arithmetic', 'abstention_rate'))} abstained; unanswerable "
            f"{pct(eval_row(res, 'unanswerable', 'accuracy'))} abstained; hallucination "
            f"{pct(eval_row(res, 'overall', 'hallucination_rate'))}; tool use "
            f"{pct(eval_row(res, 'tool_use', 'accuracy'))}" + (f"; ppl {ppl:.0f}" if ppl else ""),
            f"{times[key]:.0f} s",
        )
    rl = s["rl"]
    b = rl["buffer"]
    add(
        "async RL, abstention reward",
        f"{rl['steps']} updates ({rl['mode']}): {b['trained']} groups trained, "
        f"{b['filtered']} filtered (zero variance), {b['requeued']} requeued",
        f"{times['rl']:.0f} s",
    )
    ex = s["export"]
    add(
        "export HF + FP8",
        f"{ex['hf_bytes'] / 1e6:.1f} MB -> {ex['fp8_bytes'] / 1e6:.1f} MB FP8 "
        f"({ex['fp8_bytes'] / ex['hf_bytes']:.2f}x)",
        f"{times['export']:.0f} s",
    )
    sv = s["serve"]
    calls = sv["tool"]["calls"]
    add(
        "serve FP8 + openai SDK",
        f"streamed {sv['streamed']['completion_tokens']} tokens (thinking {len(sv['streamed']['reasoning'])} "
        f"chars); tool call: {short(calls[0]['name'] + calls[0]['arguments']) if calls else 'none parsed'}",
        f"{times['serve']:.0f} s",
    )
    add("total", "", f"{s['total_s'] / 60:.1f} min")
    return rows


def summary_table(rows: list[tuple[str, str, str]]) -> Table:
    t = Table(title="glm5 demo: the GLM-5 lifecycle on this machine", title_justify="left")
    t.add_column("stage")
    t.add_column("result")
    t.add_column("time", justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def summary_markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| stage | result | time |", "|---|---|---:|"]
    return "\n".join(lines + [f"| {a} | {b.replace('|', '/')} | {c} |" for a, b, c in rows])


def write_report(out: Path, s: dict[str, Any], before: Any, after: Any) -> Path:
    from glm5.eval import compare

    cmp = compare(before, after, out_dir=out / "eval-compare", labels=("before RL", "after RL"))
    sv = s["serve"]
    lines = [
        "# glm5 demo report",
        "",
        summary_markdown(summary_rows(s, before, after)),
        "",
        f"Total wall time {s['total_s'] / 60:.1f} min on this machine. Stage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in s["times"].items())
        + ".",
        "",
        "## GLM-5 on H200 (planner)",
        "",
        "```",
        json.dumps(s["plan"], indent=1),
        "```",
        "",
        "## Pre-training",
        "",
        f"{s['pretrain']['step']} steps; validation loss {s['pretrain']['val_lm']:.3f} nats vs a unigram baseline of "
        f"{s['pretrain']['unigram_baseline']:.3f}.",
        "",
        "![loss](pretrain/loss.png)",
        "",
        "![expert load](pretrain/expert_load.png)",
        "",
        "## Evaluation before and after RL (abstention reward)",
        "",
        cmp,
        "",
        "![comparison](eval-compare/comparison.png)",
        "",
        "![rl](rl/rl.png)",
        "",
        "## Serving (openai SDK against glm5 serve, FP8 checkpoint)",
        "",
        f"Streamed answer to {sv['streamed']['question']!r}: thinking {sv['streamed']['reasoning']!r}, "
        f"content {sv['streamed']['content']!r}.",
        "",
        f"Tool call for {sv['tool']['question']!r}: finish_reason {sv['tool']['finish_reason']!r}, calls "
        f"{sv['tool']['calls']}, then {sv['tool']['then']}.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(s, indent=1, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm5.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes: the same steps in about a minute")
    parser.add_argument("--keep", action="store_true", help="reuse a finished pre-training in --out")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    s: dict[str, Any] = {"times": timer.stages}
    num = 4 if args.smoke else 24

    console.rule("[bold]1. Plan the real GLM-5 on H200")
    t = time.perf_counter()
    s["plan"] = plan_glm5()
    console.print(s["plan"])
    timer.stage("plan", t)

    console.rule("[bold]2. Pre-train a tiny GLM-5 (tokenizer, MLA + DSA stages, MoE balancing, MTP)")
    t = time.perf_counter()
    done = args.keep and (out / "pretrain" / "summary.json").exists()
    s["pretrain"] = (
        json.loads((out / "pretrain" / "summary.json").read_text())
        if done
        else pretrain(out / "pretrain", args.smoke)
    )
    timer.stage("pretrain", t)

    console.rule("[bold]3. Evaluate the pre-trained model")
    t = time.perf_counter()
    before = evaluate(out / "pretrain" / "model", out / "pretrain" / "data", out / "eval-before", num)
    timer.stage("eval_before", t)

    console.rule("[bold]4. Asynchronous RL with the abstention-aware reward")
    t = time.perf_counter()
    rl = reinforce(out / "pretrain" / "model", out / "rl", args.smoke)
    s["rl"] = {k: rl[k] for k in ("recipe", "steps", "wall_s", "buffer", "mode")}
    timer.stage("rl", t)

    console.rule("[bold]5. Evaluate the RL policy")
    t = time.perf_counter()
    after = evaluate(out / "rl" / "model", out / "pretrain" / "data", out / "eval-after", num)
    timer.stage("eval_after", t)

    console.rule("[bold]6. Export: HF layout and block FP8")
    t = time.perf_counter()
    s["export"] = export_fp8(out / "rl" / "model", out / "export-fp8")
    timer.stage("export", t)

    console.rule("[bold]7. Serve the FP8 checkpoint; query it with the openai SDK")
    t = time.perf_counter()
    s["serve"] = serve_and_query(out / "export-fp8")
    console.print(s["serve"])
    timer.stage("serve", t)

    s["total_s"] = timer.total
    report = write_report(out, s, before, after)
    console.print(summary_table(summary_rows(s, before, after)))
    console.print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
