"""Turn GLM-5 output text into reasoning, content and tool calls, in one shot or as OpenAI stream deltas.

The model's output (decoded with special tokens kept) looks like::

    reasoning</think>content<tool_call>get_time<arg_key>tz</arg_key><arg_value>UTC</arg_value></tool_call>

With thinking on, the prompt ends in ``<think>``, so the output starts inside the reasoning (a
leading ``<think>`` is tolerated). Rules, shared by ``OutputParser`` (streaming) and ``parse_output``:

* Reasoning runs to the first ``</think>`` (or to the end, when it never comes). A ``<tool_call>``
  inside the reasoning is parsed as a call, after which the reasoning resumes.
* Everything else outside tool calls is content. Each run of reasoning or content text is
  whitespace-trimmed at both ends; whitespace-only runs vanish (e.g. newlines between calls).
* A call is ``<tool_call>NAME`` then pairs ``<arg_key>K</arg_key><arg_value>V</arg_value>`` then
  ``</tool_call>``; whitespace between the tags is ignored. Values are typed by the request's tool
  schema: string parameters keep the raw text; others are JSON, else a Python literal, else the raw
  string (``anyOf``/``oneOf``/type lists/``$ref`` resolved; integers given as ``3.0`` become ``3``).
  Arguments are a JSON object string, ``json.dumps(..., ensure_ascii=False)`` spacing.
* A call with an empty name, or whose name never ends, is content, verbatim. A call cut off after
  its name (truncation) is kept, with the pairs seen so far and valid JSON.
* ``<|user|>``, ``<|observation|>`` and ``<|endoftext|>`` end the output; what follows is ignored.
* Every other GLM special token (``<|assistant|>``, ``<|system|>``, ``[gMASK]``, ``<sop>``,
  ``<tool_response>``, the multimodal markers, ...: ``DROPPED_TAGS``) is a control token, not text,
  and is dropped wherever it appears, so it never reaches reasoning, content, a tool name or an
  argument (vLLM and SGLang get the same by decoding with ``skip_special_tokens``). The structural
  tags above are kept as text where they are out of place (e.g. ``</think>`` in content), and a
  malformed call stays content verbatim. Text is all the parser sees, so the same characters written
  as plain bytes by the model are dropped too.
* Partial tags are held back until they are disambiguated, and the parser never raises on output.

Streaming deltas have the OpenAI shape: ``{"reasoning_content": s}``, ``{"content": s}``, a call
header ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``
sent once, then pure argument suffixes ``{"tool_calls": [{"index", "function": {"arguments": s}}]}``.
String values stream as they arrive; other values are sent whole when their ``</arg_value>`` arrives.
"""

from __future__ import annotations

import ast
import enum
import json
import uuid
from typing import Any

from glm5.tokenizer.special import SPECIAL_TOKENS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
STOP_TAGS = ("<|user|>", "<|observation|>", "<|endoftext|>")
_STRUCTURAL = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)
DROPPED_TAGS = tuple(t for t in SPECIAL_TOKENS if t not in _STRUCTURAL + STOP_TAGS)
"""Special tokens that never appear in any parsed field (see the module docstring)."""


class _S(enum.Enum):
    START = "start"
    REASONING = "reasoning"
    CONTENT = "content"
    NAME = "name"
    KEY = "key"
    BEFORE_VALUE = "before_value"
    STR_VALUE = "str_value"
    RAW_VALUE = "raw_value"
    AFTER_VALUE = "after_value"
    BAD_CALL = "bad_call"
    DONE = "done"


_TAGS: dict[_S, tuple[str, ...]] = {
    _S.REASONING: (THINK_CLOSE, CALL_OPEN),
    _S.CONTENT: (CALL_OPEN,),
    _S.NAME: (KEY_OPEN, CALL_CLOSE),
    _S.KEY: (KEY_CLOSE, CALL_CLOSE),
    _S.BEFORE_VALUE: (VALUE_OPEN, KEY_OPEN, CALL_CLOSE),
    _S.STR_VALUE: (VALUE_CLOSE, CALL_CLOSE),
    _S.RAW_VALUE: (VALUE_CLOSE, CALL_CLOSE),
    _S.AFTER_VALUE: (KEY_OPEN, CALL_CLOSE),
    _S.BAD_CALL: (CALL_CLOSE,),
}
_TAGS = {state: tags + STOP_TAGS + DROPPED_TAGS for state, tags in _TAGS.items()}
_IN_CALL = frozenset([_S.KEY, _S.BEFORE_VALUE, _S.STR_VALUE, _S.RAW_VALUE, _S.AFTER_VALUE])
"""States inside a call whose header (id, name) has been sent."""


# ---------------------------------------------------------------------------- schema typing
def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _resolve_ref(ref: Any, root: dict[str, Any]) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


def schema_types(schema: Any, root: dict[str, Any], depth: int = 0) -> frozenset[str] | None:
    """JSON types a schema allows (``type``, type lists, anyOf/oneOf, ``$ref``, ``enum``); None if unknown."""
    if depth > 16 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        return schema_types(_resolve_ref(schema["$ref"], root), root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset([kind])
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        return frozenset(kind)
    for key in ("anyOf", "oneOf"):
        alternatives = schema.get(key)
        if isinstance(alternatives, list) and alternatives:
            union: set[str] = set()
            for alt in alternatives:
                types = schema_types(alt, root, depth + 1)
                if types is None:
                    return None
                union |= types
            return frozenset(union)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return frozenset(_json_type(v) for v in schema["enum"])
    return None


def _parse_literal(raw: str) -> tuple[Any, bool]:
    """JSON first, then a Python literal (``True``, ``'x'``, ``(1, 2)``); (value, parsed?)."""
    try:
        return json.loads(raw), True
    except ValueError:
        pass
    try:
        value = ast.literal_eval(raw.strip())
    except Exception:  # literal_eval raises many kinds (ValueError, SyntaxError, RecursionError, ...)
        return None, False
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None, False
    return value, True


def convert_value(raw: str, types: frozenset[str] | None) -> Any:
    """A raw ``<arg_value>`` text as the typed value its schema types call for."""
    if types == frozenset(["string"]):
        return raw
    value, ok = _parse_literal(raw)
    if not ok or isinstance(value, str):
        return raw  # the template writes strings verbatim, so a parsed string was really the raw text
    if types is None:
        return value
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        value = int(value)
    kind = _json_type(value)
    if kind in types or (kind == "integer" and "number" in types) or "string" not in types:
        return value
    return raw


def tool_schemas(tools: Any) -> dict[str, dict[str, Any]]:
    """``{name: parameters schema}`` for OpenAI-style tools (``{"type": "function", "function": ...}``)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name, params = fn.get("name"), fn.get("parameters")
        if isinstance(name, str):
            out[name] = params if isinstance(params, dict) else {}
    return out


# ---------------------------------------------------------------------------- streaming parser
def _held_suffix(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    for k in range(min(len(buf), max(len(t) for t in tags) - 1), 0, -1):
        tail = buf[-k:]
        if any(t.startswith(tail) for t in tags):
            return k
    return 0


class OutputParser:
    """Incremental GLM-5 output parser: ``feed(text_delta)`` and ``close()`` return OpenAI deltas."""

    def __init__(self, tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True) -> None:
        self._schemas = tool_schemas(tools)
        self._thinking = enable_thinking
        self._state = _S.START
        self._resume = _S.CONTENT  # where text goes after a tool call ends
        self._buf = ""
        self._out: list[dict[str, Any]] = []
        # current text run (reasoning or content): trimmed at both ends
        self._run_kind = ""
        self._run_started = False
        self._pending_ws = ""
        # current tool call
        self._num_calls = 0
        self._name = ""
        self._key = ""
        self._value = ""
        self._num_pairs = 0

    @property
    def num_tool_calls(self) -> int:
        """Tool calls started so far (a server reports finish_reason "tool_calls" when > 0)."""
        return self._num_calls + int(self._state in _IN_CALL)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Consume the next piece of output text; return the deltas it completes."""
        if not isinstance(text, str):
            raise ValueError(f"OutputParser.feed expects str, got {type(text).__name__}")
        if self._state is not _S.DONE:
            self._buf += text
            self._run(final=False)
        return self._take()

    def close(self) -> list[dict[str, Any]]:
        """End of output: flush held-back text and finish an open call."""
        if self._state is not _S.DONE:
            self._run(final=True)
            self._finish()
        return self._take()

    # -- machinery
    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    def _run(self, final: bool) -> None:
        while self._state is not _S.DONE:
            if self._state is _S.START:
                dropped = next((t for t in DROPPED_TAGS if self._buf.startswith(t)), "")
                if dropped:  # e.g. a stray <sop>: the output may still open with <think>
                    self._buf = self._buf[len(dropped) :]
                elif self._buf.startswith(THINK_OPEN):  # tolerated even with thinking off
                    self._buf = self._buf[len(THINK_OPEN) :]
                    self._state = _S.REASONING
                elif any(t.startswith(self._buf) for t in (THINK_OPEN, *DROPPED_TAGS)) and not final:
                    return  # could still become <think> (or a dropped tag)
                else:
                    self._state = _S.REASONING if self._thinking else _S.CONTENT
                continue
            tags = _TAGS[self._state]
            pos, tag = min(((p, t) for t in tags if (p := self._buf.find(t)) >= 0), default=(-1, ""))
            if not tag:
                hold = 0 if final else _held_suffix(self._buf, tags)
                text, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
                if text:
                    self._on_text(text)
                return
            text, self._buf = self._buf[:pos], self._buf[pos + len(tag) :]
            if text:
                self._on_text(text)
            self._on_tag(tag)

    def _emit(self, delta: dict[str, Any]) -> None:
        last = self._out[-1] if self._out else None
        if last is not None and delta.keys() == last.keys() and "tool_calls" not in delta:
            key = next(iter(delta))
            last[key] += delta[key]
            return
        if last is not None and "tool_calls" in delta and "tool_calls" in last:
            new, old = delta["tool_calls"][0], last["tool_calls"][0]
            if "id" not in new and "id" not in old and old["index"] == new["index"]:
                old["function"]["arguments"] += new["function"]["arguments"]
                return
        self._out.append(delta)

    def _emit_args(self, text: str) -> None:
        self._emit({"tool_calls": [{"index": self._num_calls, "function": {"arguments": text}}]})

    def _emit_text(self, kind: str, text: str) -> None:
        if kind != self._run_kind:
            self._end_run()
            self._run_kind = kind
        if not self._run_started:
            text = text.lstrip()
            if not text:
                return
        body = text.rstrip()
        if not body:
            self._pending_ws += text
            return
        self._emit({kind: self._pending_ws + body})
        self._pending_ws = text[len(body) :]
        self._run_started = True

    def _end_run(self) -> None:
        self._run_kind, self._run_started, self._pending_ws = "", False, ""

    def _on_text(self, text: str) -> None:
        state = self._state
        if state is _S.REASONING:
            self._emit_text("reasoning_content", text)
        elif state in (_S.CONTENT, _S.BAD_CALL):
            self._emit_text("content", text)
        elif state is _S.NAME:
            self._name += text
        elif state is _S.KEY:
            self._key += text
        elif state is _S.RAW_VALUE:
            self._value += text
        elif state is _S.STR_VALUE:
            self._emit_args(json.dumps(text, ensure_ascii=False)[1:-1])
        # BEFORE_VALUE / AFTER_VALUE: stray text between tags is dropped

    def _on_tag(self, tag: str) -> None:
        state = self._state
        if tag in DROPPED_TAGS:
            return  # a control token is never text: the run it interrupts simply goes on
        if tag in STOP_TAGS:
            self._finish()
        elif state in (_S.REASONING, _S.CONTENT):
            self._end_run()
            if tag == THINK_CLOSE:
                self._state = _S.CONTENT
            else:
                self._resume, self._state, self._name = state, _S.NAME, ""
        elif state is _S.NAME:
            self._on_name_end(tag)
        elif state is _S.BAD_CALL:
            self._emit_text("content", tag)
            self._end_run()
            self._state = self._resume
        elif tag == CALL_CLOSE:
            self._end_value()
            self._end_call()
        elif tag == KEY_CLOSE:
            self._state = _S.BEFORE_VALUE
        elif tag == KEY_OPEN:
            self._end_value()
            self._state, self._key = _S.KEY, ""
        elif tag == VALUE_OPEN:
            self._start_value()
        elif tag == VALUE_CLOSE:
            self._end_value()
            self._state = _S.AFTER_VALUE

    def _on_name_end(self, tag: str) -> None:
        name = self._name.strip()
        if not name:  # malformed: the whole call region becomes content
            self._emit_text("content", CALL_OPEN + self._name + tag)
            if tag == CALL_CLOSE:
                self._end_run()
                self._state = self._resume
            else:
                self._state = _S.BAD_CALL
            return
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self._emit(
            {
                "tool_calls": [
                    {
                        "index": self._num_calls,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )
        self._num_pairs = 0
        if tag == CALL_CLOSE:
            self._end_call()
        else:
            self._state, self._key = _S.KEY, ""

    def _types(self) -> frozenset[str] | None:
        root = self._schemas.get(self._name.strip())
        props = root.get("properties") if root is not None else None
        if not isinstance(props, dict) or self._key.strip() not in props:
            return None
        return schema_types(props[self._key.strip()], root)

    def _pair_prefix(self) -> str:
        sep = "{" if self._num_pairs == 0 else ", "
        self._num_pairs += 1
        return sep + json.dumps(self._key.strip(), ensure_ascii=False) + ": "

    def _start_value(self) -> None:
        if self._types() == frozenset(["string"]):
            self._emit_args(self._pair_prefix() + '"')
            self._state = _S.STR_VALUE
        else:
            self._state, self._value = _S.RAW_VALUE, ""

    def _end_value(self) -> None:
        """Close an open value (string: the quote; other: the whole converted pair)."""
        if self._state is _S.STR_VALUE:
            self._emit_args('"')
        elif self._state is _S.RAW_VALUE:
            value = convert_value(self._value, self._types())
            self._emit_args(self._pair_prefix() + json.dumps(value, ensure_ascii=False))
        self._state = _S.AFTER_VALUE

    def _end_call(self) -> None:
        self._emit_args("}" if self._num_pairs else "{}")
        self._num_calls += 1
        self._state = self._resume

    def _finish(self) -> None:
        """End of output (close() or a stop tag): settle whatever is open."""
        state = self._state
        if state is _S.NAME:
            self._end_run()
            self._emit_text("content", CALL_OPEN + self._name)
        elif state in _IN_CALL:
            self._end_value()
            self._end_call()
        self._end_run()
        self._state, self._buf = _S.DONE, ""


def merge_deltas(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Accumulate OpenAI stream deltas as a client does into ``{reasoning_content, content, tool_calls}``."""
    reasoning, content = [], []
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        reasoning.append(delta.get("reasoning_content") or "")
        content.append(delta.get("content") or "")
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(
                part["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = part.get("id", call["id"])
            call["function"]["name"] += part["function"].get("name", "")
            call["function"]["arguments"] += part["function"].get("arguments", "")
    return {
        "reasoning_content": "".join(reasoning) or None,
        "content": "".join(content) or None,
        "tool_calls": [calls[i] for i in sorted(calls)],
    }


def parse_output(
    text: str, tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True
) -> dict[str, Any]:
    """Parse a whole GLM-5 output into ``{"reasoning_content", "content", "tool_calls"}`` (OpenAI shape).

    ``reasoning_content``/``content`` are None when empty; ``tool_calls`` is a list of
    ``{"id", "type": "function", "function": {"name", "arguments": <JSON object string>}}``.
    """
    parser = OutputParser(tools, enable_thinking)
    return merge_deltas(parser.feed(text) + parser.close())
