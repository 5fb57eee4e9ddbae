"""The RL system over real Ray actors on CPU: the loop runs unchanged, a killed rollout worker loses no
samples and its replacement gets the current weights before serving (docs/rl.md § What the tests prove, item 11);
every actor sits in the system's placement group, a bundle per rank, and a group the cluster cannot hold is refused
naming the shortfall."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import require

ray = require("ray", "the Ray runtime")

from glm5.rl.actors import build_ray  # noqa: E402
from glm5.rl.controller import build_local, run_loop  # noqa: E402
from glm5.rl.recipes import build_task, digits_reward, recipe_preset  # noqa: E402
from glm5.rl.trainer_group import TrainerDeadError  # noqa: E402
from glm5.rl.weight_sync import state_hash  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _group_states(buffer) -> dict[str, str]:
    """Where each prompt group that left the fresh-data cursor is: trained / filtered:<reason> (terminal), ready
    (completed, awaiting training), held:<lease id> (being generated) or pending (requeued, not leased yet)."""
    state = buffer.state_dict()
    held = buffer.held_leases()
    where = {key: f"held:{i}" for i, key in held.items()}
    where |= {f"{lease['prompt_id']}.{lease['epoch']}": "ready" for _, lease, _ in state["completed"]}
    where |= {f"{p}.{e}": "pending" for p, e, _ in state["queue"] if f"{p}.{e}" not in set(held.values())}
    return where | dict(state["terminal"])


def test_killed_rollout_worker_loses_no_samples_and_replacement_serves_current_weights(tmp_path):
    """Worker w0 is killed while it holds leases, for certain: from step 1 on, its judge blocks (a worker
    scores inside its scheduling round, so the group it scores and any others it generates stay leased), and a
    watcher kills it the moment it is blocked. Its leases must be requeued, leased again and trained or
    filtered exactly once; a replacement gets the current weights before serving; training goes on."""
    base = recipe_preset("digits-async")
    recipe = base.replace(
        steps=8,
        buffer={**base.buffer, "max_staleness": 1},
        rollout={**base.rollout, "max_new_tokens": 4, "max_groups_per_round": 1},
        delay={"alpha": 1.5, "scale": 0.003, "cap": 0.03},
    )
    task = build_task(recipe, None, log=lambda *_: None)
    target, blocked = tmp_path / "block-this-actor", tmp_path / "blocked"

    def judge(reply: str, metadata: dict) -> float:
        if target.exists() and target.read_text() == ray.get_runtime_context().get_actor_id():
            blocked.write_text("")
            time.sleep(3600)  # holds its leases until it is killed
        return digits_reward(reply, metadata)

    task["reward_fn"] = judge
    system = build_ray(recipe, task, build_local(recipe, task), num_workers=2)
    pool, buffer = system["rollout"], system["buffer"]
    trained: list[str] = []
    killed: dict[str, dict] = {}

    def watcher() -> None:
        deadline = time.monotonic() + 300
        while not blocked.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        killed["w0"] = buffer.held_leases("w0")  # stable: w0 is stuck in its judge
        pool.kill("w0")  # ray.kill mid-rollout (RolloutWorker.crash() is the os._exit variant)

    watch = threading.Thread(target=watcher, daemon=True)

    def on_step(rec, batch):
        trained.extend(g[0].group_id for g in batch)
        if rec["step"] == 1:
            target.write_text(pool.workers["w0"]._actor_id.hex())
            watch.start()

    records = run_loop(
        buffer,
        pool,
        system["trainer"],
        system["transport"],
        steps=recipe.steps,
        overlap=True,
        on_step=on_step,
    )
    watch.join(300)
    assert len(records) == recipe.steps
    assert killed, "w0 never blocked in its judge"
    lost = killed["w0"]
    assert lost, "the killed worker held leases"
    assert pool.replaced, "the dead worker was noticed and replaced"
    event = pool.replaced[0]
    assert event["dead"] == "w0" and event["requeued_leases"] == len(lost)
    assert event["version_before_serving"] == event["trainer_version"]
    # every actor runs in the system's placement group (a bundle per rank); the replacement took w0's bundle
    placement = system["placement"]
    # 2 rollout bundles + the trainer
    assert placement["strategy"] == "PACK" and len(placement["bundles"]) == 3
    assert {ray.get(w.placement_group_id.remote()) for w in pool.workers.values()} == {placement["id"]}
    assert ray.get(system["trainer"].handle.placement_group_id.remote()) == placement["id"]
    # the dead worker's groups were leased again (to a live worker) and end trained or filtered, exactly once
    deadline = time.monotonic() + 120
    while any(_group_states(buffer).get(key, "?").startswith(("held:", "pending")) for key in lost.values()):
        assert time.monotonic() < deadline, {key: _group_states(buffer).get(key) for key in lost.values()}
        time.sleep(0.05)  # the live workers are still running: their leases end
    states = _group_states(buffer)
    for key in lost.values():
        assert states[key] in ("trained", "ready") or states[key].startswith("filtered:"), (key, states[key])
    assert buffer.counts()["requeued"] >= len(lost)
    # every trained group exactly once; the books balance: trained + filtered + requeued-pending + running + ready
    assert len(trained) == len(set(trained)) == recipe.steps * recipe.buffer["batch_size"]
    counts = buffer.counts()
    assert counts["trained"] == len(trained)
    # the surviving and replacement workers hold the trainer's final weights
    final, _ = system["transport"].fetch()
    for w in pool.workers.values():
        assert ray.get(w.ping.remote()) == recipe.steps
    assert state_hash(final) == state_hash(ray.get(system["trainer"].weights()))
    pool.stop()
    counts = buffer.counts()
    terminal = counts["trained"] + counts["filtered"]
    assert (
        counts["leased"]
        == terminal + counts["running"] + counts["ready"] + counts["requeued"] + counts["dropped_stale"]
    )
    system["shutdown"]()


def test_a_placement_group_the_cluster_cannot_hold_is_refused_with_the_shortfall() -> None:
    from glm5.rl.actors import place_actors

    with pytest.raises(ValueError, match="= 5 CPUs, STRICT_PACK.*the Ray cluster has 2 CPUs"):
        place_actors(8, "STRICT_PACK", timeout=2)  # 8 x 0.5 + 1 CPUs on a 2-CPU cluster
    with pytest.raises(ValueError, match="choose one of PACK, STRICT_PACK"):
        place_actors(1, "NEARBY")
    pg = place_actors(2, "STRICT_PACK", timeout=30)  # what the system needs fits, on one node
    assert [b["CPU"] for b in pg.bundle_specs] == [0.5, 0.5, 1.0]
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)


def test_fsdp_trainer_ranks_and_rollout_workers_share_one_placement_group(tmp_path):
    """--trainer-procs 2 over Ray: the two FSDP2 ranks are actors in the placement group next to the rollout
    workers (a bundle per rank); a rollout worker killed mid-run is replaced in its bundle and every group is
    trained exactly once; the workers end on the group's final weights."""
    base = recipe_preset("digits-async")
    recipe = base.replace(steps=4, trainer_procs=2, rollout={**base.rollout, "max_new_tokens": 4})
    task = build_task(recipe, None, log=lambda *_: None)
    system = build_ray(recipe, task, build_local(recipe.replace(trainer_procs=1), task), 2, "PACK", 0.5)
    pool, buffer, trainer = system["rollout"], system["buffer"], system["trainer"]
    placement = system["placement"]
    try:
        assert [b["CPU"] for b in placement["bundles"]] == [0.5, 0.5, 0.5, 0.5]  # 2 workers, 2 trainer ranks
        assert trainer.world_size == 2 and trainer.ep_size == 2
        assert {ray.get(a.placement_group_id.remote()) for a in trainer.ranks} == {placement["id"]}
        trained: list[str] = []
        last: list = []

        def on_step(rec, batch):
            trained.extend(g[0].group_id for g in batch)
            last[:] = batch
            if rec["step"] == 1:
                pool.kill("w0")

        records = run_loop(
            buffer, pool, trainer, system["transport"], steps=recipe.steps, overlap=True, on_step=on_step
        )
        assert len(records) == recipe.steps and all(r["trainer_procs"] == 2 for r in records)
        assert [e["dead"] for e in pool.replaced] == ["w0"]
        assert {ray.get(w.placement_group_id.remote()) for w in pool.workers.values()} == {placement["id"]}
        final, version = system["transport"].fetch()
        assert version == recipe.steps and state_hash(final) == state_hash(ray.get(trainer.weights()))
        assert all(ray.get(w.ping.remote()) == recipe.steps for w in pool.workers.values())
        assert len(trained) == len(set(trained)) == recipe.steps * recipe.buffer["batch_size"]
        pool.stop()
        counts = buffer.counts()
        assert counts["trained"] == len(trained)
        terminal = counts["trained"] + counts["filtered"]
        assert (
            counts["leased"]
            == terminal + counts["running"] + counts["ready"] + counts["requeued"] + counts["dropped_stale"]
        )
        # a trainer rank that dies fails the next step with its name (no wait on a collective that cannot end)
        ray.kill(trainer.ranks[1])
        with pytest.raises(
            TrainerDeadError, match="trainer rank 1 of 2 \\(a Ray actor\\) failed during train_step"
        ):
            trainer.train_step(last)
    finally:
        system["shutdown"]()
