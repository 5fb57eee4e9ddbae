"""GLM-5 output parser: golden parses, schema typing, streaming deltas, and chunking invariance."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm5.tokenizer import SPECIAL_TOKENS, OutputParser, merge_deltas, parse_output, render_chat

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"enum": ["c", "f"]},
                "hourly": {"type": "boolean"},
            },
        },
    },
}
CALC = {
    "type": "function",
    "function": {
        "name": "calc",
        "parameters": {
            "type": "object",
            "properties": {
                "expr": {"type": "string"},
                "precision": {"type": "number"},
                "tags": {"type": "array"},
                "opts": {"type": "object"},
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
        },
    },
}
TYPED = {
    "name": "typed",
    "parameters": {
        "type": "object",
        "$defs": {"Count": {"type": "integer"}},
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "a": {"type": "array"},
            "o": {"type": "object"},
            "u": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "r": {"$ref": "#/$defs/Count"},
            "l": {"type": ["integer", "null"]},
            "e": {"enum": [1, 2]},
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = [WEATHER, CALC, TYPED, GET_TIME]
TAGS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<|user|>",
    "<|observation|>",
    "<|endoftext|>",
)


def call(name: str, **kwargs: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in kwargs.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


def calls_of(msg: dict) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]


def stream(text: str, cuts: list[int], tools=TOOLS, enable_thinking: bool = True) -> list[dict]:
    parser = OutputParser(tools, enable_thinking)
    deltas: list[dict] = []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        deltas += parser.feed(text[a:b])
    return deltas + parser.close()


def check_delta_contract(deltas: list[dict]) -> None:
    """openai-python merges by index: id/name must come once, arguments must be pure suffixes."""
    headers: dict[int, int] = {}
    for delta in deltas:
        assert len(delta) == 1
        for part in delta.get("tool_calls", []):
            if "id" in part:
                assert part["id"].startswith("call_") and part["type"] == "function"
                assert part["function"]["arguments"] == "" and part["function"]["name"]
                headers[part["index"]] = headers.get(part["index"], 0) + 1
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                assert part["index"] in headers
    assert all(n == 1 for n in headers.values())
    assert sorted(headers) == list(range(len(headers)))


# ---------------------------------------------------------------------------- golden parses
def test_thinking_on_output_starts_inside_the_reasoning():
    msg = parse_output("I should greet.\n</think>Hello!")
    assert msg == {"reasoning_content": "I should greet.", "content": "Hello!", "tool_calls": []}
    assert parse_output("<think>r</think>c") == {"reasoning_content": "r", "content": "c", "tool_calls": []}


def test_a_missing_close_think_leaves_everything_in_the_reasoning():
    assert parse_output("cut off while thinking ") == {
        "reasoning_content": "cut off while thinking",
        "content": None,
        "tool_calls": [],
    }


def test_thinking_off_output_is_content_and_stray_tags_stay_content():
    assert parse_output("Hello", enable_thinking=False) == {
        "reasoning_content": None,
        "content": "Hello",
        "tool_calls": [],
    }
    assert parse_output("a</think>b", enable_thinking=False)["content"] == "a</think>b"
    assert parse_output("<think>r</think>c", enable_thinking=False)["reasoning_content"] == "r"


def test_a_tool_call_after_the_reasoning_gets_schema_typed_json_arguments():
    text = "Need weather.</think>Checking." + call("get_weather", city="北京 ", days="3") + "<|observation|>"
    msg = parse_output(text, TOOLS)
    assert msg["reasoning_content"] == "Need weather." and msg["content"] == "Checking."
    assert calls_of(msg) == [("get_weather", '{"city": "北京 ", "days": 3}')]
    assert msg["tool_calls"][0]["type"] == "function" and msg["tool_calls"][0]["id"].startswith("call_")


def test_zero_argument_and_consecutive_calls_with_whitespace_between():
    text = "</think>" + call("get_time") + "\n\n" + call("calc", expr="1 + 1") + "\n"
    msg = parse_output(text, TOOLS)
    assert msg["content"] is None and msg["reasoning_content"] is None
    assert calls_of(msg) == [("get_time", "{}"), ("calc", '{"expr": "1 + 1"}')]


def test_glm45_style_newlines_around_names_and_pairs_are_tolerated():
    text = (
        "</think><tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>"
    )
    assert calls_of(parse_output(text, TOOLS)) == [("get_weather", '{"city": "Oslo"}')]


def test_a_tool_call_inside_the_reasoning_is_a_call_and_the_reasoning_resumes():
    msg = parse_output("plan " + call("get_time") + " more</think>done", TOOLS)
    assert msg["reasoning_content"] == "planmore" and msg["content"] == "done"
    assert calls_of(msg) == [("get_time", "{}")]


def test_stop_tokens_end_the_output():
    msg = parse_output("r</think>b<|user|>ignored" + call("get_time"), TOOLS)
    assert msg == {"reasoning_content": "r", "content": "b", "tool_calls": []}
    assert parse_output("x<|endoftext|>y", enable_thinking=False)["content"] == "x"


def test_malformed_calls_and_truncated_tags_become_content():
    off = {"enable_thinking": False}
    assert parse_output("<tool_call></tool_call>x", **off)["content"] == "<tool_call></tool_call>x"
    bad = "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"
    assert parse_output(bad, **off) == {"reasoning_content": None, "content": bad, "tool_calls": []}
    assert parse_output("Hello <tool_ca", **off)["content"] == "Hello <tool_ca"
    assert parse_output("Hello <tool_call>get_wea", **off)["content"] == "Hello<tool_call>get_wea"
    assert parse_output("r</thin")["reasoning_content"] == "r</thin"
    junk = "</arg_value></tool_call><arg_key><arg_value>"
    assert parse_output(junk, TOOLS, **off)["content"] == junk


def test_a_call_truncated_after_its_name_keeps_the_pairs_seen_as_valid_json():
    head = "</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    assert calls_of(parse_output(head, TOOLS)) == [("get_weather", '{"city": "Par"}')]
    head = "</think><tool_call>get_weather<arg_key>days</arg_key><arg_value>1"
    assert calls_of(parse_output(head, TOOLS)) == [("get_weather", '{"days": 1}')]
    assert calls_of(parse_output("</think><tool_call>get_time<arg_key>ci", TOOLS)) == [("get_time", "{}")]


def test_arguments_are_typed_by_the_schema():
    values = {
        "s": "  raw  ",
        "i": "3.0",
        "n": "2",
        "b": "True",
        "a": "['x', 1]",
        "o": '{"k": [1]}',
        "u": "abc",
        "r": "5",
        "l": "null",
        "e": "2",
        "zz": "x y",
    }
    args = json.loads(calls_of(parse_output("</think>" + call("typed", **values), TOOLS))[0][1])
    assert args == {
        "s": "  raw  ",
        "i": 3,
        "n": 2,
        "b": True,
        "a": ["x", 1],
        "o": {"k": [1]},
        "u": "abc",
        "r": 5,
        "l": None,
        "e": 2,
        "zz": "x y",
    }
    more = {"u": "7", "i": "abc", "s": "12", "zz": "[1, 2]", "n": "1.5"}
    args = json.loads(calls_of(parse_output("</think>" + call("typed", **more), TOOLS))[0][1])
    assert args == {"u": 7, "i": "abc", "s": "12", "zz": [1, 2], "n": 1.5}


def test_without_tools_values_are_json_then_literal_then_raw():
    text = "</think>" + call("anything", a="1", b="hi there", c='{"x": false}', d="None")
    assert calls_of(parse_output(text)) == [
        ("anything", '{"a": 1, "b": "hi there", "c": {"x": false}, "d": null}')
    ]


def test_render_then_parse_gives_back_the_assistant_message():
    user = {"role": "user", "content": "weather and time?"}
    assistant = {
        "role": "assistant",
        "reasoning_content": "Two tools.",
        "content": "On it.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
            },
            {"type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }
    prompt = render_chat([user], TOOLS)
    full = render_chat([user, assistant], TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    msg = parse_output(full[len(prompt) :] + "<|observation|>", TOOLS)
    assert msg["reasoning_content"] == "Two tools." and msg["content"] == "On it."
    assert calls_of(msg) == [("get_weather", '{"city": "Oslo", "days": 2}'), ("get_time", "{}")]


# ---------------------------------------------------------------------------- streaming
def test_a_partial_tag_is_held_back_until_disambiguated():
    parser = OutputParser(TOOLS, enable_thinking=False)
    assert parser.feed("Hello <tool_") == [{"content": "Hello"}]
    deltas = parser.feed("call>get_time</tool_call>")
    assert [d["tool_calls"][0]["function"] for d in deltas] == [
        {"name": "get_time", "arguments": ""},
        {"arguments": "{}"},
    ]
    assert parser.num_tool_calls == 1
    parser = OutputParser(enable_thinking=False)
    assert parser.feed("x <") == [{"content": "x"}]
    assert parser.feed("b") == [{"content": " <b"}]
    assert parser.close() == [] and parser.close() == []


def test_string_arguments_stream_as_suffixes_and_other_values_arrive_whole():
    parser = OutputParser(TOOLS)
    header = parser.feed("ok</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Bei")
    assert header[0] == {"reasoning_content": "ok"}
    assert header[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert header[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Bei'}}]}
    assert parser.feed('"jing</arg_value><arg_key>days</arg_key><arg_value>1') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '\\"jing"'}}]}
    ]
    assert parser.feed("2</arg_value></tool_call>") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ', "days": 12}'}}]}
    ]
    assert parser.feed("<|observation|>more") == [] and parser.close() == []


# ---------------------------------------------------------------------------- properties
SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30).filter(
    lambda s: not any(t in s for t in SPECIAL_TOKENS)  # the parser's tags, and the control tokens it drops
)
WORD = st.text(st.characters(categories=("Ll", "Lu")), min_size=1, max_size=8).map(lambda s: "x_" + s)
VALUES = {
    "string": SAFE_TEXT,
    "integer": st.integers(-(10**12), 10**12),
    "boolean": st.booleans(),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "array": st.lists(st.one_of(st.integers(), SAFE_TEXT), max_size=3),
    "object": st.dictionaries(SAFE_TEXT, st.integers(), max_size=3),
    "enum": st.sampled_from(["c", "f"]),
    "int_or_null": st.one_of(st.none(), st.integers()),
}
PARAMS = {
    "get_weather": {"city": "string", "days": "integer", "units": "enum", "hourly": "boolean"},
    "calc": {
        "expr": "string",
        "precision": "number",
        "tags": "array",
        "opts": "object",
        "limit": "int_or_null",
    },
    "get_time": {},
}


@st.composite
def tool_calls(draw) -> tuple[str, dict]:
    name = draw(st.sampled_from([*PARAMS, "mystery"]))
    if name == "mystery":  # not in the tools: values must survive the JSON-then-literal-then-raw rule
        keys = draw(st.lists(st.sampled_from(["p", "q", "r"]), unique=True))
        return name, {
            k: draw(st.one_of(st.integers(), WORD, st.lists(st.integers(), max_size=2))) for k in keys
        }
    keys = draw(st.permutations(list(PARAMS[name])))[: draw(st.integers(0, len(PARAMS[name])))]
    return name, {k: draw(VALUES[PARAMS[name][k]]) for k in keys}


def render_call(name: str, args: dict) -> str:
    return call(
        name, **{k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in args.items()}
    )


@st.composite
def outputs(draw) -> tuple[str, bool, dict]:
    """(output text, enable_thinking, expected message) for a valid GLM-5 output."""
    thinking = draw(st.booleans())
    reasoning, content = draw(SAFE_TEXT), draw(SAFE_TEXT)
    calls = draw(st.lists(tool_calls(), max_size=3))
    body = content + "".join(draw(st.sampled_from(["", "\n", "\n\n", " "])) + render_call(*c) for c in calls)
    stop = draw(st.sampled_from(["", "<|observation|>", "<|user|>", "<|endoftext|>"]))
    body += stop + (draw(st.sampled_from(["", "junk<tool_call>x</tool_call>"])) if stop else "")
    if thinking and draw(st.booleans()):  # cut off while still reasoning
        text, expected = reasoning, (reasoning.strip() or None, None, [])
    elif thinking:
        text = draw(st.sampled_from(["", "<think>"])) + reasoning + "</think>" + body
        expected = (reasoning.strip() or None, content.strip() or None, calls)
    else:
        text, expected = body, (None, content.strip() or None, calls)
    return (
        text,
        thinking,
        {
            "reasoning_content": expected[0],
            "content": expected[1],
            "tool_calls": [(n, json.dumps(a, ensure_ascii=False)) for n, a in expected[2]],
        },
    )


def comparable(msg: dict) -> dict:
    return {**msg, "tool_calls": calls_of(msg)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=outputs(), data=st.data())
def test_any_chunking_of_a_valid_output_streams_to_the_one_shot_parse(case, data):
    text, thinking, expected = case
    assert comparable(parse_output(text, TOOLS, thinking)) == expected
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    deltas = stream(text, cuts, TOOLS, thinking)
    check_delta_contract(deltas)
    assert comparable(merge_deltas(deltas)) == expected
    one_char = stream(text, list(range(len(text))), TOOLS, thinking)
    assert comparable(merge_deltas(one_char)) == expected


FRAGMENTS = st.sampled_from(
    [
        *TAGS,
        "a",
        " ",
        "\n",
        "x y",
        "<",
        ">",
        "/",
        "3",
        '"',
        "你",
        "get_time",
        "calc",
        "city",
        "<tool",
        "</arg",
        "<|",
        "<tool_call>get_weather",
    ]
)


@st.composite
def garbage(draw) -> str:
    """Tag soup, or a valid output with a span replaced by tag soup."""
    soup = "".join(draw(st.lists(FRAGMENTS, max_size=25)))
    if draw(st.booleans()):
        return soup
    text = draw(outputs())[0]
    i, j = sorted([draw(st.integers(0, len(text))), draw(st.integers(0, len(text)))])
    return text[:i] + soup[: draw(st.integers(0, 12))] + text[j:]


@settings(max_examples=300, deadline=None)
@given(text=garbage(), thinking=st.booleans(), data=st.data())
def test_arbitrary_output_never_raises_and_chunking_never_changes_the_result(text, thinking, data):
    expected = comparable(parse_output(text, TOOLS, thinking))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    deltas = stream(text, cuts, TOOLS, thinking)
    check_delta_contract(deltas)
    assert comparable(merge_deltas(deltas)) == expected
    for _, arguments in expected["tool_calls"]:
        assert isinstance(json.loads(arguments), dict)
