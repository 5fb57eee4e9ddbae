"""The RL system over real Ray actors on CPU: the loop runs unchanged, a killed rollout worker loses no
samples and its replacement gets the current weights before serving (RL.md A.7 item 11)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from glm5.rl.actors import build_ray  # noqa: E402
from glm5.rl.controller import build_local, run_loop  # noqa: E402
from glm5.rl.recipes import build_task, recipe_preset  # noqa: E402
from glm5.rl.weight_sync import state_hash  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_killed_rollout_worker_loses_no_samples_and_replacement_serves_current_weights():
    base = recipe_preset("digits-async")
    recipe = base.replace(steps=8, buffer={**base.buffer, "max_staleness": 1},
                          rollout={**base.rollout, "max_new_tokens": 4},
                          delay={"alpha": 1.5, "scale": 0.003, "cap": 0.03})  # fmt: skip
    task = build_task(recipe, None, log=lambda *_: None)
    system = build_ray(recipe, task, build_local(recipe, task), num_workers=2)
    pool, buffer = system["rollout"], system["buffer"]
    trained: list[str] = []

    def on_step(rec, batch):
        trained.extend(g[0].group_id for g in batch)
        if rec["step"] == 2:
            pool.kill("w0")  # mid-generation (ray.kill; RolloutWorker.crash() is the os._exit variant)

    records = run_loop(buffer, pool, system["trainer"], system["transport"], steps=recipe.steps, overlap=True,
                       on_step=on_step)  # fmt: skip
    assert len(records) == recipe.steps
    assert pool.replaced, "the dead worker was noticed and replaced"
    event = pool.replaced[0]
    assert event["dead"] == "w0" and event["version_before_serving"] == event["trainer_version"]
    # every trained group exactly once; the books balance: trained + filtered + requeued-pending + running + ready
    assert len(trained) == len(set(trained)) == recipe.steps * recipe.buffer["batch_size"]
    counts = buffer.counts()
    terminal = counts["trained"] + counts["filtered"]
    assert counts["trained"] == len(trained)
    assert counts["leased"] == terminal + counts["running"] + counts["ready"] + counts["requeued"] + \
        counts["dropped_stale"]  # fmt: skip
    # the surviving and replacement workers hold the trainer's final weights
    final, _ = system["transport"].fetch()
    for w in pool.workers.values():
        assert ray.get(w.ping.remote()) == recipe.steps
    assert state_hash(final) == state_hash(ray.get(system["trainer"].weights()))
    pool.stop()
    system["shutdown"]()
