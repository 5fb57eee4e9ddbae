"""Fuzzing the running server from its own OpenAPI spec (schemathesis + hypothesis), with valid and invalid
bodies, plus hand-written nasty inputs: no answer may be a 5xx, every error is an OpenAI error object, and the
server still serves afterwards. The model's vocabulary is padded past the tokenizer's (as GLM-5's), so fuzzed
logprobs and token-id prompts reach ids without text. tests/test_serve_hardening.py checks each case's exact answer.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis

# schemathesis imports its OpenAPI loaders lazily, inside `from_url`, and pytest rewrites a plugin's modules as they
# are imported (ast.parse). CPython 3.11 keeps the AST constructor's recursion counter in interpreter-wide state, so
# such an import while the server's threads run failed once with "SystemError: AST constructor recursion depth
# mismatch"; importing them here, at collection, keeps that parse single-threaded.
import schemathesis.specs.openapi.schemas  # noqa: F401
from configs import random_model, stdlib_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from glm5 import GLM5Config
from glm5.serve import ServerConfig, ServerThread, build_engine, create_app

pytestmark = pytest.mark.usefixtures("one_thread")  # ~20 s: part of the fast suite (slow means > 60 s)

VOCAB = 512
"""The tokenizer's size; the model's vocab_size is VOCAB + 64 (padding ids without text)."""
CFG = GLM5Config.from_preset("tiny").replace(
    vocab_size=VOCAB + 64,
    hidden_size=32,
    num_hidden_layers=1,
    intermediate_size=48,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    index_n_heads=4,
    index_head_dim=8,
    index_topk=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    max_position_embeddings=64,
    torch_dtype="float32",
    first_k_dense_replace=1,
)
KEY = "sk-fuzz"
EXAMPLES = {"POST /v1/chat/completions": 40, "POST /v1/completions": 40}
"""Examples per operation and mode (the others get 15): generation endpoints are where the logic is."""


@pytest.fixture(scope="module")
def server():
    tok = stdlib_tokenizer(VOCAB, num_files=4)
    model = random_model(CFG, tok)
    # a short context bounds the work any valid request can ask for (max_tokens, n)
    engine = build_engine(model, tok, block_size=4, max_model_len=48)
    app = create_app(engine, ServerConfig(model_name="fuzz", api_key=KEY, max_body_bytes=64 << 10))
    with ServerThread(app) as s:
        s.engine = engine
        yield s


def check_answer(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error) and error["message"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_fuzz_of_every_operation_never_gets_a_5xx(server, mode) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= set(EXAMPLES)
    session = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    for op in operations:
        label = f"{op.method.upper()} {op.path}"

        @settings(
            max_examples=EXAMPLES.get(label, 15),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            kwargs = case.as_transport_kwargs(base_url=server.url)
            body = kwargs.get("json")
            r = session.request(
                case.method, server.url + case.formatted_path, json=body, params=kwargs.get("params")
            )
            check_answer(r)

        try:
            run()
        except Unsatisfiable:  # an operation without parameters has no invalid input to generate
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", label
    assert session.get("/health").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'"text"',
        b"{",
        b'{"prompt": NaN}',
        b'{"prompt": "x", "max_tokens": 1e400}',
        b'{"prompt": [1, 2, 99999999999999999999999]}',
        b'{"prompt": [[]]}',
        b'{"prompt": [[1], "a"]}',
        b'{"prompt": "x", "seed": 123456789012345678901234567890}',
        b'{"prompt": "x", "stop": [""]}',
        b'{"prompt": "x", "n": 3, "best_of": 2}',
        b'{"prompt": "x", "logprobs": 21}',
        b"\xff\xfe\x00",
        b'{"prompt": "x", "max_tokens": 0}',
        b'{"prompt": "x", "temperature": -1}',
        # issue 14: text the tokenizer rejects, too many sequences, impossible budgets, padding ids
        b'{"prompt": "\\ud800"}',
        b'{"prompt": ["ok", "\\udfff"]}',
        b'{"prompt": "x", "stop": "\\ud800"}',
        b'{"prompt": [' + b",".join([b'"a"'] * 20) + b'], "n": 16}',
        b'{"prompt": "x", "min_tokens": 9, "max_tokens": 2}',
        b'{"prompt": [1, 576]}',
        b'{"prompt": "x", "suffix": "\\ud800"}',
        b'{"prompt": "' + b"x" * 9000 + b'"}',
    ],
)
def test_nasty_completion_bodies_get_4xx(server, raw) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        content=raw,
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, r.text
    check_answer(r)


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "stream": true}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}',
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "n": 16, "min_tokens": 99}',
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
            b'"function": {"name": "f", "parameters": {"\\ud800": {}}}}]}',
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"y" * 9000 + b'"}]}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/detokenize", b'{"tokens": [1, 100000]}'),
    ],
)
def test_nasty_bodies_on_every_json_endpoint_get_4xx(server, path, raw) -> None:
    r = httpx.post(
        server.url + path,
        content=raw,
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, r.text
    check_answer(r)
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        timeout=30,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_bodies_that_are_not_json_get_415(server, content_type) -> None:
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = httpx.post(server.url + path, content=b'{"prompt": "x"}', headers=headers, timeout=30)
        assert r.status_code == 415, r.text
        check_answer(r)


def test_padding_ids_in_prompts_and_logprobs_are_answered(server) -> None:
    body = {"prompt": [3, VOCAB + 5, 4], "max_tokens": 4, "echo": True, "logprobs": 20, "ignore_eos": True}
    r = httpx.post(
        server.url + "/v1/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["tokens"][1] == f"<|id:{VOCAB + 5}|>"
