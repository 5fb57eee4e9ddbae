"""Scripted output: the engine replays given outputs (e.g. `<think>` and `<tool_call>` text) with random weights.

A script is a list of entries `{"match": "text in the prompt" | null, "output": "text" | [token ids]}`. For each
request the first entry whose `match` occurs in the decoded prompt (special tokens kept) is chosen; an entry
without `match` applies to every prompt. The chosen output is forced token by token through
`EngineConfig.force_token`, then `<|endoftext|>` ends it; a request no entry matches is sampled normally. The
real engine still runs (cache, batching, stop strings, logprobs of the forced tokens under the model), so tests
and users exercise every server path deterministically.

    [{"match": "weather", "output": "Let me check.</think><tool_call>get_weather<arg_key>city</arg_key>..."}]
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScriptEntry:
    match: str | None
    """A substring of the decoded prompt that selects this entry (None: every prompt)."""
    output: str | list[int]
    """The output to replay: text (special-token strings become their single ids) or token ids."""


def load_script(source: str | os.PathLike | list[Any]) -> list[ScriptEntry]:
    """Entries from a JSON file path or an already-parsed list; ValueError names the bad entry."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the scripted-output file {os.fspath(source)!r}: {exc}") from None
    if not isinstance(data, list):
        raise ValueError('a script is a list of {"match": str | null, "output": str | [ids]} objects')
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, ScriptEntry):
            entries.append(item)
            continue
        if not isinstance(item, dict) or "output" not in item:
            raise ValueError(f'script entry {i} must be an object with "output" (and optionally "match")')
        output, match = item["output"], item.get("match")
        ok_ids = isinstance(output, list) and all(isinstance(t, int) and t >= 0 for t in output)
        if not (isinstance(output, str) or ok_ids) or not (match is None or isinstance(match, str)):
            raise ValueError(
                f"script entry {i}: output must be a string or a list of token ids, match a string"
            )
        entries.append(ScriptEntry(match, output))
    return entries


class ScriptedOutputs:
    """The `force_token` hook: `(prompt ids, output ids) -> next scripted id, <|endoftext|> at the end, or None`."""

    def __init__(self, entries: list[ScriptEntry], tokenizer: Any, cache_size: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.entries: list[tuple[str | None, list[int]]] = []
        for (
            e
        ) in entries:  # a script stands for the model: its special-token strings are the ids it would emit
            ids = e.output if isinstance(e.output, list) else tokenizer.encode(e.output, allow_special=True)
            self.entries.append((e.match, ids))
        self.end_id = tokenizer.eos_token_id
        self._chosen: OrderedDict[tuple[int, ...], list[int] | None] = OrderedDict()
        self._cache_size = cache_size

    def script_for(self, prompt_ids: list[int]) -> list[int] | None:
        key = tuple(prompt_ids)
        if key in self._chosen:
            self._chosen.move_to_end(key)
            return self._chosen[key]
        size = self.tokenizer.vocab_size  # ids past the tokenizer (a padded model vocabulary) have no text
        text = self.tokenizer.decode([t for t in prompt_ids if t < size], skip_special_tokens=False)
        chosen = next((ids for match, ids in self.entries if match is None or match in text), None)
        self._chosen[key] = chosen
        if len(self._chosen) > self._cache_size:
            self._chosen.popitem(last=False)
        return chosen

    def __call__(self, prompt_ids: list[int], output_ids: list[int]) -> int | None:
        script = self.script_for(prompt_ids)
        if script is None:
            return None
        n = len(output_ids)
        return script[n] if n < len(script) else self.end_id
