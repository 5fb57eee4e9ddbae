"""The GLM-5 special tokens: their strings, vocabulary order and roles (no dependencies, so the tokenizer, the chat
template and the output parser can all import it)."""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"

SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)
"""Every GLM-5 special token, in vocabulary order (offset from the first special id = index)."""

GLM5_FIRST_SPECIAL_ID = 154820
"""Id of ``<|endoftext|>`` in the real GLM-5 tokenizer; the other specials follow at their offsets."""

EOS_TOKENS: tuple[str, ...] = (ENDOFTEXT, "<|user|>", "<|observation|>")
"""The model ends its turn with one of these (there is no end-of-turn token in the GLM format)."""

PROMPT_PREFIX: tuple[str, ...] = ("[gMASK]", "<sop>")
"""What every GLM prompt starts with; ``encode(..., add_special_tokens=True)`` prepends it."""
