"""CLI subcommand `glm5 serve`: the OpenAI-compatible server over a checkpoint folder; ``register(subparsers)``.

Heavy imports (torch, fastapi, the model) happen inside the command so `glm5 --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from glm5.argtypes import (
    existing_file,
    float_range,
    int_range,
    port,
    positive_float,
    positive_int,
    text,
)
from glm5.engine.cli import add_checkpoint_args, add_parallel_args, add_weight_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to a parent parser's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, tokenizer, metrics)",
        description="Serve a checkpoint with the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), "
        "vLLM's /tokenize, /detokenize and /tokenizer_info, /health and Prometheus /metrics. GLM tool calls and "
        "thinking are parsed; Ctrl-C / SIGTERM drain in-flight requests before exiting.",
    )
    add_checkpoint_args(p)
    p.add_argument("--host", default="127.0.0.1", type=text, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port, 1-65535 (default 8000)")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("GLM5_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $GLM5_API_KEY, else none)",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        type=text,
        help="model id clients send (default: the folder name)",
    )
    p.add_argument(
        "--max-model-len",
        type=int_range(2, name="length"),
        metavar="N",
        help="longest sequence, prompt + output (default and most: the model's max_position_embeddings)",
    )
    p.add_argument(
        "--max-num-seqs", type=positive_int, default=256, help="sequences decoded together (default 256)"
    )
    p.add_argument(
        "--max-pending",
        type=positive_int,
        default=512,
        metavar="N",
        help="sequences (prompts x n) admitted at once; more get 429 + Retry-After (default 512)",
    )
    p.add_argument(
        "--max-seqs-per-request",
        type=positive_int,
        default=256,
        metavar="N",
        help="most sequences (prompts x n) one request may ask for; more get 400 (default 256)",
    )
    p.add_argument(
        "--max-body-mb", type=positive_float, default=16.0, help="largest request body in MiB (default 16)"
    )
    add_weight_args(p)
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument(
        "--allow-special-tokens-in-prompt",
        action="store_true",
        help="parse <|user|>, [gMASK], ... in /v1/completions and /tokenize text prompts into special "
        "ids, as vLLM does (default: such text is plain text; chat content always is)",
    )
    p.add_argument(
        "--scripted-outputs",
        metavar="FILE",
        type=existing_file,
        help='JSON list of {"match": text | null, "output": text | [ids]}: replay these outputs '
        "(testing tool calls / thinking with random weights)",
    )
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--graceful-timeout",
        type=float_range(0.0, name="seconds"),
        default=30.0,
        help="seconds to drain on shutdown (default 30)",
    )
    add_parallel_args(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """`glm5 serve`: check what needs no weights (config, context length, address), load, then serve until
    interrupted."""
    from rich.console import Console  # lazy: torch-free CLI start-up

    from glm5.config import GLM5Config  # lazy: torch-free CLI start-up

    console = Console(stderr=True, highlight=False)
    if args.model is not None:
        try:
            cfg = GLM5Config.from_hf_config(args.model)
        except ValueError as e:
            raise ValueError(f"--model {args.model}: {e}") from None
        name, what = os.path.basename(os.path.normpath(args.model)), args.model
    else:
        if args.tokenizer is None:
            raise ValueError("--preset has no tokenizer: pass --tokenizer PATH")
        cfg, name, what = (
            GLM5Config.from_preset(args.preset),
            args.preset,
            f"preset {args.preset} (random weights)",
        )
    check_max_model_len(
        args.max_model_len, cfg.max_position_embeddings, args.model or f"preset {args.preset}"
    )
    from glm5.engine.cli import check_parallel  # lazy: torch-free CLI start-up

    parallel = check_parallel(args, cfg)
    check_address(args.host, args.port)

    import torch  # lazy: torch-free CLI start-up

    from glm5.device import default_dtype, pick_device  # lazy: torch-free CLI start-up
    from glm5.serve.core import ServerConfig  # lazy: torch-free CLI start-up
    from glm5.serve.server import build_engine, serve  # lazy: torch-free CLI start-up

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    options = {
        "num_speculative_tokens": args.speculative_tokens,
        "decode_steps": args.decode_steps,
        "max_num_seqs": args.max_num_seqs,
        "enable_prefix_caching": not args.no_prefix_caching,
        **parallel,
    }
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    console.print(f"loading {what} on {device} ({str(dtype).removeprefix('torch.')})…")
    start = time.perf_counter()
    model = args.model
    if model is None:
        from glm5 import GLM5ForCausalLM  # lazy: torch-free CLI start-up

        model = GLM5ForCausalLM(cfg)
    engine = build_engine(
        model,
        args.tokenizer,
        scripted=args.scripted_outputs,
        dtype=None if args.weights else dtype,
        device=device,
        fp8=args.fp8,
        **({"weights": args.weights} if args.weights else {}),
        **options,
    )
    served = args.served_model_name or name
    config = ServerConfig(
        model_name=served,
        model_path=args.model,
        api_key=args.api_key,
        max_pending_requests=args.max_pending,
        max_seqs_per_request=args.max_seqs_per_request,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        allow_special_tokens_in_prompt=args.allow_special_tokens_in_prompt,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    console.print(f"loaded in {time.perf_counter() - start:.1f} s")
    console.print(f"serving on http://{host}:{args.port} (model {served}); Ctrl-C stops")
    from glm5.serve.server import EngineFailed  # lazy: torch-free CLI start-up

    try:
        serve(
            engine,
            config,
            host=args.host,
            port=args.port,
            graceful_timeout_s=args.graceful_timeout,
            log_level=args.log_level,
        )
    except EngineFailed as exc:
        from glm5.argtypes import print_error  # lazy: torch-free CLI start-up

        print_error(str(exc))
        return 1
    finally:
        # the LLMEngine: stop a multi-process engine's workers (idempotent)
        inner = getattr(engine, "engine", None)
        if hasattr(inner, "shutdown"):
            inner.shutdown()
    return 0


def check_max_model_len(max_model_len: int | None, max_position_embeddings: int, source: str) -> None:
    """--max-model-len must fit the model's context (the engine would otherwise shorten it silently)."""
    if max_model_len is not None and max_model_len > max_position_embeddings:
        raise ValueError(
            f"--max-model-len {max_model_len:,} is beyond the model's context: {source} has "
            f"max_position_embeddings = {max_position_embeddings:,}; pass at most that, or leave the "
            "flag out"
        )


def check_address(host: str, port: int) -> None:
    """Bind (host, port) for a moment, as uvicorn will, so a taken port fails before minutes of loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ValueError(
            f"--host {host!r} is not an address of this machine ({e.strerror}); try 127.0.0.1 or 0.0.0.0"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                "or stop the program using it"
            ) from None
