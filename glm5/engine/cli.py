"""CLI subcommands `glm5 generate` (stream one completion) and `glm5 chat` (a GLM chat REPL); ``register(subparsers)``.

Both load a checkpoint folder (`--model PATH`, with its tokenizer.json when present) or build a randomly
initialised preset (`--preset NAME`, for smoke tests), and run the engine in this process. Heavy imports
(torch, the model) happen inside the commands so `glm5 --help` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from glm5.argtypes import (
    existing_dir,
    existing_file,
    float_range,
    int_range,
    nonnegative_float,
    positive_int,
    text,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
COMMANDS = "/reset, /think on|off, /exit"
"""The chat REPL's commands (any other line starting with / is refused, not sent to the model)."""


def _token_ids(value: str) -> list[int]:
    """--prompt-ids: comma-separated non-negative integers."""
    try:
        ids = [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 1,2,3, got {value!r}"
        ) from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"must be one or more token ids >= 0, got {value!r}")
    return ids


def _stop_string(value: str) -> str:
    text(value)
    if not value:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``chat`` to a parent parser's subparsers."""
    gen = subparsers.add_parser(
        "generate",
        help="stream a completion of a prompt",
        description="Generate from a prompt (text, or token ids for a checkpoint without a tokenizer) and "
        "stream the output as it is produced; a summary line (tokens, speed) goes to stderr.",
    )
    _add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", type=text, help="prompt text (raw, no chat template)")
    source.add_argument(
        "--prompt-ids", metavar="IDS", type=_token_ids, help="comma-separated token ids, e.g. 1,2,3"
    )
    gen.add_argument(
        "--chat-template", action="store_true", help="wrap --prompt as one user turn of the GLM chat format"
    )
    gen.add_argument("--no-thinking", action="store_true", help="with --chat-template: thinking off")
    _add_sampling_args(gen, max_tokens=256, temperature=0.0)
    gen.add_argument("--stop", nargs="+", metavar="STR", type=_stop_string, help="stop strings")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the eos ids")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="interactive chat in the GLM-5 chat format",
        description=f"A chat REPL: thinking is shown dimmed, tool calls parsed. Commands: {COMMANDS}. Ctrl-C "
        "stops a reply; Ctrl-C or Ctrl-D at the prompt exits.",
    )
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=1024, temperature=0.7)
    chat.add_argument("--system", metavar="TEXT", type=text, help="system message")
    chat.add_argument(
        "--tools", metavar="FILE", type=existing_file, help="JSON file with an OpenAI tools list"
    )
    chat.add_argument("--no-thinking", action="store_true", help="start with thinking off")
    chat.set_defaults(func=run_chat)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    add_weight_args(p)
    p.add_argument(
        "--init-seed", type=int_range(0, name="seed"), default=0, help="weight init seed for --preset"
    )
    add_parallel_args(p)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--model | --preset and --tokenizer (generate, chat, serve)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="PATH", type=existing_dir, help="checkpoint folder (config.json + *.safetensors)"
    )
    source.add_argument("--preset", metavar="NAME", help="randomly initialised preset (smoke tests)")
    p.add_argument(
        "--tokenizer", metavar="PATH", type=existing_dir, help="tokenizer folder (default: the checkpoint's)"
    )


def add_weight_args(p: argparse.ArgumentParser) -> None:
    """Device, dtype, weight format and MTP drafts (generate, chat, serve)."""
    p.add_argument("--device", metavar="DEV", help="cuda, npu, cpu, ... (default: the best available)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="compute dtype (default: bf16 on GPUs, fp32 on CPU)"
    )
    p.add_argument(
        "--fp8", choices=("keep", "dequantize"), help="FP8 checkpoints: keep FP8 weights or dequantize"
    )
    p.add_argument(
        "--weights",
        choices=("fp32", "bf16", "int8", "fp8"),
        help="hold the weight matrices as fp32, bf16, int8 (group scales) or block FP8, computing in fp32 "
        "(CPU decoding reads them as stored; default: an FP8 checkpoint's FP8, else --dtype)",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int_range(0, 3, name="draft_tokens"),
        default=0,
        metavar="K",
        help="MTP draft tokens per step, 1-3 (default 0: off)",
    )
    p.add_argument(
        "--decode-steps",
        type=int_range(1, 64, name="decode_steps"),
        default=1,
        metavar="N",
        help="tokens per decode step when every row takes the plain argmax: N steps in one native kernel call "
        "(fewer Python round trips on a CPU; output streams in groups of N; default 1)",
    )


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size/-tp and --expert-parallel-size/-ep (shared with `glm5 serve`)."""
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=positive_int,
        default=1,
        metavar="T",
        dest="tensor_parallel_size",
        help="shard attention, dense MLPs and the vocabulary over T processes (default 1; a checkpoint "
        "folder is needed; under torchrun WORLD_SIZE must equal T x E)",
    )
    p.add_argument(
        "--expert-parallel-size",
        "-ep",
        type=positive_int,
        default=1,
        metavar="E",
        dest="expert_parallel_size",
        help="T x E processes in all; the routed experts are divided over all of them (default 1; with "
        "--data-parallel-size D it must be D x T)",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=positive_int,
        default=1,
        metavar="D",
        dest="data_parallel_size",
        help="data-parallel attention: D x T processes, each group of T its own requests, scheduler and KV "
        "cache, the experts over all ranks (needs --expert-parallel-size D x T; default 1)",
    )
    p.add_argument(
        "--moe-dispatch",
        choices=("allgather", "alltoall"),
        default="alltoall",
        help="how the MoE layers exchange tokens between data-parallel ranks (default alltoall)",
    )


def check_parallel(args: argparse.Namespace, cfg: Any = None) -> dict[str, int]:
    """Validate the layout against the model's config before anything is loaded (ValueError naming the rule);
    returns the LLM options for it."""
    tp, ep = args.tensor_parallel_size, args.expert_parallel_size
    dp = getattr(args, "data_parallel_size", 1)
    flags = f"--tensor-parallel-size {tp} --expert-parallel-size {ep}" + (
        f" --data-parallel-size {dp}" if dp > 1 else ""
    )
    if dp > 1:
        from glm5.engine.dp import resolve_layout  # lazy: torch-free CLI start-up
        from glm5.engine.sharding import LayoutError  # lazy: torch-free CLI start-up

        try:
            groups = resolve_layout(tp, ep, dp)[1]
        except LayoutError as e:
            raise ValueError(str(e)) from None
    elif tp * ep == 1:
        return {}
    else:
        groups = ep
    if getattr(args, "model", None) is None:
        raise ValueError(
            f"{flags} needs --model PATH: every rank loads its own slices of a checkpoint folder (a --preset "
            "has none)"
        )
    from glm5.config import GLM5Config  # lazy: torch-free CLI start-up
    from glm5.engine.sharding import LayoutError, ShardLayout, check_layout  # lazy: torch-free CLI start-up

    cfg = cfg if cfg is not None else GLM5Config.from_hf_config(args.model)
    try:
        fp8 = getattr(args, "fp8", None) == "keep"
        check_layout(cfg, ShardLayout(0, tp, 0, groups), fp8=fp8, data_parallel=dp > 1)
    except LayoutError as e:
        raise ValueError(f"{flags} cannot shard {args.model}: {e}") from None
    if dp > 1:
        return {
            "tensor_parallel_size": tp,
            "expert_parallel_size": ep,
            "data_parallel_size": dp,
            "moe_dispatch": getattr(args, "moe_dispatch", "alltoall"),
        }
    return {"tensor_parallel_size": tp, "expert_parallel_size": ep}


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens, help=f"default {max_tokens}")
    p.add_argument(
        "--temperature",
        type=nonnegative_float,
        default=temperature,
        help=f"0 = greedy (default {temperature})",
    )
    p.add_argument(
        "--top-p",
        type=float_range(0.0, 1.0, low_open=True, name="top_p"),
        default=1.0,
        help="nucleus sampling, in (0, 1] (default 1: off)",
    )
    p.add_argument(
        "--top-k", type=int_range(-1, name="top_k"), default=0, help="keep the k likeliest (default 0: off)"
    )
    p.add_argument(
        "--min-p", type=float_range(0.0, 1.0, name="min_p"), default=0.0, help="in [0, 1] (default 0: off)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float_range(0.0, low_open=True, name="penalty"),
        default=1.0,
        help="> 0 (default 1: off)",
    )
    p.add_argument("--seed", type=int_range(0, name="seed"), default=None, help="sampling seed")


def build_llm(args: argparse.Namespace) -> Any:
    """An `LLM` from --model / --preset and the device options."""
    import torch  # lazy: torch-free CLI start-up

    from glm5.device import default_dtype, pick_device  # lazy: torch-free CLI start-up
    from glm5.engine import LLM  # lazy: torch-free CLI start-up

    device = pick_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    options: dict[str, Any] = {
        "num_speculative_tokens": args.speculative_tokens,
        "decode_steps": args.decode_steps,
        **check_parallel(args),
    }
    if args.model is not None:
        weights = {"weights": args.weights, "dtype": None} if args.weights else {"dtype": dtype}
        llm = LLM(args.model, args.tokenizer, device=device, fp8=args.fp8, **weights, **options)
        if "tensor_parallel_size" in options:
            atexit.register(llm.shutdown)  # stop the worker processes when the command ends
        _report_decode_path(llm)
        return llm
    from glm5 import GLM5Config, GLM5ForCausalLM  # lazy: torch-free CLI start-up

    torch.manual_seed(args.init_seed)
    model = GLM5ForCausalLM(GLM5Config.from_preset(args.preset))
    llm = LLM(model, args.tokenizer, dtype=dtype, device=device, **options)
    _report_decode_path(llm)
    return llm


def _report_decode_path(llm: Any) -> None:
    """One stderr line on how decode runs: the native kernel's SIMD path and the weights' format."""
    fused = getattr(llm.engine, "fused", None)
    if fused is not None:
        from glm5.kernels import native  # lazy: torch-free CLI start-up
        from glm5.kernels.formats import weight_format  # lazy: torch-free CLI start-up

        where = native.describe() if fused.lib is not None else "fused decode step: torch ops"
        print(f"{where}; weights held as {weight_format(fused.model)}", file=sys.stderr)


def _sampling(args: argparse.Namespace, **extra: Any) -> Any:
    from glm5.engine import SamplingParams  # lazy: torch-free CLI start-up

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        **extra,
    )


def stream(engine: Any, prompt: str | list[int], params: Any, on_delta: Callable[[Any], None]) -> Any:
    """Run one request on the engine, calling on_delta(RequestOutput) per step; Ctrl-C aborts it and re-raises.
    Returns the last delta (finish_reason set)."""
    request = engine.make_request(None, prompt, params)
    engine.submit(request)
    last = None
    try:
        while not request.finished:
            for out in engine.step():
                if out.request_id == request.request_id:
                    on_delta(out)
                    last = out
    except KeyboardInterrupt:
        engine.abort_request(request.request_id)
        engine.step()
        raise
    return last


def run_generate(args: argparse.Namespace) -> int:
    """`glm5 generate`: stream a completion to stdout."""
    # before loading
    params = _sampling(args, stop=args.stop, ignore_eos=args.ignore_eos, skip_special_tokens=False)
    llm = build_llm(args)
    tok = llm.tokenizer
    if args.prompt_ids is not None:
        prompt: str | list[int] = args.prompt_ids
    elif args.chat_template:
        if tok is None:
            raise ValueError("--chat-template needs a tokenizer (--tokenizer PATH)")
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            enable_thinking=not args.no_thinking,
            return_loss_mask=False,
        )
    else:
        if tok is None:
            raise ValueError("this model has no tokenizer: pass --prompt-ids, or --tokenizer PATH")
        prompt = args.prompt
    start = time.perf_counter()
    first: list[float] = []
    count = [0]

    def show(out: Any) -> None:
        c = out.outputs[0]
        if c.token_ids and not first:
            first.append(time.perf_counter() - start)
        count[0] += len(c.token_ids)
        text = c.text if tok is not None else "".join(f" {t}" for t in c.token_ids)
        sys.stdout.write(text)
        sys.stdout.flush()

    last = stream(llm.engine, prompt, params, show)
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    reason = last.outputs[0].finish_reason if last is not None else "?"
    ttft = f", first token {first[0] * 1000:.0f} ms" if first else ""
    print(
        f"[{count[0]} tokens in {elapsed:.2f} s ({count[0] / max(elapsed, 1e-9):.1f} tok/s){ttft}; finish: {reason}]",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------------------------- chat
def _read_tools(path: str | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    tools = tools.get("tools", tools) if isinstance(tools, dict) else tools
    if not isinstance(tools, list):
        raise ValueError(f"{path!r} must hold a list of tools (or an object with 'tools')")
    return tools


def run_chat(args: argparse.Namespace) -> int:
    """`glm5 chat`: read user turns, stream replies (thinking dimmed, tool calls parsed), keep the history."""
    from rich.console import Console  # lazy: torch-free CLI start-up

    tools = _read_tools(args.tools)
    _sampling(args)  # bad sampling flags fail before the model loads
    llm = build_llm(args)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError(
            "chat needs a tokenizer: the checkpoint has no tokenizer.json; pass --tokenizer PATH"
        )
    console = Console(highlight=False, soft_wrap=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, Any]] = list(system)
    state = {"thinking": not args.no_thinking}
    console.print(
        "[dim]glm5 chat: /reset clears the history, /think on|off, /exit quits; Ctrl-C stops a reply[/dim]"
    )
    while True:
        try:
            line = console.input("[bold green]you> [/bold green]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd.startswith("/"):
            action, reply = chat_command(cmd, state)
            if reply:
                console.print(f"[dim]{reply}[/dim]", markup=True)
            if action == "exit":
                return 0
            if action == "reset":
                messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        reply = _chat_turn(llm, console, messages, tools, state["thinking"], args)
        if reply is None:
            messages.pop()  # interrupted: forget the unanswered turn
        else:
            messages.append(reply)


def chat_command(line: str, state: dict[str, Any]) -> tuple[str | None, str]:
    """One REPL command: (action for the loop: "exit", "reset" or None, message to show). Changes
    state["thinking"] for /think on|off; anything unknown is refused with the list of commands."""
    from rich.markup import escape  # lazy: torch-free CLI start-up

    name, _, arg = line.partition(" ")
    arg = arg.strip().lower()
    if name in ("/exit", "/quit") and not arg:
        return "exit", ""
    if name == "/reset" and not arg:
        return "reset", "history cleared"
    if name == "/think":
        if arg in ("on", "off"):
            state["thinking"] = arg == "on"
            return None, f"thinking {arg}"
        now = "on" if state["thinking"] else "off"
        said = f"; got {escape(arg)!r}" if arg else ""
        return None, f"/think takes on or off{said} (thinking is {now})"
    if name == "/help":
        return None, f"commands: {COMMANDS}"
    return None, f"unknown command {escape(line)}; commands: {COMMANDS}"


def _chat_turn(
    llm: Any,
    console: Any,
    messages: list[dict[str, Any]],
    tools: Any,
    thinking: bool,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """Stream one assistant reply; returns the assistant message for the history, or None when interrupted."""
    from rich.text import Text  # lazy: torch-free CLI start-up

    from glm5.tokenizer.parser import OutputParser, merge_deltas  # lazy: torch-free CLI start-up

    ids = llm.tokenizer.apply_chat_template(
        messages, tools=tools, enable_thinking=thinking, return_loss_mask=False
    )
    parser = OutputParser(tools=tools, enable_thinking=thinking)
    deltas: list[dict[str, Any]] = []
    state = {"kind": None}

    def show(parsed: list[dict[str, Any]]) -> None:
        for d in parsed:
            deltas.append(d)
            if "reasoning_content" in d:
                if state["kind"] != "reasoning":
                    console.print(Text("thinking: ", style="dim italic"), end="")
                state["kind"] = "reasoning"
                console.print(Text(d["reasoning_content"], style="dim"), end="")
            elif "content" in d:
                if state["kind"] == "reasoning":
                    console.print()
                state["kind"] = "content"
                console.print(Text(d["content"]), end="")

    params = _sampling(args, skip_special_tokens=False)
    try:
        stream(llm.engine, ids, params, lambda out: show(parser.feed(out.outputs[0].text)))
    except KeyboardInterrupt:
        console.print(Text(" [interrupted]", style="yellow"))
        return None
    show(parser.close())
    console.print()
    message = merge_deltas(deltas)
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        console.print(Text(f"tool call: {fn['name']}({fn['arguments']})", style="cyan"))
    reply = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        reply["reasoning_content"] = message["reasoning_content"]
    if message.get("tool_calls"):
        reply["tool_calls"] = message["tool_calls"]
    return reply
