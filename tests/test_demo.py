"""`make demo` in its reduced-steps smoke mode: every stage runs and leaves its artefacts and numbers."""

from __future__ import annotations

import json

import pytest
import torch

from glm5 import GLM5ForCausalLM
from glm5.demo import main
from glm5.rl.posttrain import DEFAULT_VARIANT


@pytest.mark.slow
def test_demo_smoke_runs_every_stage_and_writes_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["--smoke", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the demo's one thread is not left behind in this process
    summary = json.loads((out / "summary.json").read_text())
    # the planner's published GLM-5 figures
    assert summary["plan"]["total_params"] == 743_911_199_232
    assert summary["plan"]["active_params"] == 39_881_544_192
    assert round(summary["plan"]["bf16_gb"]) == 1488 and round(summary["plan"]["fp8_gb"]) == 746
    # pre-training, SFT, RL and the exports produced loadable checkpoints
    assert summary["pretrain"]["step"] > 0 and summary["pretrain"]["val_lm"] > 0
    assert summary["sft"]["step"] > 0 and summary["sft"]["val_lm"] > 0
    assert summary["rl"]["steps"] == 2 and summary["rl"]["buffer"]["trained"] > 0
    assert summary["rl"]["variant"] == DEFAULT_VARIANT
    assert 0.4 < summary["export"]["fp8_bytes"] / summary["export"]["hf_bytes"] < 0.6
    GLM5ForCausalLM.from_pretrained(out / "export-fp8", fp8="keep")
    GLM5ForCausalLM.from_pretrained(out / "sft" / "model")
    # held-out evaluation after each stage, per difficulty, and the post-training numbers in summary.json
    kinds = {"frontier_easy", "frontier_hard", "frontier_unanswerable", "frontier_tool", "overall"}
    for name in ("eval-pretrain", "eval-sft", "eval-rl"):
        results = json.loads((out / name / "results.json").read_text())
        assert kinds <= set(results["metrics"])
        assert results["perplexity"]["perplexity"] > 1
    for stage in ("sft", "rl"):
        numbers = summary["posttrain"][stage]
        for key in ("accuracy", "abstention_rate", "tool_call_valid"):
            assert 0.0 <= numbers[key] <= 1.0, (stage, key)
        h = numbers["hallucination_rate"]
        assert h is None or 0.0 <= h <= 1.0
        assert set(numbers["per_difficulty"]) == {"easy", "hard", "unanswerable", "tool"}
    assert [t["target"] for t in summary["targets"]] == [
        "hallucination rate SFT -> RL",
        "accuracy RL / SFT",
        "abstention on unanswerable (RL)",
        "tool-call validity (SFT)",
    ]
    assert (out / "eval-compare" / "comparison.png").stat().st_size > 0
    # the server answered the openai SDK: a streamed completion and a tool-call request
    serve = summary["serve"]
    assert serve["streamed"]["completion_tokens"] > 0
    # the named tool_choice prefills `<tool_call>calculator`: any call parsed is that one, and a stop after it
    # is reported as tool_calls and answered (the smoke-trained model may also run out of its 48 tokens first)
    tool = serve["tool"]
    assert tool["finish_reason"] in ("tool_calls", "length", "stop")
    assert all(call["name"] == "calculator" for call in tool["calls"]), tool
    assert (tool["finish_reason"] == "tool_calls") == (
        bool(tool["calls"]) and tool["finish_reason"] != "length"
    )
    assert (tool["then"] is not None) == bool(tool["calls"]), tool
    if tool["then"] is not None:
        assert tool["then"]["tool_result"]  # the calculator's answer (or its error message) went back
    report = (out / "report.md").read_text()
    assert "| stage | result | time |" in report and "| total |" in report  # the summary table
    for heading in (
        "Pre-training",
        "Post-training on held-out frontier items",
        "Evaluation SFT vs RL",
        "Serving",
    ):
        assert heading in report
    assert "| stage | difficulty | n | accuracy | abstention | hallucination |" in report
    assert "target: hallucination rate SFT -> RL" in report
    for png in ("pretrain/loss.png", "sft/loss.png", "rl/rl.png", "eval-compare/comparison.png"):
        assert (out / png).is_file() and f"({png})" in report
    assert "glm5 demo: the GLM-5 lifecycle" in capsys.readouterr().out
