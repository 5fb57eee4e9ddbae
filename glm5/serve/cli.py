"""CLI subcommand `glm5 serve`: the OpenAI-compatible server over a checkpoint folder; ``register(subparsers)``.

Heavy imports (torch, fastapi, the model) happen inside the command so `glm5 --help` stays fast.
"""

from __future__ import annotations

import argparse
import os

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to a parent parser's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat, completions, tokenizer, metrics)",
        description="Serve a checkpoint with the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), "
        "vLLM's /tokenize, /detokenize and /tokenizer_info, /health and Prometheus /metrics. GLM tool calls and "
        "thinking are parsed; Ctrl-C / SIGTERM drain in-flight requests before exiting.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH", help="checkpoint folder (config.json + *.safetensors)")
    source.add_argument("--preset", metavar="NAME", help="randomly initialised preset (smoke tests)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("GLM5_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GLM5_API_KEY, else none)")  # fmt: skip
    p.add_argument("--served-model-name", metavar="NAME", help="model id clients send (default: the folder name)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="longest sequence, prompt + output")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together (default 256)")
    p.add_argument("--max-pending", type=int, default=512, metavar="N",
                   help="requests admitted at once; more get 429 + Retry-After (default 512)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    p.add_argument("--device", metavar="DEV", help="cuda, npu, cpu, ... (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (default: bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--fp8", choices=("keep", "dequantize"), help="FP8 checkpoints: keep FP8 weights or dequantize")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K", help="MTP draft tokens per step (1-3)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--scripted-outputs", metavar="FILE",
                   help='JSON list of {"match": text | null, "output": text | [ids]}: replay these outputs '
                   "(testing tool calls / thinking with random weights)")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to drain on shutdown (default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import torch

    from glm5.device import default_dtype, pick_device
    from glm5.serve.core import ServerConfig
    from glm5.serve.server import build_engine, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    options = {"num_speculative_tokens": args.speculative_tokens, "max_num_seqs": args.max_num_seqs,
               "enable_prefix_caching": not args.no_prefix_caching}  # fmt: skip
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    if args.model is not None:
        model, name = args.model, os.path.basename(os.path.normpath(args.model))
    else:
        from glm5 import GLM5Config, GLM5ForCausalLM

        model, name = GLM5ForCausalLM(GLM5Config.from_preset(args.preset)), args.preset
        if args.tokenizer is None:
            raise ValueError("--preset has no tokenizer: pass --tokenizer PATH")
    engine = build_engine(model, args.tokenizer, scripted=args.scripted_outputs, dtype=dtype, device=device,
                          fp8=args.fp8, **options)  # fmt: skip
    config = ServerConfig(model_name=args.served_model_name or name, model_path=args.model, api_key=args.api_key,
                          max_pending_requests=args.max_pending, max_body_bytes=int(args.max_body_mb * (1 << 20)))  # fmt: skip
    serve(engine, config, host=args.host, port=args.port, graceful_timeout_s=args.graceful_timeout,
          log_level=args.log_level)  # fmt: skip
    return 0
