"""POST /v1/completions: raw prompts (text, texts, token ids, lists of token ids), `echo` and legacy logprobs.

`echo` with `logprobs` returns the prompt's tokens with their logprobs (the first is null) followed by the
generated ones, in the legacy parallel-list shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
that lm-evaluation-harness sums for loglikelihood tasks. `max_tokens: 0` with `echo` scores the prompt only.
Choice `index` is `prompt_index * n + j`. Text prompts are encoded literally (a `<|user|>` in them is plain
text) unless the server runs with `allow_special_tokens_in_prompt` (`--allow-special-tokens-in-prompt`).

A text prompt starts with GLM's `[gMASK]<sop>` (`add_special_tokens`, default true, as vLLM and /tokenize do);
token-id prompts are used as given, and `echo` returns the text as given. Token ids past the tokenizer read as
`<|id:N|>` in logprobs (see glm5/serve/core.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from glm5.serve.core import (
    SSE_DONE,
    APIError,
    ServerState,
    Ticket,
    merged,
    metered,
    sampling_params,
    sse,
    sse_error,
)
from glm5.serve.protocol import CompletionRequest, random_id


@dataclass
class PreparedCompletion:
    prompts: list[tuple[str | None, list[int]]]
    """(text as given or None, ids) per prompt."""
    params: list[Any]
    """SamplingParams per prompt (max_tokens depends on each prompt's length)."""
    echo: bool
    num_logprobs: int | None
    score_only: bool
    """max_tokens 0: one token is generated for the engine's sake and dropped."""
    include_usage: bool = False


def num_prompts(prompt: Any) -> int:
    """How many prompts a request's `prompt` holds (a text, texts, token ids or lists of token ids)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return 1
    return max(len(prompt), 1)


def _prompts(
    state: ServerState, prompt: Any, add_special_tokens: bool = True
) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(
            "prompt is empty: give a string, a list of strings, token ids or lists of token ids",
            param="prompt",
        )
    out = []
    allow = state.config.allow_special_tokens_in_prompt  # off: special-token strings in text are plain text
    for p in prompt:
        if isinstance(p, str):
            state.check_text_fits(p, "prompt")
            out.append(
                (p, state.tokenizer.encode(p, add_special_tokens=add_special_tokens, allow_special=allow))
            )
        else:
            out.append((None, list(p)))
    return out


def prepare_completion(state: ServerState, body: CompletionRequest) -> PreparedCompletion:
    """Validate a request into prompts and SamplingParams; every problem is an APIError (4xx)."""
    state.check_model(body.model)
    if body.suffix:
        raise APIError("suffix is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            f"best_of ({body.best_of}) must equal n ({body.n}): ranking candidates is not supported",
            param="best_of",
        )
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise APIError("max_tokens 0 only makes sense with echo (scoring the prompt)", param="max_tokens")
    prompts = _prompts(state, body.prompt, body.add_special_tokens)
    params = []
    for _, ids in prompts:
        max_tokens = state.check_prompt(ids, 1 if score_only else body.max_tokens, "prompt")
        echo_lps = body.logprobs if body.echo and body.logprobs is not None else None
        params.append(
            sampling_params(
                body,
                max_tokens,
                logprobs=body.logprobs,
                prompt_logprobs=echo_lps,
                skip_special_tokens=body.skip_special_tokens,
            )
        )
    opts = body.stream_options
    return PreparedCompletion(
        prompts, params, body.echo, body.logprobs, score_only, bool(opts and opts.include_usage)
    )


class _Legacy:
    """Builds the legacy logprobs lists of one choice incrementally."""

    def __init__(self, state: ServerState, num_top: int) -> None:
        self.state, self.num_top = state, num_top
        self.offset = 0

    def add(self, ids: list[int], lps: list[dict[int, float] | None]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp in zip(ids, lps):
            s = self.state.token_str(tok)
            out["tokens"].append(s)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
            if lp is None:  # the first prompt token has no context
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(max(lp[tok], -9999.0))
            top: dict[str, float] = {}
            ranked = sorted(lp.items(), key=lambda kv: -kv[1])
            for t, v in ranked[: max(self.num_top, 1)] + [(tok, lp[tok])]:
                key = self.state.token_str(t)
                top[key] = max(top.get(key, -9999.0), max(v, -9999.0))
            out["top_logprobs"].append(top)
        return out


def _join(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


async def _runs(
    state: ServerState, prep: PreparedCompletion, request_id: str
) -> AsyncIterator[tuple[int, Any]]:
    streams = [
        metered(state, ids, params, f"{request_id}-{i}")
        for i, ((_, ids), params) in enumerate(zip(prep.prompts, prep.params))
    ]
    async with aclosing(merged(streams)) as stream:
        async for item in stream:
            yield item


class _Choice:
    def __init__(self, state: ServerState, prep: PreparedCompletion, p: int, j: int) -> None:
        self.index = p * prep.params[p].n + j
        self.legacy = _Legacy(state, prep.num_logprobs or 0) if prep.num_logprobs is not None else None
        self.logprobs: dict[str, list] | None = None
        self.text = ""
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.echoed = not prep.echo

    def step(self, state: ServerState, prep: PreparedCompletion, p: int, out: Any, c: Any) -> tuple[str, Any]:
        """(new text, new logprobs) of one delta, echo first."""
        text, lps = "", None
        if not self.echoed:  # prompt logprobs come with the first delta (prefill ends where sampling starts)
            given, ids = prep.prompts[p]
            text = given if given is not None else state.decode_prompt(ids)
            if self.legacy is not None:
                plps = out.prompt_logprobs or [None] * len(ids)
                lps = self.legacy.add(ids, plps)
            self.echoed = True
        ids, new_text = c.token_ids, c.text
        if prep.score_only:
            ids, new_text = [], ""
        self.num_tokens += len(c.token_ids)
        text += new_text
        if self.legacy is not None and ids:
            lps = _join(lps, self.legacy.add(ids, c.logprobs or [None] * len(ids)))
        self.text += text
        if lps is not None:
            self.logprobs = _join(self.logprobs, lps)
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason
        return text, lps


def _usage(prep: PreparedCompletion, choices: list[_Choice], cached: int) -> dict[str, Any]:
    prompt = sum(len(ids) for _, ids in prep.prompts)
    completion = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _choices(state: ServerState, prep: PreparedCompletion) -> list[list[_Choice]]:
    return [[_Choice(state, prep, p, j) for j in range(params.n)] for p, params in enumerate(prep.params)]


async def completion(state: ServerState, prep: PreparedCompletion) -> dict[str, Any]:
    request_id = random_id("cmpl")
    choices = _choices(state, prep)
    cached: dict[int, int] = {}
    async with aclosing(_runs(state, prep, request_id)) as stream:
        async for p, out in stream:
            cached[p] = out.num_cached_tokens
            for c in out.outputs:
                choices[p][c.index].step(state, prep, p, out, c)
    flat = [c for group in choices for c in group]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.config.model_name,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in flat
        ],
        "usage": _usage(prep, flat, sum(cached.values())),
    }


async def completion_sse(
    state: ServerState, prep: PreparedCompletion, ticket: Ticket | None = None
) -> AsyncIterator[str]:
    request_id = random_id("cmpl")
    created = int(time.time())
    model = state.config.model_name
    choices = _choices(state, prep)
    cached: dict[int, int] = {}
    try:
        async with aclosing(_runs(state, prep, request_id)) as stream:
            async for p, out in stream:
                cached[p] = out.num_cached_tokens
                for c in out.outputs:
                    ch = choices[p][c.index]
                    text, lps = ch.step(state, prep, p, out, c)
                    if text or lps or c.finish_reason is not None:
                        payload = {
                            "id": request_id,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [
                                {
                                    "index": ch.index,
                                    "text": text,
                                    "logprobs": lps,
                                    "finish_reason": c.finish_reason,
                                }
                            ],
                        }
                        if prep.include_usage:
                            payload["usage"] = None
                        yield sse(payload)
        if prep.include_usage:
            flat = [c for group in choices for c in group]
            yield sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(prep, flat, sum(cached.values())),
                }
            )
        yield SSE_DONE
    except Exception as exc:  # noqa: BLE001 - reported in-stream: the status line is already sent
        yield sse_error(exc)
        yield SSE_DONE
    finally:
        if ticket is not None:
            ticket.release()
