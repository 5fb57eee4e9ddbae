"""RL on a multi-process rollout engine (glm5.rl.rollout.make_rollout_engine, RLRecipe.rollout_parallel): the
rollout engine is 2 gloo processes (EP2) that the RolloutManager drives like any engine. Every weight sync
reaches both ranks, which report the hash of what they received after checking their slices hold it: equal on
both, and the last equals the trainer's final weights. A rank killed with SIGKILL mid-run (asynchronous
generation) makes the manager build a new engine, load the newest weights and requeue the in-flight groups:
training goes on, and every group is trained exactly once (the buffer's books balance). `glm5 rl --rollout-ep 2`
runs the digits recipe to a rising reward.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from glm5.rl.controller import build_local, run_loop
from glm5.rl.recipes import build_task, recipe_preset
from glm5.rl.weight_sync import state_hash

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("one_thread")]


def _system(tmp_path, name: str, steps: int, layout: dict, **rollout):  # noqa: ANN001, ANN202
    base = recipe_preset(name)
    recipe = base.replace(steps=steps, rollout={**base.rollout, **rollout}, rollout_parallel=layout)
    return recipe, build_local(recipe, build_task(recipe, None, log=lambda *_: None), str(tmp_path))


def test_syncs_reach_every_rank_and_a_killed_rank_is_replaced_losing_nothing(tmp_path) -> None:
    recipe, system = _system(tmp_path, "digits-async", 8, {"expert_parallel_size": 2})
    buffer, rollout, trainer, transport = (system[k] for k in ("buffer", "rollout", "trainer", "transport"))
    first = rollout.engine
    assert first.executor.world_size == 2
    transport.publish(trainer.weights(), 0)
    rollout.sync_weights(transport, 0)
    trained: list = []
    killed: dict = {}

    def on_step(record: dict, batch: list) -> None:
        trained.extend(g[0].group_id for g in batch)
        if record["step"] == 2:
            (pid,) = rollout.engine.executor.pids().values()
            killed.update(pid=pid, version=record["step"])
            os.kill(pid, signal.SIGKILL)

    try:
        records = run_loop(
            buffer, rollout, trainer, transport, steps=recipe.steps, overlap=True, on_step=on_step
        )
        assert len(records) == recipe.steps
        # the dead rank was noticed and the engine replaced, with the weights of that moment before serving
        assert killed and len(rollout.replaced) == 1, rollout.replaced
        event = rollout.replaced[0]
        assert event["dead_rank"] == 1 and "rank 1" in event["error"]
        assert event["version_before_serving"] >= killed["version"]
        assert rollout.engine is not first and rollout.engine.executor.world_size == 2
        assert list(rollout.engine.executor.pids().values()) != [killed["pid"]]
        # every sync reached both ranks with the same bytes; versions in order; the last is the trainer's
        assert all(len(e["hashes"]) == 2 and len(set(e["hashes"].values())) == 1 for e in rollout.sync_log)
        versions = [e["version"] for e in rollout.sync_log]
        assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == recipe.steps
        assert rollout.sync_log[-1]["hashes"][0] == state_hash(trainer.weights())
        # exactly once: every trained group once, and the books balance after the requeues
        assert len(trained) == len(set(trained)) == recipe.steps * recipe.buffer["batch_size"]
        counts = buffer.counts()
        assert counts["trained"] == len(trained) and counts["requeued"] >= event["requeued_groups"]
        terminal = counts["trained"] + counts["filtered"]
        assert (
            counts["leased"]
            == terminal + counts["running"] + counts["ready"] + counts["requeued"] + counts["dropped_stale"]
        )
    finally:
        rollout.engine.shutdown()


@pytest.mark.slow
def test_glm5_rl_with_a_two_rank_rollout_engine_raises_the_reward(tmp_path) -> None:
    from glm5.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "rl",
                "--recipe",
                "digits-sync",
                "--steps",
                "30",
                "--rollout-ep",
                "2",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    engine = summary["rollout_engine"]
    assert engine["ranks"] == 2 and engine["replaced"] == []
    versions = [e["version"] for e in engine["syncs"]]
    assert versions == sorted(versions) and set(versions) == set(range(31))  # the start, then every step
    assert all(len(set(e["hashes"].values())) == 1 for e in engine["syncs"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rollout_reward"] for r in records if "rollout_reward" in r]
    # one seed of the digits recipe (tests/test_rl_system.py: start 0.10 +- 0.02, end 0.72 +- 0.12, lowest 0.45)
    assert sum(rewards[:3]) / 3 < 0.25 and sum(rewards[-3:]) / 3 >= 0.35, rewards


def test_bad_rollout_layouts_are_refused_with_the_rule(tmp_path, capsys) -> None:
    from glm5.cli import main
    from glm5.engine.engine import EngineConfig
    from glm5.rl.rollout import make_rollout_engine

    with pytest.raises(ValueError, match="unknown keys \\['tp'\\]"):
        make_rollout_engine(None, None, EngineConfig(), {"tp": 2})
    base = ["rl", "--recipe", "digits-sync", "--steps", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*base, "--rollout-ep", "2", "--ray"]) == 2
    assert "not with --ray" in capsys.readouterr().err
    assert main([*base, "--rollout-ep", "3"]) == 2  # the digits model has 4 experts
    assert "n_routed_experts % (tp_size x ep_size) == 0" in capsys.readouterr().err
