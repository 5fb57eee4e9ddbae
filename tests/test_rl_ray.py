"""The RL system over real Ray actors on CPU: the loop runs unchanged, a killed rollout worker loses no
samples and its replacement gets the current weights before serving (docs/rl.md § What the tests prove, item 11)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import require

ray = require("ray", "the Ray runtime")

from glm5.rl.actors import build_ray  # noqa: E402
from glm5.rl.controller import build_local, run_loop  # noqa: E402
from glm5.rl.recipes import build_task, digits_reward, recipe_preset  # noqa: E402
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
