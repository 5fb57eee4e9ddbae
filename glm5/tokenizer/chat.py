"""GLM-5 chat format: OpenAI-style messages -> the exact GLM-5 prompt text, or token ids + loss mask.

The rendering reproduces the GLM-5 Jinja template (docs/serving.md § Chat template), e.g.::

    [gMASK]<sop><|user|>你好<|assistant|><think>

It is built as a list of segments, each either one special token or a run of plain text, so that
tokenizing it segment by segment keeps every special token a single id, and a conversation's
prefix renders to a prefix of its ids (except where the template itself rewrites history: reasoning
of assistant turns before the last user message is dropped when ``clear_thinking`` is on).

Loss mask (``tokenize_chat``): 1 on everything the assistant generates in its turn: the reasoning
text and the ``</think>`` that closes it, the content, every tool-call token, and the stop token
that ends the turn: the ``<|user|>`` or ``<|observation|>`` that follows it, or, for a conversation
that ends with an assistant turn and has no generation prompt, an ``<|endoftext|>`` appended to the
ids (not to the text) so that training teaches the model to stop. ``[gMASK]<sop>``, role markers,
the ``<think>`` opener and the lone ``</think>`` separator (both part of the generation prompt at
inference), system/user text and tool results are 0.

Only the template's own markers become special ids. Every text segment (message content, reasoning,
tool names, argument keys and values, tool results, the tools' JSON) is encoded literally, so a
``<|assistant|>`` or ``</tool_response>`` written inside a message is ordinary text to the model and
cannot forge a turn. The tools instructions' own example (``<tool_call>{function-name}<arg_key>...``)
is template text, so its tags are special ids, as when HF tokenizes the rendered template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glm5.tokenizer.special import ENDOFTEXT, SPECIAL_TOKENS

if TYPE_CHECKING:
    from glm5.tokenizer.tokenizer import GLM5Tokenizer

TOOLS_HEADER = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following "
    "XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}"
    "</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation."""

    text: str
    """The text (for a special token, its name, e.g. ``<|user|>``)."""
    special: bool
    """True when ``text`` is one special token the template inserts (it maps to its single id); False
    for text, which is encoded literally (special-token strings in it stay plain text)."""
    trainable: bool
    """Loss-mask value for every id of this piece."""


@dataclass
class ChatMessage:
    """A validated message, as the template sees it."""

    role: str
    """system, user, assistant or tool."""
    content: str
    """Text (list content joined; an assistant's null content is "")."""
    reasoning: str | None = None
    """An assistant's ``reasoning_content``; None means "split it out of content at </think>"."""
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None
    """An assistant's calls as (name, arguments dict), JSON-string arguments already parsed."""


def _fail(index: int, problem: str, fix: str) -> ValueError:
    return ValueError(f"messages[{index}]: {problem}; {fix}")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)


def _visible_text(content: Any, index: int, role: str) -> str:
    """String content as is; a list of text parts (or strings) joined; None only for assistants."""
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        raise _fail(index, f"{role} message has no 'content'", "add a string (or a list of text parts)")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif _is_text_part(part):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                fix = 'only {"type": "text", "text": ...} parts are supported'
                raise _fail(index, f"content[{j}] is a {kind!r} part", fix)
        return "".join(parts)
    raise _fail(index, f"content is a {type(content).__name__}", "send a string or a list of text parts")


def _tool_calls(raw: Any, index: int) -> list[tuple[str, dict[str, Any]]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _fail(index, "tool_calls is not a list", 'send [{"type": "function", "function": {...}}, ...]')
    calls = []
    for j, call in enumerate(raw):
        where = f"tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) and call.get("function") else call
        if not isinstance(fn, dict):
            fix = 'send {"function": {"name": ..., "arguments": ...}}'
            raise _fail(index, f"{where} is not an object", fix)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(index, f"{where} has no function name", "set function.name to the tool's name")
        args = fn.get("arguments")
        if args is None or (isinstance(args, str) and not args.strip()):
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                raise _fail(
                    index,
                    f"{where}.function.arguments is not valid JSON ({exc})",
                    "send a JSON object string or a dict",
                ) from exc
        if not isinstance(args, dict):
            raise _fail(
                index,
                f"{where}.function.arguments is a {type(args).__name__}, not an object",
                "send the arguments as a JSON object",
            )
        calls.append((name, args))
    return calls


def normalize_messages(messages: Any) -> list[ChatMessage]:
    """Validate OpenAI-style messages; a ValueError names the message index and the fix."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _fail(i, f"is a {type(msg).__name__}", "send a dict with 'role' and 'content'")
        role = msg.get("role")
        if role not in ROLES:
            raise _fail(i, f"unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if role != "assistant" and "content" not in msg:
            raise _fail(i, f"{role} message has no 'content'", "add a string (or a list of text parts)")
        content = _visible_text(msg.get("content"), i, role)
        if role != "assistant":
            out.append(ChatMessage(role, content))
            continue
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise _fail(i, "reasoning_content is not a string", "send the reasoning text or null")
        out.append(ChatMessage(role, content, reasoning, _tool_calls(msg.get("tool_calls"), i)))
    return out


def _template_pieces(text: str) -> list[tuple[str, bool]]:
    """Template-owned ``text`` cut into (piece, is_special) at every special-token string it spells."""
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
    return [(piece, k % 2 == 1) for k, piece in enumerate(re.split(pattern, text))]


_FOOTER_PIECES = _template_pieces(TOOLS_FOOTER)


def _tools_segments(tools: Any) -> list[Segment]:
    """The tools system block after ``<|system|>``: the header and the tools' JSON lines are one literal
    text run (client text), then the footer, whose example tags are the template's own special tokens."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError('tools must be a list of {"type": "function", "function": {...}} objects')
    try:
        lines = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tools must be JSON-serialisable: {exc}") from exc
    (footer_text, _), *footer = _FOOTER_PIECES
    segs = [Segment(TOOLS_HEADER + lines + footer_text, False, False)]
    return segs + [Segment(piece, special, False) for piece, special in footer]


def _split_reasoning(msg: ChatMessage) -> tuple[str, str]:
    """(reasoning, content): ``reasoning_content`` if given, else split out of content at ``</think>``."""
    if msg.reasoning is not None:
        return msg.reasoning, msg.content
    content = msg.content
    if "</think>" not in content:
        return "", content
    parts = content.split("</think>")
    reasoning = parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, parts[-1].lstrip("\n")


def _assistant_segments(msg: ChatMessage, keep_reasoning: bool) -> list[Segment]:
    sp = lambda t, train: Segment(t, True, train)
    txt = lambda t: Segment(t, False, True)
    reasoning, content = _split_reasoning(msg)
    segs = [sp("<|assistant|>", False)]
    if keep_reasoning and reasoning:
        segs += [sp("<think>", False), txt(reasoning.strip()), sp("</think>", True)]
    else:
        segs.append(sp("</think>", False))
    if content.strip():
        segs.append(txt(content.strip()))
    for name, args in msg.tool_calls or []:
        segs += [sp("<tool_call>", True), txt(name)]
        for key, value in args.items():
            value_text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            segs += [
                sp("<arg_key>", True),
                txt(str(key)),
                sp("</arg_key>", True),
                sp("<arg_value>", True),
                txt(value_text),
                sp("</arg_value>", True),
            ]
        segs.append(sp("</tool_call>", True))
    return segs


def chat_segments(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
    eos_after_final_assistant: bool = False,
) -> list[Segment]:
    """The rendered conversation as segments (empty text segments dropped)."""
    msgs = normalize_messages(messages)
    segs = [Segment("[gMASK]", True, False), Segment("<sop>", True, False)]
    if tools:
        segs += [Segment("<|system|>", True, False), *_tools_segments(tools)]
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    for i, msg in enumerate(msgs):
        after_assistant = i > 0 and msgs[i - 1].role == "assistant"
        if msg.role == "system":
            segs += [Segment("<|system|>", True, False), Segment(msg.content, False, False)]
        elif msg.role == "user":
            segs += [Segment("<|user|>", True, after_assistant), Segment(msg.content, False, False)]
        elif msg.role == "assistant":
            segs += _assistant_segments(msg, keep_reasoning=not clear_thinking or i > last_user)
        else:
            if i == 0 or msgs[i - 1].role != "tool":
                segs.append(Segment("<|observation|>", True, after_assistant))
            segs += [
                Segment("<tool_response>", True, False),
                Segment(msg.content, False, False),
                Segment("</tool_response>", True, False),
            ]
    if add_generation_prompt:
        opener = "<think>" if enable_thinking else "</think>"
        segs += [Segment("<|assistant|>", True, False), Segment(opener, True, False)]
    elif eos_after_final_assistant and msgs[-1].role == "assistant":
        segs.append(Segment(ENDOFTEXT, True, True))
    return [s for s in segs if s.text]


def render_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """The exact GLM-5 prompt text for OpenAI-style ``messages`` (and ``tools``).

    ``enable_thinking`` picks the generation prompt ``<|assistant|><think>`` (on) or
    ``<|assistant|></think>`` (off); ``clear_thinking=False`` keeps the reasoning of assistant turns
    before the last user message ("preserved thinking").
    """
    segs = chat_segments(
        messages,
        tools,
        enable_thinking=enable_thinking,
        clear_thinking=clear_thinking,
        add_generation_prompt=add_generation_prompt,
    )
    return "".join(s.text for s in segs)


def tokenize_chat(
    tokenizer: GLM5Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` for a conversation, tokenized segment by segment (see module docstring)."""
    segs = chat_segments(
        messages,
        tools,
        enable_thinking=enable_thinking,
        clear_thinking=clear_thinking,
        add_generation_prompt=add_generation_prompt,
        eos_after_final_assistant=True,
    )
    special = tokenizer.require_special_ids(s.text for s in segs if s.special)
    texts = [s.text for s in segs if not s.special]
    encoded = iter(tokenizer.encode_batch(texts, allow_special=False) if texts else [])  # never a control id
    ids: list[int] = []
    mask: list[int] = []
    for seg in segs:
        piece = [special[seg.text]] if seg.special else next(encoded)
        ids += piece
        mask += [int(seg.trainable)] * len(piece)
    return ids, mask
