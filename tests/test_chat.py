"""GLM-5 chat format: byte-exact renders from the spec, ids and loss mask, prefixes, validation, CLI."""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import pytest

from glm5.tokenizer import GLM5Tokenizer, render_chat
from glm5.tokenizer.cli import register
from glm5.tokenizer.tokenizer import default_corpus_files

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

TOOLS_SYSTEM = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, '
    '"days": {"type": "integer"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, output the function name and arguments within the following "
    "XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)

AGENT_LOOP = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in 北京?"},
    {
        "role": "assistant",
        "reasoning_content": "\nNeed the tool.\n",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {
        "role": "tool",
        "tool_call_id": "call_2",
        "content": [{"type": "text", "text": "sun"}, {"type": "text", "text": "ny"}],
    },
    {"role": "assistant", "content": "  21 and sunny.  "},
]

AGENT_LOOP_RENDER = (
    "[gMASK]<sop>" + TOOLS_SYSTEM + "<|system|>You are terse.<|user|>Weather in 北京?"
    "<|assistant|><think>Need the tool.</think>"
    "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value>"
    "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
    '<|observation|><tool_response>{"temp": 21}</tool_response><tool_response>sunny</tool_response>'
    "<|assistant|></think>21 and sunny."
)

TWO_TURNS = [
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2", "reasoning_content": "add"},
    {"role": "user", "content": "3+3?"},
]


@pytest.fixture(scope="module")
def tok() -> GLM5Tokenizer:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in default_corpus_files() if f.parent == root][:10]
    return GLM5Tokenizer.train(files, vocab_size=1024)


# ---------------------------------------------------------------------------- golden renders
def test_single_user_turn_renders_the_measured_glm5_prompt():
    assert (
        render_chat([{"role": "user", "content": "你好"}]) == "[gMASK]<sop><|user|>你好<|assistant|><think>"
    )


def test_thinking_off_ends_the_prompt_with_a_closing_think():
    msgs = [{"role": "user", "content": "你好"}]
    assert render_chat(msgs, enable_thinking=False) == "[gMASK]<sop><|user|>你好<|assistant|></think>"
    assert render_chat(msgs, add_generation_prompt=False) == "[gMASK]<sop><|user|>你好"


def test_reasoning_before_the_last_user_message_is_cleared_to_a_lone_close_tag():
    assert (
        render_chat(TWO_TURNS)
        == "[gMASK]<sop><|user|>1+1?<|assistant|></think>2<|user|>3+3?<|assistant|><think>"
    )


def test_clear_thinking_off_preserves_earlier_reasoning():
    assert render_chat(TWO_TURNS, clear_thinking=False) == (
        "[gMASK]<sop><|user|>1+1?<|assistant|><think>add</think>2<|user|>3+3?<|assistant|><think>"
    )


def test_agent_loop_with_tools_renders_byte_exact():
    assert render_chat(AGENT_LOOP, [WEATHER], add_generation_prompt=False) == AGENT_LOOP_RENDER


def test_tools_block_precedes_the_first_message_and_empty_tools_add_nothing():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat(msgs, [WEATHER]) == "[gMASK]<sop>" + TOOLS_SYSTEM + "<|user|>hi<|assistant|><think>"
    assert render_chat(msgs, []) == render_chat(msgs)


def test_reasoning_is_split_out_of_content_at_the_close_tag():
    think = {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}
    user = {"role": "user", "content": "q"}
    assert render_chat([user, think], add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>q<|assistant|><think>plan</think>answer"
    )
    assert render_chat([user, think, user], add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>q<|assistant|></think>answer<|user|>q"
    )
    given = {"role": "assistant", "content": "a</think>b", "reasoning_content": "r"}
    assert render_chat([user, given], add_generation_prompt=False).endswith(
        "<|assistant|><think>r</think>a</think>b"
    )


def test_tool_call_values_are_verbatim_strings_or_json_and_envelopes_are_optional():
    call = {
        "name": "f",
        "arguments": {"q": " a b ", "n": 3, "x": 1.5, "ok": True, "xs": [1, "两"], "o": {"k": None}},
    }
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert render_chat(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>u<|assistant|></think><tool_call>f"
        "<arg_key>q</arg_key><arg_value> a b </arg_value><arg_key>n</arg_key><arg_value>3</arg_value>"
        "<arg_key>x</arg_key><arg_value>1.5</arg_value><arg_key>ok</arg_key><arg_value>true</arg_value>"
        '<arg_key>xs</arg_key><arg_value>[1, "两"]</arg_value>'
        '<arg_key>o</arg_key><arg_value>{"k": null}</arg_value>'
        "</tool_call>"
    )


def test_zero_argument_and_multiple_calls_follow_each_other():
    calls = [
        {"function": {"name": "get_time", "arguments": ""}},
        {"function": {"name": "g", "arguments": "{}"}},
    ]
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "ok", "tool_calls": calls}]
    assert render_chat(msgs, add_generation_prompt=False).endswith(
        "<|assistant|></think>ok<tool_call>get_time</tool_call><tool_call>g</tool_call>"
    )


def test_user_and_system_text_is_kept_verbatim_and_list_content_is_joined():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": " s1 "}, "s2"]},
        {"role": "user", "content": "\n  spaced  \n"},
    ]
    assert render_chat(msgs) == "[gMASK]<sop><|system|> s1 s2<|user|>\n  spaced  \n<|assistant|><think>"


def test_tool_results_after_a_user_message_each_open_their_own_observation():
    msgs = [
        {"role": "user", "content": "u"},
        {"role": "tool", "content": "a"},
        {"role": "user", "content": "v"},
        {"role": "tool", "content": "b"},
    ]
    assert render_chat(msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>u<|observation|><tool_response>a</tool_response>"
        "<|user|>v<|observation|><tool_response>b</tool_response>"
    )


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([], "non-empty list"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            r"messages\[1\]: unknown role 'bot'",
        ),
        ([{"role": "user"}], r"messages\[0\]: user message has no 'content'"),
        ([{"role": "tool", "content": None}], r"messages\[0\]: tool message has no 'content'"),
        ([{"role": "user", "content": 5}], r"messages\[0\]: content is a int"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"content\[0\] is a 'image_url' part",
        ),
        ([{"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], "tool_calls is not a list"),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}],
            r"tool_calls\[0\] has no function name",
        ),
        (
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
            ],
            r"messages\[1\]: tool_calls\[0\].function.arguments is not valid JSON",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                }
            ],
            "is a list, not an object",
        ),
        (
            [{"role": "assistant", "content": "x", "reasoning_content": 3}],
            "reasoning_content is not a string",
        ),
        (["hello"], r"messages\[0\]: is a str"),
    ],
)
def test_malformed_messages_raise_a_value_error_naming_the_message(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_chat(messages)


def test_tools_must_be_a_list_of_objects():
    with pytest.raises(ValueError, match="tools must be a list"):
        render_chat([{"role": "user", "content": "u"}], tools={"name": "f"})


# ---------------------------------------------------------------------------- ids and loss mask
def test_ids_are_the_text_tokenized_with_every_special_tag_a_single_id(tok):
    ids, mask = tok.apply_chat_template(AGENT_LOOP, [WEATHER], add_generation_prompt=True)
    text = render_chat(AGENT_LOOP, [WEATHER])
    assert tok.decode(ids) == text
    assert len(mask) == len(ids)
    specials = set(tok.special_token_ids.values())
    spelled = sum(text.count(t) for t in tok.special_token_ids)
    # 27 from the template, 10 spelled inside the tools instructions (HF matches them in text too)
    assert sum(i in specials for i in ids) == spelled == 37


def test_loss_mask_covers_exactly_what_the_assistant_generates_plus_its_stop_tokens(tok):
    ids, mask = tok.apply_chat_template(AGENT_LOOP, [WEATHER], add_generation_prompt=False)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == (
        "Need the tool.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call><|observation|>"
        "21 and sunny.<|endoftext|>"
    )
    # the final assistant turn ends with an <|endoftext|> in the ids only; the text is the template's
    assert tok.decode(ids) == AGENT_LOOP_RENDER + "<|endoftext|>"
    assert ids[-1] == tok.token_to_id("<|endoftext|>") and mask[-1] == 1


def test_the_user_marker_after_an_assistant_turn_is_its_trained_stop_token(tok):
    ids, mask = tok.apply_chat_template(TWO_TURNS)
    user_id = tok.token_to_id("<|user|>")
    user_positions = [p for p, i in enumerate(ids) if i == user_id]
    assert [mask[p] for p in user_positions] == [0, 1]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2<|user|>"


def test_prompt_only_conversations_have_an_all_zero_mask(tok):
    ids, mask = tok.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    )
    assert mask == [0] * len(ids)


def test_tokenize_false_returns_the_render_and_loss_mask_is_optional(tok):
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == render_chat(TWO_TURNS)
    ids = tok.apply_chat_template(TWO_TURNS, return_loss_mask=False)
    assert ids == tok.apply_chat_template(TWO_TURNS)[0]
    text = tok.apply_chat_template(TWO_TURNS, enable_thinking=False, clear_thinking=False, tokenize=False)
    assert text == render_chat(TWO_TURNS, enable_thinking=False, clear_thinking=False)


def _is_prefix(short: list[int], long: list[int]) -> bool:
    return long[: len(short)] == short


def test_a_prefix_of_an_agent_loop_tokenizes_to_a_prefix_of_its_ids(tok):
    full, _ = tok.apply_chat_template(AGENT_LOOP, [WEATHER], add_generation_prompt=False)
    for k in range(1, len(AGENT_LOOP)):
        if AGENT_LOOP[k - 1]["role"] != "assistant":  # a final assistant turn gets an <|endoftext|>
            ids, _ = tok.apply_chat_template(AGENT_LOOP[:k], [WEATHER], add_generation_prompt=False)
            assert _is_prefix(ids, full), k
        if AGENT_LOOP[k]["role"] == "assistant":  # the generation prompt is a prefix of the answer
            thinks = bool(AGENT_LOOP[k].get("reasoning_content"))  # <think> opens it, or </think> skips it
            prompt, _ = tok.apply_chat_template(AGENT_LOOP[:k], [WEATHER], enable_thinking=thinks)
            assert _is_prefix(prompt, full), k


def test_with_preserved_thinking_every_prefix_of_a_multi_turn_chat_is_a_prefix(tok):
    chat = [
        *TWO_TURNS,
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
        {"role": "user", "content": "thanks"},
    ]
    full, _ = tok.apply_chat_template(chat, clear_thinking=False, add_generation_prompt=False)
    for k in (1, 3, 5):
        ids, _ = tok.apply_chat_template(chat[:k], clear_thinking=False, add_generation_prompt=False)
        assert _is_prefix(ids, full)
    for k in (1, 3):
        prompt, _ = tok.apply_chat_template(chat[:k], clear_thinking=False)
        assert _is_prefix(prompt, full)
    # with clearing on, a new user message rewrites the earlier turn, so the prefix property breaks
    two, _ = tok.apply_chat_template(chat[:2], add_generation_prompt=False)
    three, _ = tok.apply_chat_template(chat[:3], add_generation_prompt=False)
    assert _is_prefix(two[:-1], tok.apply_chat_template(chat[:3], clear_thinking=False)[0])
    assert not _is_prefix(two[:-1], three)


def test_segments_are_tokenized_separately_so_merges_never_cross_a_boundary(tok):
    # "ab" + "c" as two user turns must not tokenize as the string "abc" would
    msgs = [{"role": "user", "content": "def"}, {"role": "user", "content": "ine"}]
    ids, _ = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert ids[3:] == tok.encode("def") + [tok.token_to_id("<|user|>")] + tok.encode("ine")


# ---------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glm5")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_chat_template_prints_the_render(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps(AGENT_LOOP, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "t.json").write_text(json.dumps([WEATHER]), encoding="utf-8")
    args = _cli(
        [
            "chat-template",
            "--messages",
            str(tmp_path / "m.json"),
            "--tools",
            str(tmp_path / "t.json"),
            "--no-thinking",
        ]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out == render_chat(AGENT_LOOP, [WEATHER], enable_thinking=False) + "\n"


def test_cli_chat_template_accepts_an_object_with_messages_and_tools(tmp_path, capsys):
    (tmp_path / "req.json").write_text(
        json.dumps({"messages": TWO_TURNS, "tools": [WEATHER]}), encoding="utf-8"
    )
    args = _cli(["chat-template", "--messages", str(tmp_path / "req.json"), "--keep-thinking"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == render_chat(TWO_TURNS, [WEATHER], clear_thinking=False) + "\n"


def test_cli_chat_template_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps([{"role": "robot", "content": "x"}]), encoding="utf-8")
    args = _cli(["chat-template", "--messages", str(tmp_path / "m.json")])
    assert args.func(args) == 2
    assert "unknown role 'robot'" in capsys.readouterr().err
    args = _cli(["chat-template", "--messages", str(tmp_path / "missing.json")])
    assert args.func(args) == 2
