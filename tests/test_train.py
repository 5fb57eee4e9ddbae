"""The pre-training loop: losses, DSA stages, MoE balancing, optimisers, numerics options, NaN skipping, CLI."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from trainutil import losses, params, prepare, run_folder, smoke_recipe

from glm5.cli import main as cli_main
from glm5.model import GLM5ForCausalLM
from glm5.tokenizer import GLM5Tokenizer
from glm5.train import Stage, Trainer, TrainRecipe
from glm5.train.optim import _newton_schulz, is_indexer_param, lr_factor
from glm5.train.pretrain import seq_aux_loss


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("train_base"))


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    main = {k: v for k, v in state.items() if not is_indexer_param(k) and "e_score_correction_bias" not in k}
    return main, {k: v for k, v in state.items() if is_indexer_param(k)}


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_stages_train_the_right_parameters(base, tmp_path):
    trainer = Trainer(smoke_recipe(), run_folder(base, tmp_path / "stages"), quiet=True)
    seen = []
    for _ in range(5):
        before = params(trainer)
        record = trainer.train_step()
        after = params(trainer)
        main_b, idx_b = _split(before)
        main_a, idx_a = _split(after)
        seen.append(record["stage"])
        assert _changed(idx_b, idx_a) == set(idx_b)  # the indexers learn (from their KL loss) in every stage
        if record["stage"] == "indexer-warmup":  # DSA dense warm-up: the main model is frozen
            assert not _changed(main_b, main_a) and record["grad_norm"] == 0.0
            assert record["loss"] == pytest.approx(record["indexer"])
        else:
            assert len(_changed(main_b, main_a)) == len(main_b)
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("lm", "mtp", "indexer"))
        assert (record["seq_aux"] > 0) == (record["stage"] != "indexer-warmup")
    assert seen == ["dense", "dense", "indexer-warmup", "sparse", "sparse"]
    assert trainer.model.attention.dsa  # the sparse stage switched top-k selection on


def test_router_bias_moves_against_the_load(base, tmp_path):
    trainer = Trainer(
        smoke_recipe(stages=[Stage("dense", 1.0, dsa=False)]), run_folder(base, tmp_path / "bias"), quiet=True
    )
    router = trainer.routers[0]
    trainer.train_step()
    load = trainer.last_load[0]
    expected = 1e-3 * torch.sign(load.mean() - load)
    assert torch.equal(router.e_score_correction_bias, expected)  # from zero: one sign step per expert
    assert (
        router.e_score_correction_bias.dtype == torch.float32
        and not router.e_score_correction_bias.requires_grad
    )


def test_sequence_aux_loss_matches_the_deepseek_formula():
    torch.manual_seed(0)
    B, T, E, K = 2, 5, 4, 2
    scores = torch.rand(B * T, E)
    topk = scores.topk(K, dim=-1).indices
    expected = 0.0
    for b in range(B):
        s, idx = scores[b * T : (b + 1) * T], topk[b * T : (b + 1) * T]
        for i in range(E):
            f = E / (K * T) * (idx == i).sum().item()
            p = (s[:, i] / s.sum(-1)).mean().item()
            expected += f * p
    assert seq_aux_loss(scores, topk, B, K).item() == pytest.approx(expected, rel=1e-6)
    uniform = seq_aux_loss(torch.ones(B * T, E), torch.arange(B * T * K).view(-1, K) % E, B, K)
    assert uniform.item() == pytest.approx(B * 1.0)  # perfectly balanced: 1 per sequence


def test_gradient_accumulation_gives_the_full_batch_step(base, tmp_path):
    full = Trainer(smoke_recipe(steps=3), run_folder(base, tmp_path / "full"), quiet=True)
    accum = Trainer(smoke_recipe(steps=3, grad_accum=2), run_folder(base, tmp_path / "accum"), quiet=True)
    for a, b in zip(losses(full.fit()), losses(accum.fit())):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-8)


def test_activation_checkpointing_does_not_change_the_losses(base, tmp_path):
    plain = Trainer(smoke_recipe(steps=2), run_folder(base, tmp_path / "plain"), quiet=True)
    ckpt = Trainer(
        smoke_recipe(steps=2, activation_checkpointing=True), run_folder(base, tmp_path / "ac"), quiet=True
    )
    for a, b in zip(losses(plain.fit()), losses(ckpt.fit())):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_a_non_finite_loss_skips_the_step_and_is_logged(base, tmp_path):
    recipe = smoke_recipe(steps=3, stages=[Stage("dense", 1.0, dsa=False)])
    trainer = Trainer(recipe, run_folder(base, tmp_path / "nan"), quiet=True)
    forward = trainer.model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's forward (its LM head is fused with the loss)
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    trainer.model.forward = poisoned
    before = {}
    original_step = trainer.train_step

    def step_and_snapshot():
        before[trainer.step] = params(trainer)
        return original_step()

    trainer.train_step = step_and_snapshot
    records = trainer.fit()
    assert [r.get("skipped") is not None for r in records] == [False, True, False]
    assert trainer.skipped == [1]
    assert not _changed(before[1], before[2])  # no update, router biases included
    assert all(math.isfinite(r["loss"]) for r in (records[0], records[2]))
    logged = [json.loads(line) for line in (tmp_path / "nan/metrics.jsonl").read_text().splitlines()]
    assert "non-finite" in logged[1]["skipped"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, total_steps=100, warmup_steps=10, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_muon_orthogonalises_per_expert_and_trains(base, tmp_path):
    g = torch.randn(3, 16, 32)
    o = _newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and ((s > 0.5) & (s < 1.5)).all()  # every expert's update is ~orthogonal
    trainer = Trainer(
        smoke_recipe(steps=4, optimizer="muon", stages=[Stage("dense", 1.0, dsa=False)]),
        run_folder(base, tmp_path / "muon"),
        quiet=True,
    )
    records = trainer.fit()
    assert records[-1]["lm"] < records[0]["lm"]


def test_bf16_autocast_option_runs(base, tmp_path):
    trainer = Trainer(
        smoke_recipe(steps=1, dtype="bfloat16"), run_folder(base, tmp_path / "bf16"), quiet=True
    )
    record = trainer.train_step()
    assert trainer.dtype == torch.bfloat16 and math.isfinite(record["loss"])
    assert next(trainer.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_time_limit_fits_the_step_count(base, tmp_path):
    trainer = Trainer(
        smoke_recipe(steps=1000, time_limit_minutes=2.0), run_folder(base, tmp_path / "tl"), quiet=True
    )
    trainer.started = time.time() - 10  # 10 s already spent
    trainer._plan([0.5] * 5)
    budget_left = 120 - (30 + 0.08 * 120) - 10  # the final evaluation and export get a reserve
    assert trainer.planned and abs(trainer.total_steps - budget_left / 0.5) <= 2


def test_stages_never_go_back_when_a_time_limited_plan_stretches(base, tmp_path):
    trainer = Trainer(smoke_recipe(steps=10), run_folder(base, tmp_path / "stretch"), quiet=True)
    trainer.total_steps = 3  # planned short: step 2 is in the sparse stage
    trainer.step = 2
    assert trainer.train_step()["stage"] == "sparse"
    trainer.total_steps = 10  # re-planned longer: step 3 of 10 would be "dense" again
    assert trainer.train_step()["stage"] == "sparse" and trainer.trainer_state()["stage_index"] == 2


def test_recipe_files_change_a_preset(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        "steps = 7\nlr = 1e-3\n[data]\nchat_tasks = { arithmetic = 5 }\n"
        '[[stages]]\nname = "all-sparse"\nfraction = 1.0\ndsa = true\n'
    )
    recipe = TrainRecipe.from_file(path, preset="smoke")
    assert (recipe.steps, recipe.lr, recipe.seq_len) == (7, 1e-3, 64)
    assert recipe.data.chat_tasks == {"arithmetic": 5} and recipe.data.max_corpus_bytes == 400_000
    assert [s.name for s in recipe.stages] == ["all-sparse"]
    path.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        TrainRecipe.from_file(path)


@pytest.mark.slow
def test_glm5_train_command_trains_exports_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--preset", "smoke", "--steps", "12", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 12 and math.isfinite(summary["val_lm"]) and summary["unigram_baseline"] > 0
    assert set(summary["accuracy"]) == {"arithmetic", "calculator", "unanswerable"}
    for name in ("loss.png", "expert_load.png", "metrics.jsonl", "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    model = GLM5ForCausalLM.from_pretrained(str(out / "model"))
    tok = GLM5Tokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == tok.vocab_size == 512 and model.config.eos_token_id == tok.eos_token_ids
    assert "validation loss" in capsys.readouterr().out

    assert cli_main(["train", "--preset", "smoke", "--steps", "14", "--out", str(out), "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:12] == list(range(12)) and 12 in steps and 13 in steps  # resumed, not restarted
    assert (
        cli_main(
            ["train", "--preset", "smoke", "--config", str(tmp_path / "missing.toml"), "--out", str(out)]
        )
        == 2
    )
