"""Tokenizer, GLM-5 chat format and output parser: text <-> ids, messages -> prompt, output -> message."""

from glm5.tokenizer.chat import render_chat, tokenize_chat
from glm5.tokenizer.parser import OutputParser, merge_deltas, parse_output
from glm5.tokenizer.tokenizer import EOS_TOKENS, SPECIAL_TOKENS, GLM5Tokenizer

__all__ = [
    "EOS_TOKENS",
    "SPECIAL_TOKENS",
    "GLM5Tokenizer",
    "OutputParser",
    "merge_deltas",
    "parse_output",
    "render_chat",
    "tokenize_chat",
]
