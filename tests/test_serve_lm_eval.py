"""lm-evaluation-harness `local-completions` against the server, fully offline: the tokenizer comes from the
server's /tokenizer_info + /tokenize + /detokenize, tasks from a YAML file over local jsonl. The loglikelihoods
lm-eval computes from our echo/logprobs answers must equal the model's own, and a generate_until task scored on
scripted answers must be exact."""

from __future__ import annotations

import json

import pytest
import torch
from configs import FRONTEND, random_model, stdlib_tokenizer

from glm5.serve import ServerConfig, ServerThread, build_engine, create_app

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

VOCAB = FRONTEND.vocab_size
CFG = FRONTEND
KEY = "sk-eval"
GEN_DOCS = [
    {"question": "What is 2+2?", "answer": "4"},
    {"question": "Capital of France?", "answer": "Paris"},
    {"question": "Colour of the sky?", "answer": "blue"},
]
SCRIPT = [
    {"match": "What is 2+2?\nA:", "output": " 4\n\nQ: next"},
    {"match": "Capital of France?\nA:", "output": " Paris\n\nQ: next"},
    {"match": "Colour of the sky?\nA:", "output": " green\n\n"},
]
MC_DOCS = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"question": "import os\nimport", "choices": [" sys", " json"], "answer": 1},
    {"question": "The quick brown fox", "choices": [" jumps over", " is"], "answer": 0},
]

MC_YAML = """task: glm5_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_YAML = """task: glm5_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    regexes_to_ignore: [" "]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = stdlib_tokenizer(VOCAB)
    model = random_model(CFG, tok)
    engine = build_engine(model, tok, scripted=SCRIPT, block_size=4)
    app = create_app(engine, ServerConfig(model_name="tiny-glm5", api_key=KEY))
    folder = tmp_path_factory.mktemp("tasks")
    for name, docs, yaml in (("mc", MC_DOCS, MC_YAML), ("gen", GEN_DOCS, GEN_YAML)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(yaml.format(data=data))
    with ServerThread(app) as server:
        yield server, model, tok, folder


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own split of (context, continuation) into ids (TemplateLM._encode_pair)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx) :]


def test_lm_eval_local_completions_scores_loglikelihood_and_generation_offline(setup, monkeypatch) -> None:
    server, model, tok, folder = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = (
        f"base_url={server.url}/v1/completions,model=tiny-glm5,tokenizer_backend=remote,auth_token={KEY},"
        "tokenized_requests=True,max_length=512,batch_size=2,max_retries=1"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["glm5_tiny_mc", "glm5_tiny_gen"],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        bootstrap_iters=0,
    )
    # generate_until: the scripted answers are read up to "\n\n"; two of three are right
    assert results["results"]["glm5_tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)
    # loglikelihood: what lm-eval summed from our echo + logprobs equals the model's own logprobs
    samples = results["samples"]["glm5_tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    for sample in samples:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            loglik, _greedy = resp[0]
            ctx, cont = encode_pair(tok, doc["question"], choice)
            ids = ctx + cont
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            assert loglik == pytest.approx(lp[len(ctx) - 1 :].sum().item(), abs=1e-3)
    acc = results["results"]["glm5_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
