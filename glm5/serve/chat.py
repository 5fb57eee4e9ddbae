"""POST /v1/chat/completions: OpenAI messages -> GLM-5 prompt -> engine -> reasoning / content / tool calls.

* Thinking is on by default; `chat_template_kwargs.enable_thinking` (vLLM / SGLang) or Z.ai's
  `thinking: {type, clear_thinking}` switch it. Reasoning comes back as both `reasoning_content` and
  `reasoning`; on input either name, or inline `<think>...</think>` in `content`, is accepted.
* Output text is decoded with special tokens kept and parsed by the streaming `OutputParser`, the same way
  for whole answers and SSE streams (never re-tokenised).
* `tool_choice`: "auto" (default) lets the model choose; "none" hides the tools and stops at `<tool_call>`;
  "required" and a named function prefill the assistant turn with `<tool_call>` (and the name), thinking off,
  so the answer starts with a call: a prefill, not a grammar, so the arguments are the model's own.
* `response_format` json_object / json_schema is passed as an instruction in a system message (no grammar).
* Text only: an `image_url` content part is a 400 ("image input is not supported").
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from glm5.engine.outputs import RequestOutput
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
from glm5.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    Thinking,
    TokenizeRequest,
    random_id,
)
from glm5.tokenizer.parser import OutputParser, merge_deltas


@dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    prompt_ids: list[int]
    thinking: bool
    """Whether the output starts inside the reasoning."""
    tools: list[dict[str, Any]] | None
    """Tools for typing parsed arguments (None: tool_choice none)."""
    prefill: str
    """Text forced at the start of the assistant turn (part of the prompt; fed to the parser first)."""


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them; a 400 naming the message for what it cannot take."""
    return [_message_dict(m, i) for i, m in enumerate(messages)]


def _message_dict(m: ChatMessage, index: int = 0) -> dict[str, Any]:
    role = "system" if m.role == "developer" else m.role
    content: Any = m.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, ImagePart):
                raise APIError(
                    "image input is not supported: this model reads text only; send text parts",
                    param=f"messages[{index}].content[{j}]",
                    code="image_input_not_supported",
                )
        content = [{"type": "text", "text": p.text} for p in content]
    out: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning is not None:
            out["reasoning_content"] = reasoning
        if m.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]
    elif content is None:
        raise APIError(
            f"a {m.role} message needs 'content' (a string or a list of text parts)",
            param=f"messages[{index}].content",
        )
    return out


def _thinking_switches(
    chat_template_kwargs: dict[str, Any] | None, thinking: Thinking | None = None
) -> tuple[bool, bool]:
    """(enable_thinking, clear_thinking) from chat_template_kwargs and Z.ai's `thinking` object."""
    kwargs = chat_template_kwargs or {}
    enable, clear = kwargs.get("enable_thinking", True), kwargs.get("clear_thinking", True)
    if thinking is not None:
        enable = thinking.type == "enabled"
        if thinking.clear_thinking is not None:
            clear = thinking.clear_thinking
    for name, value in (("enable_thinking", enable), ("clear_thinking", clear)):
        if not isinstance(value, bool):
            raise APIError(
                f"chat_template_kwargs.{name} must be true or false, got {value!r}",
                param=f"chat_template_kwargs.{name}",
            )
    return enable, clear


def _response_format_message(body: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    text = "Respond with one valid JSON object and nothing else."
    if fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema",
            )
        text += " It must conform to this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    return {"role": "system", "content": text}


def plan_chat(state: ServerState, body: ChatCompletionRequest) -> ChatPlan:
    tok = state.tokenizer
    messages = message_dicts(body.messages)
    enable, clear = _thinking_switches(body.chat_template_kwargs, body.thinking)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = body.tool_choice
    names = [t["function"]["name"] for t in tools or []]
    prefill = ""
    if choice is not None and choice != "auto" and choice != "none" and not tools:
        raise APIError(
            "tool_choice 'required' or a named function needs a non-empty 'tools' list", param="tool_choice"
        )
    if choice == "none":
        tools = None
    elif choice == "required":
        prefill, enable = "<tool_call>", False
    elif choice is not None and choice != "auto":
        if choice.function.name not in names:
            raise APIError(
                f"tool_choice names {choice.function.name!r}, which is not in tools ({names})",
                param="tool_choice",
            )
        prefill, enable = "<tool_call>" + choice.function.name, False
    hint = _response_format_message(body)
    if hint is not None:
        messages = [hint, *messages]
    try:
        if (
            state.max_prompt_chars is not None
        ):  # rendering is cheap; refuse what cannot fit before tokenizing it
            text = tok.apply_chat_template(
                messages, tools=tools, enable_thinking=enable, clear_thinking=clear, tokenize=False
            )
            state.check_text_fits(text, "messages")
        ids = tok.apply_chat_template(
            messages, tools=tools, enable_thinking=enable, clear_thinking=clear, return_loss_mask=False
        )
    except ValueError as exc:
        raise APIError(str(exc), param="messages") from None
    if prefill:  # the <tool_call> marker is the server's; the function name is client text (literal)
        call_open = tok.require_special_ids(["<tool_call>"])["<tool_call>"]
        ids = ids + [call_open] + tok.encode(prefill.removeprefix("<tool_call>"))
    return ChatPlan(ids, enable, tools, prefill)


def tokenize_chat(state: ServerState, body: TokenizeRequest) -> list[int]:
    """POST /tokenize with `messages`: the ids the chat template renders them to (as vLLM's /tokenize: the
    tools, chat_template_kwargs and add_generation_prompt apply; no tool_choice or response_format). A 400
    names the field for what the template cannot take."""
    enable, clear = _thinking_switches(body.chat_template_kwargs)
    messages = message_dicts(body.messages or [])
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        return state.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            enable_thinking=enable,
            clear_thinking=clear,
            add_generation_prompt=body.add_generation_prompt,
            return_loss_mask=False,
        )
    except ValueError as exc:
        raise APIError(str(exc), param="messages") from None


class _Choice:
    """One completion's parser and bookkeeping."""

    def __init__(self, state: ServerState, plan: ChatPlan, index: int, logprobs: int | None) -> None:
        self.state, self.index, self.num_logprobs = state, index, logprobs
        self.parser = OutputParser(tools=plan.tools, enable_thinking=plan.thinking)
        self.pending = self.parser.feed(plan.prefill) if plan.prefill else []
        self.thinking = plan.thinking
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def step(self, text: str, token_ids: list[int], finished: bool) -> list[dict[str, Any]]:
        self.token_ids += token_ids
        deltas, self.pending = self.pending + self.parser.feed(text), []
        if finished:
            deltas += self.parser.close()
        return deltas

    def finish(self, reason: str | None) -> str | None:
        if reason == "stop" and self.parser.num_tool_calls:
            return "tool_calls"
        return reason

    def logprobs(
        self, token_ids: list[int], lps: list[dict[int, float]] | None
    ) -> list[dict[str, Any]] | None:
        if self.num_logprobs is None or lps is None:
            return None
        out = []
        for tok, lp in zip(token_ids, lps):
            top = sorted(lp.items(), key=lambda kv: -kv[1])[: self.num_logprobs]
            out.append({**self._entry(tok, lp[tok]), "top_logprobs": [self._entry(t, v) for t, v in top]})
        return out

    def _entry(self, tok: int, logprob: float) -> dict[str, Any]:
        s = self.state.token_str(tok)  # `<|id:N|>` (and no bytes) for an id past the tokenizer
        raw = list(s.encode("utf-8")) if self.state.has_text(tok) else None
        return {"token": s, "logprob": max(logprob, -9999.0), "bytes": raw}

    def reasoning_tokens(self) -> int:
        ids = self.token_ids
        starts_inside = self.thinking or (ids and ids[0] == self.state.think_open)
        if not starts_inside:
            return 0
        if self.state.think_close in ids:
            return ids.index(self.state.think_close)
        return len(ids) - (1 if ids and ids[-1] in self.state.eos_ids else 0)


def _with_reasoning_alias(delta: dict[str, Any]) -> dict[str, Any]:
    if "reasoning_content" in delta:
        delta = {**delta, "reasoning": delta["reasoning_content"]}
    return delta


def _usage(prompt_len: int, cached: int, choices: list[_Choice]) -> dict[str, Any]:
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": sum(c.reasoning_tokens() for c in choices)},
    }


@dataclass
class PreparedChat:
    plan: ChatPlan
    params: Any
    num_logprobs: int | None
    include_usage: bool = False
    continuous_usage: bool = False


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> PreparedChat:
    """Validate a request into its prompt and SamplingParams; every problem is an APIError (4xx)."""
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    plan = plan_chat(state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or state.config.default_max_tokens
    max_tokens = state.check_prompt(plan.prompt_ids, max_tokens, "messages")
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    extra: dict[str, Any] = {"skip_special_tokens": False, "logprobs": num_logprobs}
    if body.tool_choice == "none" and state.tool_call_id is not None:
        extra["stop_token_ids"] = [state.tool_call_id]
    opts = body.stream_options
    return PreparedChat(
        plan,
        sampling_params(body, max_tokens, **extra),
        num_logprobs,
        bool(opts and opts.include_usage),
        bool(opts and opts.continuous_usage_stats),
    )


async def chat_completion(state: ServerState, prep: PreparedChat) -> dict[str, Any]:
    """The whole answer (non-streaming)."""
    plan, params, num_logprobs = prep.plan, prep.params, prep.num_logprobs
    request_id = random_id("chatcmpl")
    choices = [_Choice(state, plan, j, num_logprobs) for j in range(params.n)]
    deltas: list[list[dict[str, Any]]] = [[] for _ in choices]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in choices]
    cached = 0
    async with aclosing(metered(state, plan.prompt_ids, params, request_id)) as stream:
        async for out in stream:
            cached = out.num_cached_tokens
            for c in out.outputs:
                ch = choices[c.index]
                deltas[c.index] += ch.step(c.text, c.token_ids, c.finish_reason is not None)
                logprobs[c.index] += ch.logprobs(c.token_ids, c.logprobs) or []
                if c.finish_reason is not None:
                    ch.finish_reason, ch.stop_reason = ch.finish(c.finish_reason), c.stop_reason
    result = []
    for ch, ds, lps in zip(choices, deltas, logprobs):
        msg = merge_deltas(ds)
        message = {
            "role": "assistant",
            "content": msg["content"],
            "reasoning_content": msg["reasoning_content"],
            "reasoning": msg["reasoning_content"],
            "tool_calls": msg["tool_calls"],
        }
        result.append(
            {
                "index": ch.index,
                "message": message,
                "logprobs": {"content": lps} if ch.num_logprobs is not None else None,
                "finish_reason": ch.finish_reason,
                "stop_reason": ch.stop_reason,
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.config.model_name,
        "choices": result,
        "usage": _usage(len(plan.prompt_ids), cached, choices),
    }


async def chat_sse(
    state: ServerState, prep: PreparedChat, ticket: Ticket | None = None
) -> AsyncIterator[str]:
    """The answer as SSE chunks; releases `ticket` when it ends or is closed (client disconnect)."""
    plan, params, num_logprobs = prep.plan, prep.params, prep.num_logprobs
    include_usage, continuous = prep.include_usage, prep.continuous_usage
    request_id = random_id("chatcmpl")
    created = int(time.time())
    model = state.config.model_name
    choices = [_Choice(state, plan, j, num_logprobs) for j in range(params.n)]
    cached = 0

    def chunk(
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        logprobs: Any = None,
        stop_reason: Any = None,
    ) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        payload = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if include_usage:
            payload["usage"] = _usage(len(plan.prompt_ids), cached, choices) if continuous else None
        return sse(payload)

    try:
        for ch in choices:
            yield chunk(ch.index, {"role": "assistant", "content": ""})
        async with aclosing(merged([metered(state, plan.prompt_ids, params, request_id)])) as stream:
            async for _, out in stream:
                out: RequestOutput
                cached = out.num_cached_tokens
                for c in out.outputs:
                    ch = choices[c.index]
                    finished = c.finish_reason is not None
                    deltas = ch.step(c.text, c.token_ids, finished)
                    lps = ch.logprobs(c.token_ids, c.logprobs)
                    for k, d in enumerate(deltas):
                        yield chunk(
                            ch.index,
                            _with_reasoning_alias(d),
                            logprobs={"content": lps} if k == 0 and lps else None,
                        )
                    if lps and not deltas:  # tokens that produced no visible text yet still carry logprobs
                        yield chunk(ch.index, {}, logprobs={"content": lps})
                    if finished:
                        reason = ch.finish(c.finish_reason)
                        ch.finish_reason = reason
                        yield chunk(ch.index, {}, reason, stop_reason=c.stop_reason)
        if include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _usage(len(plan.prompt_ids), cached, choices),
                }
            )
        yield SSE_DONE
    except Exception as exc:  # noqa: BLE001 - reported in-stream: the status line is already sent
        yield sse_error(exc)
        yield SSE_DONE
    finally:
        if ticket is not None:
            ticket.release()
