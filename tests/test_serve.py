"""The OpenAI-compatible server, driven over real HTTP by the real `openai` SDK (sync and async, streaming and not):
chat with thinking on/off, GLM tool calls, completions with echo/logprobs checked against the model itself,
tokenizer endpoints, metrics, and robustness (API key, bad input, limits, queue, disconnects, 32 clients,
graceful shutdown). Outputs with `<think>` / `<tool_call>` come from scripted mode on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from configs import FRONTEND, random_model, stdlib_tokenizer
from lifecycle import HoldAfter, wait_for

from glm5 import GLM5ForCausalLM
from glm5.serve import ServerConfig, ServerThread, build_engine, create_app
from glm5.tokenizer import GLM5Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = FRONTEND.vocab_size
CFG = FRONTEND
KEY = "sk-test-key"
MODEL = "tiny-glm5"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
REASONING, ANSWER = "Jokes need timing.", "Why did the chicken cross the road?"
SCRIPT = [
    {"match": "Tell me a joke<|assistant|><think>", "output": f"{REASONING}</think>{ANSWER}<|user|>"},
    {"match": "Tell me a joke<|assistant|></think>", "output": f"{ANSWER}<|user|>"},
    {
        "match": "<tool_call>get_time",
        "output": "<arg_key>tz</arg_key><arg_value>UTC</arg_value></tool_call><|observation|>",
    },
    {
        "match": "weather in Paris",
        "output": "The user wants weather.</think>I will check.<tool_call>get_weather"
        "<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value>"
        "</tool_call><|observation|>",
    },
    {"match": "Once upon a time", "output": " there was a dragon."},
]


def train_tokenizer() -> GLM5Tokenizer:
    return stdlib_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def tok() -> GLM5Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> GLM5ForCausalLM:
    return random_model(CFG, tok)


@pytest.fixture(scope="module")
def server(model, tok):
    engine = build_engine(model, tok, scripted=SCRIPT, block_size=4)
    app = create_app(engine, ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=1 << 20))
    with ServerThread(app) as s:
        s.app, s.engine = app, engine
        yield s


def server_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server_client(server)


@pytest.fixture()
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body=None, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(
        server.url + path, json=body, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs
    )


def wait_idle(engine, timeout: float = 20.0) -> None:
    """Until the engine has no request left (an abort is applied at the next step)."""
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.engine.has_unfinished_requests()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward (no cache, no engine)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# ------------------------------------------------------------------------------------------------- chat
def test_models_endpoint_lists_the_served_model(client, server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].max_model_len == server.engine.engine.max_model_len


def test_chat_with_thinking_returns_reasoning_under_both_names_and_counts_reasoning_tokens(
    client, tok
) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64)
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.reasoning_content == REASONING and msg.reasoning == REASONING
    assert r.choices[0].finish_reason == "stop" and not msg.tool_calls
    script = tok.encode(f"{REASONING}</think>{ANSWER}<|user|>", allow_special=True)
    assert r.usage.completion_tokens == len(script)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(REASONING))
    prompt = tok.apply_chat_template(user("Tell me a joke"), return_loss_mask=False)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.total_tokens == len(prompt) + len(script)


@pytest.mark.parametrize(
    "switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"thinking": {"type": "disabled"}}]
)
def test_thinking_can_be_turned_off_vllm_style_and_zai_style(client, switch) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=user("Tell me a joke"), max_tokens=64, extra_body=switch
    )
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.reasoning_content is None and msg.reasoning is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_call_is_parsed_with_schema_types_and_finish_reason_tool_calls(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather in Paris?"), tools=[WEATHER], max_tokens=80
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (
        choice.message.content == "I will check."
        and choice.message.reasoning_content == "The user wants weather."
    )
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # days typed by the schema


def test_streamed_tool_call_deltas_assemble_to_the_same_call_in_the_sdk_helper(client) -> None:
    with client.chat.completions.stream(
        model=MODEL, messages=user("What is the weather in Paris?"), tools=[WEATHER], max_tokens=80
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris",
        "days": 3,
    }
    assert (
        final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.content == "I will check."
    )
    assert "tool_calls.function.arguments.delta" in events and "content.done" in events


def test_async_stream_matches_the_whole_answer_and_ends_with_usage(aclient) -> None:
    async def run():
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=user("Tell me a joke"),
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        whole = await aclient.chat.completions.create(
            model=MODEL, messages=user("Tell me a joke"), max_tokens=64
        )
        return chunks, whole

    chunks, whole = asyncio.run(run())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    alias = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content == ANSWER
    assert reasoning == alias == REASONING
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert (
        chunks[-1].usage.completion_tokens_details.reasoning_tokens
        == whole.usage.completion_tokens_details.reasoning_tokens
    )  # noqa: E501


def test_named_tool_choice_forces_that_call_and_none_hides_the_tools(client) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("Time?"),
        tools=[WEATHER, CLOCK],
        max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"tz": "UTC"}
    assert r.choices[0].finish_reason == "tool_calls"
    # tool_choice none: the tools are not rendered and generation stops where a call would start
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("What is the weather in Paris?"),
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=80,
    )
    assert r.choices[0].message.content == "I will check." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=user("x"),
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_history_accepts_reasoning_under_either_name_or_inline_and_string_arguments(server, tok) -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    tail = [{"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}]
    variants = [
        {"role": "assistant", "content": "", "reasoning": "R1", "tool_calls": [call]},
        {"role": "assistant", "content": "", "reasoning_content": "R1", "tool_calls": [call]},
        {"role": "assistant", "content": "<think>R1</think>", "tool_calls": [call]},
    ]
    rendered = []
    for assistant in variants:
        r = post(
            server,
            "/tokenize",
            {
                "messages": user("weather?") + [assistant] + tail,
                "tools": [WEATHER],
                "add_special_tokens": False,
            },
        )
        assert r.status_code == 200, r.text
        rendered.append(tok.decode(r.json()["tokens"]))
    assert rendered[0] == rendered[1] == rendered[2]
    text = rendered[0]
    assert "<think>R1</think>" in text and "<arg_value>Paris</arg_value>" in text
    assert "<tool_response>sunny</tool_response>" in text and text.endswith("<|assistant|><think>")


def test_chat_logprobs_n_and_seed(client) -> None:
    kwargs = dict(
        model=MODEL,
        messages=user("hello there"),
        max_tokens=6,
        temperature=1.0,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 12
    for choice in a.choices:
        lps = choice.logprobs.content
        assert len(lps) == 6
        for entry in lps:
            assert len(entry.top_logprobs) == 3
            values = [t.logprob for t in entry.top_logprobs]
            assert values == sorted(values, reverse=True) and entry.logprob <= values[0] + 1e-6
    same = [[e.token for e in c.logprobs.content] for c in a.choices]
    # the seed fixes both completions
    assert same == [[e.token for e in c.logprobs.content] for c in b.choices]


def test_response_format_json_object_is_accepted(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=user("Tell me a joke"), max_tokens=64, response_format={"type": "json_object"}
    )
    plain = client.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64)
    # an instruction (a system message), not a grammar: the prompt grows, the scripted answer is unchanged
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ANSWER
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens
    assert r.usage.completion_tokens == plain.usage.completion_tokens


# ------------------------------------------------------------------------------------------------- completions
def test_completion_echo_logprobs_match_a_plain_forward_of_the_model(client, model, tok) -> None:
    prompt = "def add(a, b):\n    return a + b"
    # a text prompt starts with [gMASK]<sop>, as vLLM's does
    ids = tok.encode(prompt, add_special_tokens=True)
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[: len(ids)]) == "[gMASK]<sop>" + prompt
    ref = reference_logprobs(model, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), ref, atol=1e-4)
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= tok_lp - 1e-6  # what lm-eval's greedy check reads
    # max_tokens 0 scores the prompt alone
    r0 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert (
        r0.choices[0].text == prompt
        and r0.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1 : len(ids)]
    )


def test_completion_prompts_as_token_id_lists_give_one_choice_each(client, tok) -> None:
    prompts = [tok.encode("Once upon a time"), tok.encode("import os")]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == " there was a dragon." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=16, temperature=0)
    assert single.choices[0].text == r.choices[1].text


def test_completion_stream_and_stop_strings(client) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=20, stream=True, stop=["dragon"]
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == " there was a "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tokenizer_endpoints_round_trip_in_vllms_shape(server, tok) -> None:
    info = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert (
        info["eos_token"] == "<|endoftext|>"
        and info["model_max_length"] == server.engine.engine.max_model_len
    )
    r = post(server, "/tokenize", {"prompt": "hello <think>", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("hello <think>") and r["count"] == len(r["tokens"])
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "hello <think>"}
    prefix = tok.encode("[gMASK]<sop>", allow_special=True)
    assert post(server, "/tokenize", {"prompt": "hi"}).json()["tokens"][:2] == prefix


def test_tokenize_renders_messages_with_the_chat_template_and_names_a_bad_switch(server, tok) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    body = {
        "messages": messages,
        "chat_template_kwargs": {"enable_thinking": False},
        "return_token_strs": True,
    }
    r = post(server, "/tokenize", body).json()
    expected = tok.apply_chat_template(messages, enable_thinking=False, return_loss_mask=False)
    assert r["tokens"] == expected and r["count"] == len(expected) and len(r["token_strs"]) == len(expected)
    no_prompt = post(server, "/tokenize", {**body, "add_generation_prompt": False}).json()["tokens"]
    assert no_prompt == tok.apply_chat_template(
        messages, enable_thinking=False, add_generation_prompt=False, return_loss_mask=False
    )
    bad = post(server, "/tokenize", {"messages": messages, "chat_template_kwargs": {"clear_thinking": "yes"}})
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "chat_template_kwargs.clear_thinking", error
    assert "must be true or false" in error["message"]


# ------------------------------------------------------------------------------------------------- robustness
def test_api_key_is_required_when_set(server) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = post(server, "/v1/completions", {"prompt": "x"}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"model": "tiny-glm5", "messages": [', 400, None),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99, "logprobs": True},
            400,
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}
                ]
            },
            400,
            "messages",
        ),
    ],
)
def test_bad_chat_requests_get_openai_style_4xx(server, body, status, param) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=body,
            timeout=30,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
    else:
        r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_context_and_body_limits_are_clear(server, client, tok) -> None:
    limit = server.engine.engine.max_model_len
    with pytest.raises(openai.BadRequestError, match=rf"context length exceeded: \d+ > {limit - 1}"):
        client.completions.create(model=MODEL, prompt=[5] * (limit + 3), max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=rf"context length exceeded: {limit + 10} > {limit}"):
        client.completions.create(model=MODEL, prompt=[5] * 20, max_tokens=limit - 10)
    r = post(server, "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    bad = post(server, "/v1/completions", {"prompt": [VOCAB + 5]})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=2).choices


def test_full_queue_answers_429_with_retry_after(server) -> None:
    state, engine = server.app.state.server, server.engine.engine
    old = state.config.max_pending_requests
    state.config.max_pending_requests = 1
    engine.pause()  # the first request is admitted and then held in the engine
    held: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: held.append(post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 2}))
    )
    try:
        first.start()
        deadline = time.monotonic() + 10
        while state.num_pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        state.config.max_pending_requests = old
        engine.resume()
    assert post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 2}).status_code == 200
    first.join(30)
    assert held[0].status_code == 200


HELD_AT = 4
"""Tokens a request of `held_server` produces before its engine is held (paused)."""


def resume_everywhere(s) -> None:
    """Un-hold a `held_server` for good, waking its async engine loop (from the test's thread)."""
    s.hold.armed = False
    task = s.engine._task
    if task is not None and not task.done():
        asyncio.run_coroutine_threadsafe(s.engine.resume(), task.get_loop()).result(30)
    else:
        s.engine.engine.resume()


@pytest.fixture()
def held_server(model, tok):
    """A server whose engine holds every request after HELD_AT tokens (tests/lifecycle.py): requests stay
    demonstrably unfinished for as long as a test needs, on any machine."""
    hold = HoldAfter(HELD_AT, token=tok.encode(" go")[0])  # a plain token: no stop ends a request early
    engine = build_engine(model, tok, block_size=4, force_token=hold)
    hold.attach(engine.engine)
    app = create_app(engine, ServerConfig(model_name=MODEL, disconnect_poll_s=0.05))
    with ServerThread(app) as s:
        s.app, s.engine, s.hold = app, engine, hold
        try:
            yield s
        finally:  # never leave a request held: the shutdown would wait for it
            resume_everywhere(s)


def scrape(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def raw_post(server, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket (the test decides exactly when this client goes away: close it)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_client_disconnect_aborts_generation_and_frees_the_cache(held_server, tok) -> None:
    s, hold = held_server, held_server.hold
    engine, metrics = s.engine.engine, s.app.state.server.metrics
    aborted = metrics.finished.labels("abort")
    max_tokens = 400
    # a streaming client reads the first event, then goes away while its request is held mid-generation
    with httpx.stream(
        "POST",
        s.url + "/v1/chat/completions",
        timeout=60,
        json={"messages": user("go on"), "max_tokens": max_tokens, "ignore_eos": True, "stream": True},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping a half-read line iterator closes the connection
        assert next(line for line in lines if line).startswith("data: ")
        hold.wait_held()
        assert engine.has_unfinished_requests() and len(engine.running) == 1
        before = aborted._value.get()
    wait_for(lambda: aborted._value.get() == before + 1, what="the streaming request's abort")
    wait_idle(s.engine)
    prompt = tuple(tok.apply_chat_template(user("go on"), return_loss_mask=False))
    assert hold.produced[prompt] == HELD_AT < max_tokens  # it stopped because of the abort, not the budget
    assert engine.cache.num_used_blocks == 0 and not engine.requests
    wait_for(lambda: s.app.state.server.num_pending == 0, what="the admission slot's release")
    # a non-streaming request whose client gives up (closes the connection) while it is held is aborted too
    hold.resume()
    sock = raw_post(s, "/v1/completions", {"prompt": "abc", "max_tokens": max_tokens, "ignore_eos": True})
    try:
        hold.wait_held()
        assert engine.has_unfinished_requests()
    finally:
        sock.close()
    wait_for(lambda: aborted._value.get() == before + 2, what="the non-streaming request's abort")
    wait_idle(s.engine)
    assert hold.produced[tuple(tok.encode("abc", add_special_tokens=True))] == HELD_AT
    assert engine.cache.num_used_blocks == 0 and not engine.requests
    wait_for(lambda: s.app.state.server.num_pending == 0, what="the admission slot's release")
    assert aborted._value.get() == before + 2  # each disconnect aborted exactly one request
    # the server keeps serving
    hold.resume(keep_armed=False)
    r = post(s, "/v1/completions", {"prompt": "abc", "max_tokens": 6})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6


def test_metrics_count_exactly_the_tokens_of_a_streamed_request(server, client, tok) -> None:
    """Exact differences around one known streaming request: each of its several token deltas is counted."""
    prompt, n = "metrics please", 7
    before = scrape(server)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=n,
            stream=True,
            temperature=0,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage.completion_tokens == n and usage.prompt_tokens == len(
        tok.encode(prompt, add_special_tokens=True)
    )
    ok = 'glm5:requests_total{endpoint="/v1/completions",status="200"}'
    # the request is counted once its response has been sent, which may be just after the client saw the end
    wait_for(lambda: scrape(server).get(ok, 0) == before.get(ok, 0) + 1, what="the request count")
    after = scrape(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(ok) == 1
    assert delta("glm5:prompt_tokens_total") == usage.prompt_tokens
    assert delta("glm5:prefix_cache_queries_total") == usage.prompt_tokens
    assert delta("glm5:generation_tokens_total") == n  # n deltas of one token each, every one counted
    assert delta('glm5:request_success_total{finished_reason="length"}') == 1
    assert delta('glm5:request_success_total{finished_reason="abort"}') == 0
    assert delta("glm5:time_to_first_token_seconds_count") == 1
    assert delta("glm5:inter_token_latency_seconds_count") == n - 1
    assert delta("glm5:e2e_request_latency_seconds_count") == 1
    for name in ("glm5:num_requests_running", "glm5:num_requests_waiting", "glm5:kv_cache_usage_perc"):
        assert after[name] == 0.0
    assert "glm5:prefix_cache_hit_rate" in after and "glm5:prefix_cache_hits_total" in after


def test_32_concurrent_streaming_clients_all_finish_and_the_cache_is_free_after(server, aclient) -> None:
    kwargs = dict(
        model=MODEL,
        max_tokens=12,
        temperature=0.8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await aclient.chat.completions.create(
            messages=user(f"client {i}"),
            stream=True,
            seed=i,
            stream_options={"include_usage": True},
            **kwargs,
        )
        text, reason, used = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return text, reason, used

    async def run():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for i, (text, reason, used) in enumerate(results):
        # each seeded answer is the one the client gets alone: batching with 31 others changes nothing
        alone = server_client(server).chat.completions.create(messages=user(f"client {i}"), seed=i, **kwargs)
        assert (text, reason, used) == (
            alone.choices[0].message.content or "",
            alone.choices[0].finish_reason,
            alone.usage.completion_tokens,
        ), i
        assert (reason == "length") == (used == 12) and reason in ("stop", "length")
    wait_idle(server.engine)
    assert server.engine.engine.cache.num_used_blocks == 0 and server.app.state.server.num_pending == 0


def test_graceful_shutdown_finishes_open_streams(model, tok) -> None:
    """The stream is held mid-generation when the shutdown is asked for. The server must keep draining (not
    begin to shut down: that would give the stream a short grace and cut it) for as long as the stream is
    open; once released, the stream runs to its full length and only then does the server exit."""
    hold, max_tokens = HoldAfter(5, token=tok.encode(" go")[0]), 40
    engine = build_engine(model, tok, block_size=4, force_token=hold)
    hold.attach(engine.engine)
    app = create_app(engine, ServerConfig(model_name=MODEL))
    s = ServerThread(app)
    ticks: list[bool] = []  # uvicorn's main-loop ticks (every 0.1 s) and whether each said "exit now"
    real_tick = s.server.on_tick

    async def tick(counter: int) -> bool:
        exit_now = await real_tick(counter)
        ticks.append(exit_now)
        return exit_now

    s.server.on_tick = tick
    stopper = threading.Thread(target=s.stop)
    s.start()
    try:
        with httpx.stream(
            "POST",
            s.url + "/v1/completions",
            timeout=60,
            json={
                "prompt": "abc",
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r:
            lines = r.iter_lines()  # kept: dropping a half-read line iterator closes the connection
            first = next(line for line in lines if line)
            hold.wait_held()
            stopper.start()
            wait_for(lambda: app.state.server.draining, what="the drain")
            seen = len(ticks)
            wait_for(lambda: len(ticks) >= seen + 2 or s.server.should_exit, what="two ticks of draining")
            assert not s.server.should_exit, "the server began to shut down while a stream was still open"
            assert httpx.get(s.url + "/health", timeout=30).status_code == 503  # still there, draining
            hold.armed = False
            loop = engine._task.get_loop()
            asyncio.run_coroutine_threadsafe(engine.resume(), loop).result(30)
            rest = [line for line in lines if line]
        stopper.join(60)
    finally:
        hold.armed = False
        if s.thread.is_alive() and not stopper.is_alive():
            engine.engine.resume()
            s.stop()
    events = [first] + rest
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]][-1] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == max_tokens  # every token, none cut by the shutdown
    assert hold.produced[tuple(tok.encode("abc", add_special_tokens=True))] == max_tokens
    assert not s.thread.is_alive() and s.error is None and engine.engine.cache.num_used_blocks == 0


def test_glm5_help_lists_serve_without_importing_fastapi_or_torch() -> None:
    code = (
        "import sys\nfrom glm5.cli import build_parser\nbuild_parser()\n"
        "print('fastapi' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    out = subprocess.run(
        [sys.executable, "-m", "glm5.cli", "serve", "--help"], capture_output=True, text=True
    )
    assert "--api-key" in out.stdout and "--max-model-len" in out.stdout
