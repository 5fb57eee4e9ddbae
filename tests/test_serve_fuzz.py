"""Fuzzing the running server from its own OpenAPI spec (schemathesis + hypothesis), with valid and invalid
bodies, plus hand-written nasty inputs: no answer may be a 5xx, every error is an OpenAI error object, and the
server still serves afterwards."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from configs import random_model, stdlib_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from glm5 import GLM5Config
from glm5.serve import ServerConfig, ServerThread, build_engine, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

VOCAB = 512
CFG = GLM5Config.from_preset("tiny").replace(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, intermediate_size=48, num_attention_heads=2,
    num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, index_n_heads=4, index_head_dim=8, index_topk=8, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=8, max_position_embeddings=64, torch_dtype="float32", first_k_dense_replace=1,
)  # fmt: skip
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

        @settings(max_examples=EXAMPLES.get(label, 15), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            kwargs = case.as_transport_kwargs(base_url=server.url)
            body = kwargs.get("json")
            r = session.request(case.method, server.url + case.formatted_path, json=body,
                                params=kwargs.get("params"))  # fmt: skip
            check_answer(r)

        try:
            run()
        except Unsatisfiable:  # an operation without parameters has no invalid input to generate
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", label
    assert session.get("/health").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"", b"null", b"[]", b'"text"', b"{", b'{"prompt": NaN}', b'{"prompt": "x", "max_tokens": 1e400}',
     b'{"prompt": [1, 2, 99999999999999999999999]}', b'{"prompt": [[]]}', b'{"prompt": [[1], "a"]}',
     b'{"prompt": "x", "seed": 123456789012345678901234567890}', b'{"prompt": "x", "stop": [""]}',
     b'{"prompt": "x", "n": 3, "best_of": 2}', b'{"prompt": "x", "logprobs": 21}', b"\xff\xfe\x00",
     b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": "x", "temperature": -1}'],
)  # fmt: skip
def test_nasty_completion_bodies_get_4xx(server, raw) -> None:
    r = httpx.post(server.url + "/v1/completions", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert 400 <= r.status_code < 500, r.text
    check_answer(r)
