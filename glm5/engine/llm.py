"""`LLM`: offline generation on the engine -- `LLM(path_or_model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from glm5.config import GLM5Config
from glm5.engine.dp import resolve_layout
from glm5.engine.engine import EngineConfig, LLMEngine, Prompt
from glm5.engine.multiproc import MultiProcExecutor
from glm5.engine.outputs import RequestOutput
from glm5.engine.sampling import SamplingParams
from glm5.engine.sharding import ShardLayout, check_layout
from glm5.kernels.formats import convert_model, converting_loader, resolve_weights
from glm5.model import GLM5ForCausalLM
from glm5.tokenizer import GLM5Tokenizer

OFFLINE_DECODE_STEPS = 8
"""`LLM`'s default EngineConfig.decode_steps: `generate` returns whole outputs, so nobody sees the steps, and
greedy batches make 8 tokens per kernel call (one Python round trip per 8 tokens). The engine's own default
(streaming: `glm5 serve`, `glm5 generate` / `chat`, AsyncLLMEngine) stays 1 token per step."""


class LLM:
    """Offline generation: `LLM(path_or_model, tokenizer=None, **engine_options).generate(prompts, params)`.

    model_or_path: a checkpoint folder (config.json + safetensors, BF16 or block-FP8; a tokenizer.json there is
    loaded too) or an in-memory GLM5ForCausalLM. Engine options are the fields of `EngineConfig`
    (block_size, num_speculative_tokens, enable_prefix_caching, max_num_seqs, ...).

    tensor_parallel_size / expert_parallel_size > 1: the model is sharded over tp x ep processes
    (glm5.engine.multiproc.MultiProcExecutor): this process is rank 0 and spawns the others, or, under torchrun,
    every rank runs the same program and ranks > 0 serve rank 0's steps inside this constructor, then exit.
    Needs a checkpoint folder (each rank reads only its slices); the layout is checked against its config.json
    before anything is loaded (`glm5.engine.sharding.LayoutError` names the rule).

    decode_steps defaults to OFFLINE_DECODE_STEPS (8) here, not EngineConfig's 1: plain-argmax batches make 8
    tokens per engine step (tokens past a stop are computed and dropped); pass decode_steps=1 to step one token at
    a time (e.g. when driving `llm.engine.step()` for streaming).

    data_parallel_size d > 1: data-parallel attention (glm5/engine/dp.py): d x tensor_parallel_size processes,
    each DP rank its own requests, scheduler and KV cache, the experts over all ranks (expert_parallel_size must
    be d x tensor_parallel_size); moe_dispatch: "alltoall" (default) or "allgather".
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        fp8: str | None = None,
        weights: str | None = None,
        tensor_parallel_size: int = 1,
        expert_parallel_size: int = 1,
        data_parallel_size: int = 1,
        moe_dispatch: str = "alltoall",
        **engine_options: Any,
    ) -> None:
        engine_options.setdefault("decode_steps", OFFLINE_DECODE_STEPS)
        tp, ep = int(tensor_parallel_size), int(expert_parallel_size)
        if weights is not None and tp * ep * int(data_parallel_size) > 1:
            if weights != "fp8":
                raise ValueError(
                    f"weights={weights!r} is for one process; a sharded model holds the checkpoint's weights "
                    "(weights='fp8' keeps an FP8 checkpoint's)"
                )
            fp8 = fp8 or "keep"  # the sharded loader keeps the FP8 split as stored
        if tp < 1 or ep < 1:
            raise ValueError(f"tensor_parallel_size={tp} and expert_parallel_size={ep} must be at least 1")
        if int(data_parallel_size) > 1:  # data-parallel attention (glm5/engine/dp.py): ep = dp x tp
            tp, groups, _ = resolve_layout(tp, ep, int(data_parallel_size))
            engine_options = {**engine_options, "_dp": (groups, moe_dispatch)}
            self._init_sharded(model_or_path, tokenizer, tp, groups, dtype, device, fp8, engine_options)
            return
        if tp * ep > 1:
            self._init_sharded(model_or_path, tokenizer, tp, ep, dtype, device, fp8, engine_options)
            return
        model = model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            model, found = _load(model_or_path, dtype=dtype, device=device, fp8=fp8, weights=weights)
            tokenizer = tokenizer if tokenizer is not None else found
        else:
            if dtype is not None or device is not None:
                model = model.to(device=device, dtype=dtype)
            if weights is not None:
                model = convert_model(model, weights)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = GLM5Tokenizer.from_pretrained(tokenizer)
        self.engine = LLMEngine(model, tokenizer, _engine_config(engine_options))

    def _init_sharded(
        self,
        path: Any,
        tokenizer: Any,
        tp: int,
        ep: int,
        dtype: Any,
        device: Any,
        fp8: str | None,
        engine_options: dict[str, Any],
    ) -> None:

        dp = engine_options.pop("_dp", None)  # (DP ranks, MoE dispatch) for data-parallel attention
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                f"tensor_parallel_size={tp} x expert_parallel_size={ep} needs a checkpoint folder: every "
                "rank loads its own slices of it; an in-memory model cannot be sharded over processes "
                "(save it with save_pretrained first)"
            )
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise ValueError(
                f"no checkpoint folder {folder!r}: give a folder with config.json and *.safetensors"
            )
        cfg = GLM5Config.from_hf_config(folder)
        check_layout(cfg, ShardLayout(0, tp, 0, ep), fp8=fp8 == "keep", data_parallel=dp is not None)
        config = _engine_config(engine_options)
        if tokenizer is None and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer = folder
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = GLM5Tokenizer.from_pretrained(tokenizer)
        executor = MultiProcExecutor(
            folder,
            config,
            tp,
            ep,
            dtype=dtype,
            device=device,
            fp8=fp8,
            data_parallel=dp is not None,
            dispatch=dp[1] if dp else "alltoall",
        )
        try:
            self.engine = LLMEngine(None, tokenizer, config, executor=executor)
        except BaseException:
            executor.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the engine's worker processes (multi-process engines; a no-op otherwise)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def model(self) -> Any:
        return self.engine.model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in order; prompts are strings or token-id lists (or one of either).

        Strings are encoded literally: special-token strings in them are plain text (see `glm5.engine.engine.Prompt`).
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        requests = [engine.make_request(None, p, sp) for p, sp in zip(prompts, params_list)]
        for request in requests:
            engine.submit(request)
        progress = _progress(len(requests)) if use_tqdm else None
        while not all(r.finished for r in requests):
            for out in engine.step():
                if out.finished and progress is not None:
                    progress[0].advance(progress[1])
        if progress is not None:
            progress[0].stop()
        return [engine.final_output(r) for r in requests]

    def update_weights(
        self, state_dict: dict[str, torch.Tensor], version: int | None = None, hf_names: bool = False
    ) -> int:
        return self.engine.update_weights(state_dict, version, hf_names)


def _engine_config(engine_options: dict[str, Any]) -> EngineConfig:
    unknown = set(engine_options) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"unknown LLM options {sorted(unknown)}; engine options are {list(EngineConfig.__dataclass_fields__)}"
        )
    config = EngineConfig(**engine_options)
    if config.force_token is not None and config.num_speculative_tokens:
        warnings.warn(
            "EngineConfig.force_token (scripted output) is set: speculative decoding is turned off, "
            "since drafts are verified where the hook cannot apply",
            stacklevel=3,
        )
        config = dataclasses.replace(config, num_speculative_tokens=0)
    return config


def _progress(total: int) -> tuple[Any, Any]:

    p = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    p.start()
    return p, p.add_task("generate", total=total)


def _load(
    path: str | os.PathLike,
    dtype: torch.dtype | None,
    device: Any,
    fp8: str | None,
    weights: str | None = None,
) -> tuple[Any, Any]:
    """A checkpoint folder -> (model, tokenizer or None). `weights` (see glm5.kernels.formats): how the matrices
    are held, activations float32; None: an FP8 checkpoint keeps its FP8 weights (fp8="keep" unless `fp8`
    says otherwise), any other loads as `dtype`."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ValueError(f"no checkpoint folder {folder!r}: give a folder with config.json and *.safetensors")
    if not hasattr(GLM5ForCausalLM, "from_pretrained"):
        raise ValueError(
            "loading a checkpoint folder needs GLM5ForCausalLM.from_pretrained (not in this build)"
        )
    weights, fp8 = resolve_weights(folder, weights, fp8, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "device": device}
    if fp8 is not None:
        kwargs["fp8"] = fp8
    model = GLM5ForCausalLM.from_pretrained(folder, on_filled=converting_loader(weights), **kwargs)
    if weights is not None:
        model = convert_model(model, weights)
    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = GLM5Tokenizer.from_pretrained(folder)
    return model, tokenizer
