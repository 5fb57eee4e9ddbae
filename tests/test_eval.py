"""glm5.eval: metric formulas on hand-made examples, the multi-turn tool loop, an end-to-end run of `glm5 eval` on
a tiny random checkpoint (numbers ~0, but results, report and plots must exist), and the OpenAI backend against the
real `glm5 serve` app (scripted outputs) on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import sysconfig
from pathlib import Path

import pytest

from glm5.eval import (
    EvalResult,
    GenerationOptions,
    OpenAIBackend,
    Reply,
    abstention_rate,
    accuracy,
    compare,
    evaluate,
    hallucination_rate,
    mean_pass_at_k,
    pass_at_k,
    summarize,
    wilson_interval,
    write_report,
)
from glm5.eval.backends import tool_result
from glm5.eval.tasks import make_questions, parse_task_list

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------- metric formulas
def test_accuracy_and_abstention_rate():
    assert accuracy([True, False, True, True]) == 0.75
    assert abstention_rate([False, True, False, False]) == 0.25
    assert accuracy([]) == 0.0


def test_hallucination_rate_is_wrong_over_wrong_plus_abstentions_among_the_failures():
    correct = [True, False, False, False, True]
    abstained = [False, True, False, False, False]  # failures: one abstention, two wrong answers
    assert hallucination_rate(correct, abstained) == pytest.approx(2 / 3)
    assert hallucination_rate([True, True], [False, False]) is None  # no failures: 0/0
    assert hallucination_rate([False, False], [True, True]) == 0.0
    # a correct abstention (unanswerable question) is not a failure
    assert hallucination_rate([True, False], [True, False]) == 1.0


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2) / C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5) = 21, C(10,5) = 252
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="samples"):
        pass_at_k(2, 1, 3)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summarize_pools_samples_and_reports_pass_at_k():
    correct = [[True, False], [False, False], [True, True]]
    abstained = [[False, True], [False, False], [False, False]]
    m = summarize(correct, abstained, ks=(1, 2, 3))
    assert (m["questions"], m["samples"], m["correct"], m["abstained"], m["wrong"]) == (3, 6, 3, 1, 2)
    assert m["accuracy"] == 0.5 and m["abstention_rate"] == pytest.approx(1 / 6)
    assert m["hallucination_rate"] == pytest.approx(2 / 3)
    # per question: c=1, 0, 2 of n=2
    assert m["pass_at_k"] == {
        "1": pytest.approx(0.5),
        "2": pytest.approx((1 + 0 + 1) / 3),
    }
    assert "3" not in m["pass_at_k"]  # needs 3 samples per question


def test_task_names_and_tool_results():
    assert parse_task_list("arithmetic, tool_use") == ["arithmetic", "tool_use"]
    with pytest.raises(ValueError, match="choose from"):
        parse_task_list("arithmetic,chess")
    call = {"function": {"name": "calculator", "arguments": json.dumps({"expression": "(12 + 7) * 3"})}}
    assert tool_result(call) == "57"
    assert tool_result({"function": {"name": "search", "arguments": "{}"}}).startswith("error: unknown tool")


# ------------------------------------------------------------------------------------- the evaluation loop
class ScriptedBackend:
    """Calls the calculator on tool tasks, then repeats its result; abstains on everything else."""

    name = "scripted"

    def __init__(self, questions) -> None:
        self.calls: list[int] = []
        self.expressions = {q.prompt_messages[-1]["content"]: q.meta["expression"] for q in questions}

    def chat(self, requests, n, options):
        self.calls.append(len(requests))
        out = []
        for messages, tools in requests:
            last = messages[-1]
            if last["role"] == "tool":
                reply = Reply(f"The result is {last['content']}.", "read the tool")
            elif tools:
                args = json.dumps({"expression": self.expressions[last["content"]]})
                call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": args}}
                reply = Reply("", "use the tool", [call], "stop")
            else:
                reply = Reply("I don't know.")
            out.append([reply] * n)
        return out


def test_tool_use_runs_the_calculator_and_scores_the_final_turn():
    backend = ScriptedBackend(make_questions("tool_use", 6))
    result = evaluate(backend, ["tool_use", "unanswerable", "arithmetic"], num=6, samples=2, batch_size=4)
    tool, unans, arith = (result.metrics[t] for t in ("tool_use", "unanswerable", "arithmetic"))
    assert tool["accuracy"] == 1.0 and tool["samples"] == 12
    assert (
        unans["accuracy"] == 1.0 and unans["abstention_rate"] == 1.0 and unans["hallucination_rate"] is None
    )
    assert arith["accuracy"] == 0.0 and arith["hallucination_rate"] == 0.0  # abstains instead of guessing
    record = next(r for r in result.records if r["task"] == "tool_use")
    turns = record["samples"][0]["turns"]
    assert len(turns) == 2 and turns[0]["tool_results"] == [str(record["expected"])]
    # tool_use: 4 questions (x2 samples in one call), their 8 continuations, 2 more, their 4; then 4 + 2 twice
    assert backend.calls == [4, 8, 2, 4, 4, 2, 4, 2]
    assert result.metrics["overall"]["questions"] == 18


def test_questions_are_deterministic_in_the_seed():
    a, b = make_questions("unanswerable", 3, 7), make_questions("unanswerable", 3, 7)
    assert [q.messages for q in a] == [q.messages for q in b]


# ------------------------------------------------------------------------------------- end to end, local model
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from glm5 import GLM5Config, GLM5ForCausalLM
    from glm5.tokenizer import GLM5Tokenizer
    from glm5.tokenizer.tokenizer import default_corpus_files

    root = Path(sysconfig.get_paths()["stdlib"])
    tok = GLM5Tokenizer.train([f for f in default_corpus_files() if f.parent == root][:6], vocab_size=512)
    cfg = GLM5Config.from_preset("tiny").replace(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        max_position_embeddings=1024,
        torch_dtype="float32",
        eos_token_id=tok.eos_token_ids,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    GLM5ForCausalLM(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(folder)
    return folder


def test_cli_eval_on_a_tiny_random_checkpoint_writes_results_report_and_plots(checkpoint, tmp_path, capsys):
    import torch

    from glm5.cli import main

    text = tmp_path / "heldout.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:6000])
    out = tmp_path / "eval"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(
            [
                "eval",
                "--model",
                str(checkpoint),
                "--tasks",
                "arithmetic,unanswerable,tool_use,perplexity",
                "--num",
                "2",
                "--samples",
                "2",
                "--temperature",
                "1.0",
                "--max-tokens",
                "6",
                "--data",
                str(text),
                "--seq-len",
                "32",
                "--windows",
                "4",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    result = EvalResult.load(out / "results.json")
    assert set(result.metrics) == {"arithmetic", "unanswerable", "tool_use", "overall"}
    # a random model's 6-token replies never hold the exact answer, a tool call or an abstention: every sample
    # is wrong, and the rates, intervals and pass@k say exactly that (2 questions x 2 samples per task)
    for name, m in result.metrics.items():
        n = 12 if name == "overall" else 4
        assert (m["questions"], m["samples"], m["correct"], m["abstained"], m["wrong"]) == (
            n // 2,
            n,
            0,
            0,
            n,
        ), name
        assert m["accuracy"] == m["abstention_rate"] == 0.0 and m["hallucination_rate"] == 1.0, name
        assert m["pass_at_k"] == {"1": 0.0, "2": 0.0}, name
        lo, hi = wilson_interval(0, n)
        assert m["accuracy_ci"] == pytest.approx([lo, hi]) and m["hallucination_ci"] == pytest.approx(
            [1 - hi, 1 - lo]
        )
    assert result.metrics["overall"]["samples"] == 12
    assert result.perplexity["tokens"] == 4 * 32 and result.perplexity["perplexity"] > 1.0
    assert (out / "metrics.png").read_bytes()[:8] == PNG
    report = (out / "report.md").read_text()
    assert "| task | questions | accuracy | abstention | hallucination | pass@1 | pass@2 |" in report
    assert "Held-out perplexity" in report
    assert "overall" in capsys.readouterr().out
    # compare() around a change (here: the same run twice) -> table + PNG
    table = compare(out, result, out_dir=tmp_path / "cmp", labels=("before RL", "after RL"))
    assert "| task | metric | before RL | after RL | change |" in table and "+0.0 pt" in table
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------- OpenAI-compatible endpoint
def _script(questions) -> list[dict]:
    """`glm5 serve` scripted outputs: each tool question gets a calculator call, each tool result is read back as
    the answer (first match wins, so the continuations come first), anything else gets an abstention."""
    from glm5.data.tasks import calculator

    entries = []
    for q in questions:
        result = calculator(q.meta["expression"])
        entries.append(
            {
                "match": f"<tool_response>{result}</tool_response>",
                "output": f"The tool says {result}.</think>{result}",
            }
        )
    for q in questions:
        expression = q.meta["expression"]
        call = f"<tool_call>calculator<arg_key>expression</arg_key><arg_value>{expression}</arg_value></tool_call>"
        entries.append(
            {
                "match": q.prompt_messages[-1]["content"],
                "output": f"Large numbers: use the calculator.</think>{call}",
            }
        )
    entries.append({"match": None, "output": "Nothing tells me that.</think>I don't know."})
    return entries


@pytest.fixture(scope="module")
def endpoint(checkpoint):
    """The real `glm5 serve` app (scripted mode on the tiny random checkpoint) on 127.0.0.1."""
    from glm5.serve import ServerConfig, ServerThread, build_engine, create_app

    engine = build_engine(str(checkpoint), scripted=_script(make_questions("tool_use", 3)), block_size=8)
    with ServerThread(create_app(engine, ServerConfig(model_name="glm5-tiny"))) as server:
        yield server.url + "/v1"


def test_openai_backend_runs_multi_turn_tool_use_against_glm5_serve(endpoint, tmp_path):
    backend = OpenAIBackend(endpoint, api_key="unused")
    assert backend.model == "glm5-tiny"  # the first model /v1/models lists
    result = evaluate(
        backend, ["tool_use", "unanswerable", "perplexity"], num=3, options=GenerationOptions(max_tokens=64)
    )
    assert result.metrics["tool_use"]["accuracy"] == 1.0 and result.metrics["unanswerable"]["accuracy"] == 1.0
    assert result.metrics["overall"]["hallucination_rate"] is None
    assert result.perplexity is None and "endpoint" in result.notes[0]
    record = next(r for r in result.records if r["task"] == "tool_use")
    first, second = record["samples"][0]["turns"]
    assert (
        first["reasoning"] == "Large numbers: use the calculator." and first["finish_reason"] == "tool_calls"
    )
    assert first["tool_results"] == [record["expected"]]
    assert second["content"] == record["expected"] and second["reasoning"].startswith("The tool says")
    paths = write_report(result, tmp_path)
    assert "perplexity skipped" in paths["report"].read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_one_clear_error():
    with pytest.raises(ValueError, match="cannot reach .*--base-url"):
        OpenAIBackend(f"http://127.0.0.1:{_free_port()}/v1", model="m").chat(
            [([{"role": "user", "content": "hi"}], None)], 1, GenerationOptions()
        )
