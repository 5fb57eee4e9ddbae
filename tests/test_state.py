"""Resumable training checkpoints: exact resume on CPU, atomic saves that survive a kill, recipe guard."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from trainutil import losses, params, prepare, run_folder, smoke_recipe

from glm5.train import Trainer
from glm5.train.state import latest_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("state_base"))


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(base, tmp_path):
    recipe = smoke_recipe(steps=7)
    straight = Trainer(recipe, run_folder(base, tmp_path / "straight"), quiet=True)
    expected = losses(straight.fit())

    first = Trainer(recipe, run_folder(base, tmp_path / "resumed"), quiet=True)
    head = [first.train_step() for _ in range(4)]  # into the indexer warm-up, then "killed"
    first.save()
    del first
    second = Trainer(recipe, tmp_path / "resumed", quiet=True)
    tail = second.fit()
    assert [r["step"] for r in tail] == [4, 5, 6]
    assert losses(head) + losses(tail) == expected  # bit for bit, sparse stage and all
    end_a, end_b = params(straight), params(second)
    assert end_a.keys() == end_b.keys() and all(torch.equal(end_a[k], end_b[k]) for k in end_a)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert end_b[bias].abs().sum() > 0  # the MoE biases moved and were restored with the checkpoint
    metrics = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 5, 6]  # the resumed run appended its own steps


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import glm5.train.state as state
    from glm5.train import Trainer
    from trainutil import smoke_recipe

    trainer = Trainer(smoke_recipe(keep_checkpoints=3), {out!r}, quiet=True)
    trainer.train_step()
    trainer.save()                      # step 1: complete
    trainer.train_step()
    state._publish = lambda tmp, final: os.kill(os.getpid(), signal.SIGKILL)   # die before the rename
    trainer.save()                      # step 2: killed mid-save
    """
)


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint_usable(base, tmp_path):
    out = run_folder(base, tmp_path / "killed")
    script = KILL_DURING_SAVE.format(tests=str(__import__("pathlib").Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / ".step-0000002.tmp").is_dir()  # the half-written save, data already on disk
    assert latest_checkpoint(ckpts).name == "step-0000001"
    trainer = Trainer(smoke_recipe(keep_checkpoints=3), out, quiet=True)
    assert trainer.resume() and trainer.step == 1
    trainer.train_step()
    trainer.save()
    assert latest_checkpoint(ckpts).name == "step-0000002"
    assert not list(ckpts.glob(".*.tmp"))  # the stale temp folder is gone


def test_old_checkpoints_are_pruned_and_latest_is_written_atomically(base, tmp_path):
    trainer = Trainer(smoke_recipe(keep_checkpoints=2), run_folder(base, tmp_path / "prune"), quiet=True)
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    ckpts = tmp_path / "prune/checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert json.loads((ckpts / "latest").read_text()) == {"checkpoint": "step-0000003"}
    saved = json.loads((ckpts / "step-0000003/trainer.json").read_text())
    assert saved["step"] == 3 and saved["data"]["position"] == 3 * trainer.recipe.batch_size


def test_resuming_with_a_different_recipe_is_refused(base, tmp_path):
    out = run_folder(base, tmp_path / "guard")
    trainer = Trainer(smoke_recipe(), out, quiet=True)
    trainer.train_step()
    trainer.save()
    with pytest.raises(ValueError, match="different recipe"):
        Trainer(smoke_recipe(lr=1e-2), out, quiet=True).resume()
    again = Trainer(smoke_recipe(steps=9), out, quiet=True)  # a longer run of the same recipe is fine
    assert again.resume() and again.total_steps == 9
