"""The OpenAI-compatible server, driven over real HTTP by the real `openai` SDK (sync and async, streaming and not):
chat with thinking on/off, GLM tool calls, completions with echo/logprobs checked against the model itself,
tokenizer endpoints, metrics, and robustness (API key, bad input, limits, queue, disconnects, 32 clients,
graceful shutdown). Outputs with `<think>` / `<tool_call>` come from scripted mode on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from configs import FRONTEND, random_model, stdlib_tokenizer

from glm5 import GLM5ForCausalLM
from glm5.serve import ServerConfig, ServerThread, build_engine, create_app
from glm5.tokenizer import GLM5Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = FRONTEND.vocab_size
CFG = FRONTEND
KEY = "sk-test-key"
MODEL = "tiny-glm5"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}  # fmt: skip
REASONING, ANSWER = "Jokes need timing.", "Why did the chicken cross the road?"
SCRIPT = [
    {"match": "Tell me a joke<|assistant|><think>", "output": f"{REASONING}</think>{ANSWER}<|user|>"},
    {"match": "Tell me a joke<|assistant|></think>", "output": f"{ANSWER}<|user|>"},
    {"match": "<tool_call>get_time", "output": "<arg_key>tz</arg_key><arg_value>UTC</arg_value></tool_call>"
                                               "<|observation|>"},
    {"match": "weather in Paris", "output": "The user wants weather.</think>I will check.<tool_call>get_weather"
     "<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value>"
     "</tool_call><|observation|>"},
    {"match": "Once upon a time", "output": " there was a dragon."},
]  # fmt: skip


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


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body=None, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(server.url + path, json=body, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)


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


def test_chat_with_thinking_returns_reasoning_under_both_names_and_counts_reasoning_tokens(client, tok) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64)
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.reasoning_content == REASONING and msg.reasoning == REASONING
    assert r.choices[0].finish_reason == "stop" and not msg.tool_calls
    script = tok.encode(f"{REASONING}</think>{ANSWER}<|user|>")
    assert r.usage.completion_tokens == len(script)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(REASONING))
    prompt = tok.apply_chat_template(user("Tell me a joke"), return_loss_mask=False)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.total_tokens == len(prompt) + len(script)


@pytest.mark.parametrize(
    "switch", [{"chat_template_kwargs": {"enable_thinking": False}}, {"thinking": {"type": "disabled"}}]
)
def test_thinking_can_be_turned_off_vllm_style_and_zai_style(client, switch) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64,
                                       extra_body=switch)  # fmt: skip
    msg = r.choices[0].message
    assert msg.content == ANSWER and msg.reasoning_content is None and msg.reasoning is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_call_is_parsed_with_schema_types_and_finish_reason_tool_calls(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Paris?"),
                                       tools=[WEATHER], max_tokens=80)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check." and choice.message.reasoning_content == "The user wants weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # days typed by the schema


def test_streamed_tool_call_deltas_assemble_to_the_same_call_in_the_sdk_helper(client) -> None:
    with client.chat.completions.stream(model=MODEL, messages=user("What is the weather in Paris?"),
                                        tools=[WEATHER], max_tokens=80) as stream:  # fmt: skip
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.content == "I will check."
    assert "tool_calls.function.arguments.delta" in events and "content.done" in events


def test_async_stream_matches_the_whole_answer_and_ends_with_usage(aclient) -> None:
    async def run():
        stream = await aclient.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64,
                                                       stream=True, stream_options={"include_usage": True})  # fmt: skip
        chunks = [c async for c in stream]
        whole = await aclient.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64)
        return chunks, whole

    chunks, whole = asyncio.run(run())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    alias = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content == ANSWER
    assert reasoning == alias == REASONING
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == whole.usage.completion_tokens_details.reasoning_tokens  # noqa: E501


def test_named_tool_choice_forces_that_call_and_none_hides_the_tools(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Time?"), tools=[WEATHER, CLOCK], max_tokens=40,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"tz": "UTC"}
    assert r.choices[0].finish_reason == "tool_calls"
    # tool_choice none: the tools are not rendered and generation stops where a call would start
    r = client.chat.completions.create(model=MODEL, messages=user("What is the weather in Paris?"), tools=[WEATHER],
                                       tool_choice="none", max_tokens=80)  # fmt: skip
    assert r.choices[0].message.content == "I will check." and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=MODEL, messages=user("x"), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})  # fmt: skip


def test_history_accepts_reasoning_under_either_name_or_inline_and_string_arguments(server, tok) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tail = [{"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}]
    variants = [
        {"role": "assistant", "content": "", "reasoning": "R1", "tool_calls": [call]},
        {"role": "assistant", "content": "", "reasoning_content": "R1", "tool_calls": [call]},
        {"role": "assistant", "content": "<think>R1</think>", "tool_calls": [call]},
    ]
    rendered = []
    for assistant in variants:
        r = post(server, "/tokenize", {"messages": user("weather?") + [assistant] + tail, "tools": [WEATHER],
                                       "add_special_tokens": False})  # fmt: skip
        assert r.status_code == 200, r.text
        rendered.append(tok.decode(r.json()["tokens"]))
    assert rendered[0] == rendered[1] == rendered[2]
    text = rendered[0]
    assert "<think>R1</think>" in text and "<arg_value>Paris</arg_value>" in text
    assert "<tool_response>sunny</tool_response>" in text and text.endswith("<|assistant|><think>")


def test_chat_logprobs_n_and_seed(client) -> None:
    kwargs = dict(model=MODEL, messages=user("hello there"), max_tokens=6, temperature=1.0, seed=7, n=2,
                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
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
    assert same == [[e.token for e in c.logprobs.content] for c in b.choices]  # the seed fixes both completions


def test_response_format_json_object_is_accepted(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=user("Tell me a joke"), max_tokens=64,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------------- completions
def test_completion_echo_logprobs_match_a_plain_forward_of_the_model(client, model, tok) -> None:
    prompt = "def add(a, b):\n    return a + b"
    ids = tok.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt) and len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[: len(ids)]) == prompt
    ref = reference_logprobs(model, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), ref, atol=1e-4)
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert max(top.values()) >= tok_lp - 1e-6  # what lm-eval's greedy check reads
    # max_tokens 0 scores the prompt alone
    r0 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].text == prompt and r0.choices[0].logprobs.token_logprobs[1:] == lp.token_logprobs[1 : len(ids)]


def test_completion_prompts_as_token_id_lists_give_one_choice_each(client, tok) -> None:
    prompts = [tok.encode("Once upon a time"), tok.encode("import os")]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == " there was a dragon." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=16, temperature=0)
    assert single.choices[0].text == r.choices[1].text


def test_completion_stream_and_stop_strings(client) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20, stream=True,
                                            stop=["dragon"]))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == " there was a "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tokenizer_endpoints_round_trip_in_vllms_shape(server, tok) -> None:
    info = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == server.engine.engine.max_model_len
    r = post(server, "/tokenize", {"prompt": "hello <think>", "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode("hello <think>") and r["count"] == len(r["tokens"])
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "hello <think>"}
    assert post(server, "/tokenize", {"prompt": "hi"}).json()["tokens"][:2] == tok.encode("[gMASK]<sop>")


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
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99, "logprobs": True}, 400, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
         400, "messages"),
    ],
)  # fmt: skip
def test_bad_chat_requests_get_openai_style_4xx(server, body, status, param) -> None:
    if isinstance(body, bytes):
        r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
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
    first = threading.Thread(target=lambda: held.append(post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 2})))
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


def test_client_disconnect_aborts_generation_and_frees_the_cache(server) -> None:
    engine = server.engine
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": user("go on"), "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert engine.engine.has_unfinished_requests()
    wait_idle(engine)
    assert engine.engine.cache.num_used_blocks == 0
    # a non-streaming request whose client gives up is aborted too
    aborted = server.app.state.server.metrics.finished.labels("abort")
    before = aborted._value.get()
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 480, "ignore_eos": True}, timeout=0.3)
    wait_idle(engine)
    assert engine.engine.cache.num_used_blocks == 0 and aborted._value.get() == before + 1


def test_metrics_report_requests_tokens_latency_and_cache(server, client) -> None:
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
               if line and not line.startswith("#")}  # fmt: skip
    assert samples["glm5:generation_tokens_total"] >= 4 and samples["glm5:prompt_tokens_total"] >= 2
    assert samples["glm5:time_to_first_token_seconds_count"] >= 1
    assert samples["glm5:inter_token_latency_seconds_count"] >= 3
    assert samples['glm5:requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    for name in ("glm5:num_requests_running", "glm5:num_requests_waiting", "glm5:kv_cache_usage_perc",
                 "glm5:prefix_cache_hit_rate", "glm5:prefix_cache_hits_total"):  # fmt: skip
        assert name in samples


def test_32_concurrent_streaming_clients_all_finish_and_the_cache_is_free_after(server, aclient) -> None:
    async def one(i: int) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(model=MODEL, messages=user(f"client {i}"), max_tokens=12,
                                                       stream=True, temperature=0.8, seed=i)  # fmt: skip
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32 and all(reason in ("stop", "length") for _, reason in results)
    wait_idle(server.engine)
    assert server.engine.engine.cache.num_used_blocks == 0 and server.app.state.server.num_pending == 0


def test_graceful_shutdown_finishes_open_streams(model, tok) -> None:
    engine = build_engine(model, tok, block_size=4)
    s = ServerThread(create_app(engine, ServerConfig(model_name=MODEL))).start()
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"prompt": "abc", "max_tokens": 40, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        first = next(lines)
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        rest = [line for line in lines if line]
    stopper.join(30)
    events = [first] + rest
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert not s.thread.is_alive() and engine.engine.cache.num_used_blocks == 0


def test_glm5_help_lists_serve_without_importing_fastapi_or_torch() -> None:
    code = ("import sys\nfrom glm5.cli import build_parser\nbuild_parser()\n"
            "print('fastapi' in sys.modules, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    out = subprocess.run([sys.executable, "-m", "glm5.cli", "serve", "--help"], capture_output=True, text=True)
    assert "--api-key" in out.stdout and "--max-model-len" in out.stdout
