"""Issue 14 §2 over real HTTP: no request may answer 5xx or stall other clients. Text the tokenizer cannot take,
token ids past the tokenizer (GLM-5 pads vocab_size beyond it), huge bodies, too many sequences, shutdown while
busy, and the protocol's small corners; after each, the server still serves."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from configs import FRONTEND, random_model, stdlib_tokenizer

from glm5.serve import ServerConfig, ServerThread, build_engine, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_SIZE = 1000
"""The model's vocab_size is FRONTEND's 1024: ids 1000..1023 are padding without text, as GLM-5's past 154,8xx."""
MODEL = "tiny-glm5"
KEY = "sk-harden"
MAX_LEN = 128
BODY_LIMIT = 4 << 20
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tok():
    return stdlib_tokenizer(TOKENIZER_SIZE)


@pytest.fixture(scope="module")
def model(tok):
    return random_model(FRONTEND, tok)


def make_server(model, tok, **config):
    engine = build_engine(model, tok, block_size=4, max_model_len=MAX_LEN)
    options = dict(
        model_name=MODEL, api_key=KEY, max_body_bytes=BODY_LIMIT, model_path="/secret/ckpt/glm5-tiny"
    )
    app = create_app(engine, ServerConfig(**{**options, **config}))
    s = ServerThread(app)
    s.app, s.engine, s.state = app, engine, app.state.server
    return s


@pytest.fixture(scope="module")
def server(model, tok):
    with make_server(model, tok, max_pending_requests=8, max_seqs_per_request=6) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw_post(server, path: str, body, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    """POST `body` as ASCII JSON: lone surrogates travel as `\\ud800` escapes (httpx's json= cannot encode them)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers or HEADERS, timeout=timeout)


def assert_error(r: httpx.Response, status: int, param: str | None = None, match: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert match in error["message"], error
    return error


def assert_still_serving(server) -> None:
    r = raw_post(server, "/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"], r.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def user(text) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------- 1. bad text
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", "a\udfffb"]}, "prompt[1]"),
        # pydantic's own check (constrained str)
        (
            "/v1/completions",
            {"prompt": "x", "stop": ["\ud800"]},
            "stop",
        ),
        ("/v1/chat/completions", {"messages": user("\ud800")}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": user("\ud800"), "stream": True}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": user([{"type": "text", "text": "hi \udc00"}])},
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": user("hi"),
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"c": {"description": "\ud83d"}}},
                        },
                    }
                ],
            },
            "tools[0].function.parameters.properties.c.description",
        ),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/tokenize", {"messages": user("ok") + user("\ud800")}, "messages[1].content"),
    ],
)
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param) -> None:
    assert "\\ud" in json.dumps(body)  # sent as a JSON escape, which Python decodes to an unencodable str
    error = assert_error(raw_post(server, path, body), 400, param)
    assert "not valid Unicode" in error["message"] or "unicode" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert_still_serving(server)


# ------------------------------------------------------------------------------------------------- 2. vocab padding
@pytest.fixture(scope="module")
def padded_server(tok):
    """A model that only ever ranks the padding ids 1000..1023 first: rows in +v/-v pairs, all other rows 0, so for
    any hidden state one of each pair has a positive logit and every real token's logit is 0."""
    model = random_model(FRONTEND, tok, seed=1)
    with torch.no_grad():
        w = model.lm_head.weight
        v = torch.randn(12, w.shape[1])
        w.zero_()
        w[TOKENIZER_SIZE::2] = v
        w[TOKENIZER_SIZE + 1 :: 2] = -v
    with make_server(model, tok) as s:
        yield s


def is_placeholder(token: str) -> bool:
    return token.startswith("<|id:") and token.endswith("|>") and TOKENIZER_SIZE <= int(token[5:-2]) < 1024


def test_sampled_and_top_ids_past_the_tokenizer_read_as_placeholders_in_chat_logprobs(padded_server) -> None:
    body = {
        "messages": user("hello"),
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 5,
        "ignore_eos": True,
        "temperature": 0,
    }
    r = raw_post(padded_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    assert not message["content"] and not message["reasoning_content"]  # padding ids have no text
    assert choice["finish_reason"] == "length"
    entries = choice["logprobs"]["content"]
    assert len(entries) == 4
    for e in entries:
        assert is_placeholder(e["token"]) and e["bytes"] is None
        assert [is_placeholder(t["token"]) for t in e["top_logprobs"]] == [True] * 5
    # streamed: the same tokens, and no in-stream error
    with httpx.stream(
        "POST",
        padded_server.url + "/v1/chat/completions",
        headers=HEADERS,
        timeout=60,
        json={**body, "stream": True},
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert not [e for e in events if "error" in e]
    streamed = [
        x["token"] for e in events for c in e["choices"] for x in (c.get("logprobs") or {}).get("content", [])
    ]
    assert streamed == [e["token"] for e in entries]


def test_prompt_ids_past_the_tokenizer_echo_and_score_with_placeholders(padded_server, tok) -> None:
    text_ids = tok.encode("def add(a, b):")
    prompt = text_ids[:2] + [TOKENIZER_SIZE + 7] + text_ids[2:]
    r = raw_post(
        padded_server,
        "/v1/completions",
        {
            "prompt": prompt,
            "max_tokens": 3,
            "echo": True,
            "logprobs": 3,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "def add(a, b):"  # the padding id has no text, as in generated text
    assert lp["tokens"][2] == f"<|id:{TOKENIZER_SIZE + 7}|>" and len(lp["tokens"]) == len(prompt) + 3
    assert all(is_placeholder(t) for t in lp["tokens"][len(prompt) :])
    for top in lp["top_logprobs"][len(prompt) :]:
        assert all(is_placeholder(t) for t in top)
    # streamed too
    r = raw_post(
        padded_server,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 3, "logprobs": 2, "stream": True, "ignore_eos": True},
    )
    assert r.status_code == 200 and '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]")
    # past the MODEL's vocabulary: 400
    assert_error(
        raw_post(padded_server, "/v1/completions", {"prompt": [5, 1024]}), 400, "prompt", "[0, 1024)"
    )
    assert_still_serving(padded_server)


def test_a_tokenizer_that_does_not_fit_the_model_is_one_warning_line(tok, caplog) -> None:
    def warnings_for(vocab_size: int) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="glm5.serve"):
            create_app(
                build_engine(random_model(FRONTEND.replace(vocab_size=vocab_size), tok), tok, block_size=4)
            )
        return [
            r.getMessage() for r in caplog.records if r.name == "glm5.serve" and r.levelno == logging.WARNING
        ]

    assert warnings_for(1024) == []  # 1000 padded to 1024: normal
    (much_bigger,) = warnings_for(2304)
    assert "2304" in much_bigger and "1000" in much_bigger
    (smaller,) = warnings_for(960)
    assert "960" in smaller and "1000" in smaller


# ------------------------------------------------------------------------------------------------- 3. event loop
class Gate:
    """Makes the tokenizer block on text containing MARK until released: a deterministic 'slow tokenization'."""

    MARK = "GATED-TEXT"

    def __init__(self, monkeypatch, tok) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        for name in ("encode", "encode_batch"):
            original = getattr(tok, name)

            def gated(text, *args, _original=original, **kwargs):
                texts = text if isinstance(text, list) else [text]
                if any(self.MARK in t for t in texts):
                    self.entered.set()
                    assert self.release.wait(60), "the gate was never released"
                return _original(text, *args, **kwargs)

            monkeypatch.setattr(tok, name, gated)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": f"{Gate.MARK} once", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": user(f"{Gate.MARK} once"), "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": user(f"{Gate.MARK} once"), "max_tokens": 2, "stream": True}),
        ("/tokenize", {"prompt": f"{Gate.MARK} once"}),
    ],
)
def test_health_answers_while_a_prompt_is_being_tokenized(server, tok, monkeypatch, path, body) -> None:
    gate = Gate(monkeypatch, tok)
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(raw_post(server, path, body)))
    slow.start()
    try:
        assert gate.entered.wait(30), "the request never reached the tokenizer"
        # the tokenizer is stuck inside the request: only a free event loop can answer these
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200 and slow.is_alive() and not answers
        assert httpx.get(server.url + "/v1/models", headers=HEADERS, timeout=10).status_code == 200
    finally:
        gate.release.set()
        slow.join(60)
    assert answers[0].status_code == 200, answers[0].text


def test_health_answers_while_the_tokenizer_works_on_a_long_text(server, tok, monkeypatch) -> None:
    """Not only off the event loop: the tokenizer must release the GIL (a plain HF `encode` holds it throughout)."""
    import sysconfig

    text = (
        Path(sysconfig.get_paths()["stdlib"]) / "typing.py"
    ).read_text() * 25  # ~3 MB: seconds to tokenize
    started, spans = threading.Event(), []
    for name in ("encode", "encode_batch"):
        original = getattr(tok, name)

        def timed(texts, *args, _original=original, **kwargs):
            if len(texts if isinstance(texts, str) else "".join(texts)) < len(text):
                return _original(texts, *args, **kwargs)
            started.set()
            try:
                return _original(texts, *args, **kwargs)
            finally:
                spans.append(time.monotonic())

        monkeypatch.setattr(tok, name, timed)
    answers: list[httpx.Response] = []
    big = threading.Thread(target=lambda: answers.append(raw_post(server, "/tokenize", {"prompt": text})))
    big.start()
    try:
        assert started.wait(60), "the long text never reached the tokenizer"
        health = httpx.get(server.url + "/health", timeout=60)
        answered = time.monotonic()
    finally:
        big.join(120)
    assert health.status_code == 200 and answers[0].status_code == 200
    [end] = spans
    # answered while the tokenizer was still at work
    assert answered < end, "/health waited for the tokenizer"


def test_text_longer_than_the_context_could_hold_is_refused_before_tokenizing(
    server, tok, monkeypatch
) -> None:
    from glm5.serve.core import max_token_bytes

    bound = server.state.max_prompt_chars
    assert bound == MAX_LEN * max_token_bytes(tok)
    for name in ("encode", "encode_batch"):
        original = getattr(tok, name)

        def refuse_long(text, *args, _original=original, **kwargs):
            texts = text if isinstance(text, list) else [text]
            if sum(map(len, texts)) > bound:
                raise RuntimeError("a text that cannot fit reached the tokenizer")  # a 500 fails the test
            return _original(text, *args, **kwargs)

        monkeypatch.setattr(tok, name, refuse_long)
    long = "x" * (bound + 1)
    for path, body, param in [
        ("/v1/completions", {"prompt": long}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", long]}, "prompt"),
        ("/v1/chat/completions", {"messages": user(long)}, "messages"),
    ]:
        error = assert_error(raw_post(server, path, body), 400, param, "context length exceeded")
        assert error["code"] == "context_length_exceeded"
    # /tokenize has no context to fit (lm-eval tokenizes whole documents): counted, off the event loop
    monkeypatch.undo()
    r = raw_post(server, "/tokenize", {"prompt": long, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["count"] > MAX_LEN
    assert_still_serving(server)


@pytest.mark.parametrize("sample", ["typing.py", "unicode"])
def test_the_character_bound_never_refuses_a_text_that_fits(tok, sample) -> None:
    """Whatever the text, characters <= tokens * max_token_bytes: a text refused by the bound has more tokens than
    the context holds. Checked on code and on text of 1-4-byte characters, encoded literally and not."""
    import sysconfig

    from glm5.serve.core import max_prompt_chars, max_token_bytes

    if sample == "typing.py":
        text = (Path(sysconfig.get_paths()["stdlib"]) / "typing.py").read_text()
    else:
        text = "".join(chr(c) for c in range(0x20, 0x3000, 7)) + "\U0001f600" * 300 + "[gMASK]<|user|>" * 50
    per_token = max_token_bytes(tok)
    for ids in (tok.encode(text), tok.encode(text, allow_special=True)):
        assert len(text) <= len(ids) * per_token
    assert max_prompt_chars(tok, 10) == 10 * per_token  # no normalizer: no widening


# ------------------------------------------------------------------------------------------------- 4. sequences
class HeldSteps:
    """Every engine step blocks (in the engine's worker thread) until released: admitted requests stay open, then
    finish normally. Uses the scripted-output hook, which the engine reads at each step."""

    def __init__(self, server) -> None:
        self.config = server.engine.engine.config
        self.go = threading.Event()

    def __enter__(self) -> HeldSteps:
        self.original = self.config.force_token
        self.config.force_token = lambda prompt, output: None if self.go.wait(60) else None
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        self.config.force_token = self.original


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prompts_times_n_over_the_per_request_limit_is_a_400(server) -> None:
    cases = [
        ({"prompt": ["a"] * 7}, "prompt"),
        ({"prompt": ["a", "b"], "n": 4}, "n"),
        ({"prompt": [[5, 6]] * 3, "n": 3}, "n"),
    ]
    for body, param in cases:
        error = assert_error(
            raw_post(server, "/v1/completions", {**body, "max_tokens": 1}), 400, param, "at most 6"
        )
        assert error["code"] == "too_many_sequences"
    assert_error(
        raw_post(server, "/v1/chat/completions", {"messages": user("x"), "n": 7}), 400, "n", "at most 6"
    )
    assert (
        raw_post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}).status_code
        == 200
    )


def test_admission_counts_sequences_not_requests(server) -> None:
    state = server.state
    held: list[httpx.Response] = []
    first = threading.Thread(
        target=lambda: held.append(
            raw_post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1})
        )
    )
    with HeldSteps(server):
        first.start()
        wait_for(lambda: state.num_pending > 0)
        assert state.num_pending == 6  # 3 prompts x n 2 of the 8 slots
        r = raw_post(server, "/v1/chat/completions", {"messages": user("x"), "n": 3, "max_tokens": 1})
        error = assert_error(r, 429, match="6 + 3")
        assert error["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert state.num_pending == 6
    first.join(60)
    assert held[0].status_code == 200 and len(held[0].json()["choices"]) == 6
    assert state.num_pending == 0
    assert_still_serving(server)


# ------------------------------------------------------------------------------------------------- 5. draining
def test_stop_drains_health_503_new_requests_503_and_open_requests_finish(model, tok) -> None:
    s = make_server(model, tok).start()
    state, engine = s.state, s.engine.engine
    held: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: held.append(
            raw_post(s, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "ignore_eos": True})
        )
    )
    stopper = threading.Thread(target=s.stop)
    with HeldSteps(s):
        request.start()
        wait_for(lambda: state.num_pending == 1)
        stopper.start()
        wait_for(lambda: state.draining, timeout=5)
        # still listening while the admitted request is open
        health = httpx.get(s.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
        r = raw_post(s, "/v1/completions", {"prompt": "new", "max_tokens": 1}, timeout=10)
        assert assert_error(r, 503)["code"] == "shutting_down" and r.headers["retry-after"] == "1"
        assert s.thread.is_alive() and not held
    request.join(60)
    stopper.join(60)
    assert held[0].status_code == 200 and held[0].json()["choices"][0]["finish_reason"] == "length"
    assert not s.thread.is_alive() and engine.cache.num_used_blocks == 0


def test_a_request_still_open_at_the_graceful_timeout_is_aborted_and_the_server_exits(model, tok) -> None:
    engine = build_engine(model, tok, block_size=4, max_model_len=MAX_LEN)
    app = create_app(engine, ServerConfig(model_name=MODEL))
    s = ServerThread(app, graceful_timeout_s=0.5).start()
    engine.engine.pause()  # never resumed: the request cannot finish
    answers: list[httpx.Response] = []
    body = {"prompt": "abc", "max_tokens": 3}
    request = threading.Thread(
        target=lambda: answers.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60))
    )
    request.start()
    wait_for(lambda: app.state.server.num_pending == 1)
    start = time.monotonic()
    s.stop(timeout_s=30)
    assert not s.thread.is_alive() and time.monotonic() - start < 15
    request.join(30)
    # aborted with an answer the client can act on (retry elsewhere), not a 500
    assert (
        assert_error(answers[0], 503, match="shut down before this request finished")["code"]
        == "shutting_down"
    )
    assert not engine.engine.has_unfinished_requests() and engine.engine.cache.num_used_blocks == 0


CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
from configs import FRONTEND, random_model
from glm5.serve import ServerConfig, build_engine
from glm5.serve.server import serve
from glm5.tokenizer import GLM5Tokenizer

gate = {gate!r}

def hold(prompt_ids, output_ids):  # every step waits for the test's go
    while not os.path.exists(gate):
        time.sleep(0.01)
    return None

tok = GLM5Tokenizer.from_pretrained({tokdir!r})
engine = build_engine(random_model(FRONTEND, tok), tok, block_size=4, force_token=hold)
serve(engine, ServerConfig(model_name="tiny"), port={port}, graceful_timeout_s=30, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_a_real_server_process(tok, tmp_path) -> None:
    port, gate = free_port(), tmp_path / "go"
    tok.save_pretrained(tmp_path / "tok")
    script = CHILD.format(
        tests=str(Path(__file__).parent), gate=str(gate), tokdir=str(tmp_path / "tok"), port=port
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    events: list[str] = []
    stream = None
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

        def read_stream() -> None:
            with httpx.stream(
                "POST",
                url + "/v1/completions",
                timeout=120,
                json={"prompt": "abc", "max_tokens": 3, "ignore_eos": True, "stream": True},
            ) as r:
                events.extend(line for line in r.iter_lines() if line)

        stream = threading.Thread(target=read_stream)
        stream.start()
        wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["num_pending"] == 1, timeout=60)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (health := httpx.get(url + "/health", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "SIGTERM did not start draining"
            time.sleep(0.02)
        assert health.status_code == 503  # the listener is still open while the stream runs
        r = httpx.post(url + "/v1/completions", json={"prompt": "new"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert stream.is_alive() and proc.poll() is None
    finally:
        gate.touch()
        if stream is not None:
            stream.join(60)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            log.close()
    assert events[-1] == "data: [DONE]" and not [e for e in events if '"error"' in e]
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert rc in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained for


# ------------------------------------------------------------------------------------------------- 6. corners
def test_a_chunked_body_over_the_limit_is_413(server) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // (64 << 10) + 2):
            yield b"x" * (64 << 10)
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=HEADERS, timeout=60)
    assert "content-length" not in {k.lower() for k in r.request.headers}  # really chunked
    assert_error(r, 413, match="too large")
    assert_still_serving(server)


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_post_body_that_is_not_json_is_415(server, content_type) -> None:
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = httpx.post(server.url + path, content=b'{"prompt": "x"}', headers=headers, timeout=30)
        assert_error(r, 415, match="application/json")
    ok = httpx.post(
        server.url + "/tokenize",
        content=b'{"prompt": "x"}',
        timeout=30,
        headers={**HEADERS, "Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200
    assert_still_serving(server)


@pytest.mark.parametrize(
    "path, body, param, match",
    [
        ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop", "stop[0]"),
        ("/v1/completions", {"prompt": "x", "stop": ""}, "stop", "stop"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "messages[0].role: Input should be",
        ),
        (
            "/v1/chat/completions",
            {"messages": user([{"type": "text"}])},
            "messages[0].content",
            "messages[0].content[0].text: Field required",
        ),
        (
            "/v1/chat/completions",
            {"messages": user("x"), "tool_choice": {"type": "function"}},
            "tool_choice",
            "tool_choice.function",
        ),
        (
            "/v1/chat/completions",
            {"messages": user([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])},
            "messages[0].content[0]",
            "image input is not supported",
        ),
        (
            "/v1/chat/completions",
            {"messages": user("x"), "min_tokens": 5, "max_tokens": 2},
            "min_tokens",
            "min_tokens (5) is more than max_tokens (2",
        ),
        ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens"),
        ("/v1/chat/completions", {"messages": user("x"), "top_logprobs": 2}, "top_logprobs", "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": user("x"), "top_logprobs": 2, "logprobs": False},
            "top_logprobs",
            "logprobs",
        ),
    ],
)
def test_openai_style_field_names_and_refusals(server, path, body, param, match) -> None:
    error = assert_error(raw_post(server, path, body), 400, param, match)
    assert "constrained" not in error["message"] and "list[" not in error["message"]
    assert_still_serving(server)


def test_models_retrieve_serves_the_model_and_404s_others_without_revealing_paths(server, client) -> None:
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    listed = httpx.get(server.url + "/v1/models", headers=HEADERS).text
    retrieved = httpx.get(server.url + f"/v1/models/{MODEL}", headers=HEADERS).text
    assert "/secret/" not in listed and "/secret/" not in retrieved
    assert json.loads(listed)["data"][0]["root"] == MODEL
    assert httpx.get(server.url + "/v1/models/org/name", headers=HEADERS).status_code == 404
    assert httpx.get(server.url + f"/v1/models/{MODEL}").status_code == 401  # the key is still required


def test_tokenize_and_completions_agree_on_the_gmask_sop_prefix(server, tok) -> None:
    prefix = [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    text = "def add(a, b):"
    tokenized = raw_post(server, "/tokenize", {"prompt": text}).json()["tokens"]
    assert tokenized[:2] == prefix
    r = raw_post(
        server, "/v1/completions", {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 0}
    ).json()
    assert r["usage"]["prompt_tokens"] == len(tokenized)
    assert r["choices"][0]["logprobs"]["tokens"][:2] == ["[gMASK]", "<sop>"]
    assert r["choices"][0]["text"].startswith(text)  # echo gives the text as sent
    # and both leave it out when asked to
    bare = raw_post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    r = raw_post(
        server, "/v1/completions", {"prompt": text, "max_tokens": 1, "add_special_tokens": False}
    ).json()
    assert bare == tokenized[2:] and r["usage"]["prompt_tokens"] == len(bare)


def test_a_scripted_server_takes_prompt_ids_past_the_tokenizer(model, tok) -> None:
    """Scripted mode matches on the prompt's text: a padding id (no text) in a token-id prompt must not fail the
    engine step (and with it every request in flight)."""
    engine = build_engine(
        model,
        tok,
        block_size=4,
        max_model_len=MAX_LEN,
        scripted=[{"match": "def add", "output": " return a + b"}],
    )
    app = create_app(engine, ServerConfig(model_name=MODEL, api_key=KEY))
    with ServerThread(app) as s:
        prompt = tok.encode("def add(a, b):")
        r = raw_post(
            s,
            "/v1/completions",
            {"prompt": prompt[:2] + [TOKENIZER_SIZE + 3] + prompt[2:], "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == " return a + b"
