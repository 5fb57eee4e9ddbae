"""`glm5 rl --init`: RL post-training starts from a real `glm5 train` output folder and exports a model that
loads back in HF layout (pre-training -> RL hand-over)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from trainutil import smoke_recipe

from glm5.cli import main as cli_main
from glm5.model import GLM5ForCausalLM
from glm5.rl.cli import run_rl
from glm5.rl.recipes import recipe_preset
from glm5.tokenizer import GLM5Tokenizer
from glm5.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

_turns = itertools.count()


def alternating_reward(reply: str, metadata: dict) -> float:
    """0, 1, 0, 1, ... in scoring order: every group of two has reward variance whatever a barely pre-trained
    policy says, so the RL step has a non-zero policy gradient (a reward by import path, as users give one)."""
    return float(next(_turns) % 2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A seconds-long `smoke` pre-training run: its folder holds model/ (HF layout + tokenizer)."""
    folder = tmp_path_factory.mktemp("pretrained")
    Trainer(smoke_recipe(steps=2), folder, quiet=True).run()
    return folder


def _state(folder) -> dict[str, torch.Tensor]:
    return GLM5ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


def test_glm5_rl_command_runs_the_math_abstain_recipe_from_a_glm5_train_folder(pretrained, tmp_path, capsys):
    """The real recipe on a policy that is always wrong: every group has zero variance, and the filter's cap
    (not an endless loop) lets the run finish."""
    out = tmp_path / "rl"
    assert (
        cli_main(
            [
                "rl",
                "--recipe",
                "math-abstain",
                "--init",
                str(pretrained),
                "--steps",
                "2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["steps"] == 2
        and summary["buffer"]["trained"] == 2 * recipe_preset("math-abstain").buffer["batch_size"]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("kind") == "rl"]
    assert [r["version"] for r in rl] == [1, 2] and all(r["reward"] == -1.0 for r in rl)  # always wrong
    assert rl[-1]["rollout_zero_variance_kept"] >= 1 and summary["buffer"]["filtered"] >= 64  # capped, kept
    model = GLM5ForCausalLM.from_pretrained(str(out / "model"))
    assert (
        model.config.to_hf_config()
        == GLM5ForCausalLM.from_pretrained(str(pretrained / "model")).config.to_hf_config()
    )
    assert "glm5 rl math-abstain" in capsys.readouterr().out


def test_rl_from_a_glm5_train_folder_exports_a_loadable_changed_model(pretrained, tmp_path):
    base = recipe_preset("math-abstain")
    recipe = base.replace(
        steps=2,
        reward=f"{__name__}:alternating_reward",
        eval_prompts=4,
        task_counts={"easy_arithmetic": 16, "unanswerable": 8},
        buffer={**base.buffer, "batch_size": 2},
        rollout={**base.rollout, "n_samples": 2, "max_new_tokens": 8},
    )
    summary = run_rl(recipe, tmp_path / "rl", init=str(pretrained), quiet=True)
    assert summary["buffer"]["trained"] == 4 and summary["export"] == str(tmp_path / "rl" / "model")
    init, tuned = _state(pretrained / "model"), _state(tmp_path / "rl" / "model")
    assert init.keys() == tuned.keys()
    changed = [k for k in init if not torch.equal(init[k], tuned[k])]
    assert any(".mlp." in k for k in changed) and any(".self_attn." in k for k in changed), changed
    tok, init_tok = (
        GLM5Tokenizer.from_pretrained(tmp_path / "rl" / "model"),
        GLM5Tokenizer.from_pretrained(pretrained / "model"),
    )
    text = "<|user|>What is 3 + 4?<|assistant|><think>"
    assert tok.vocab_size == init_tok.vocab_size and tok.encode(text) == init_tok.encode(text)
    model = GLM5ForCausalLM.from_pretrained(str(tmp_path / "rl" / "model"), dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([tok.encode(text)])).logits).all()
