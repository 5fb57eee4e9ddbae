"""The in-process RL system on the real engine: sync = sequential reference, first-step invariants, version
bounds, weight-sync integrity (object store, disk, torch.distributed over gloo), abort / partial rollouts,
trainer resume, and the learning smoke test in sync and async mode (RL.md A.7 items 7-10, 12, 14, 16)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from glm5.rl.controller import build_local, run_loop
from glm5.rl.recipes import build_task, recipe_preset
from glm5.rl.trainer import load_rl_checkpoint, save_rl_checkpoint
from glm5.rl.types import ABORTED
from glm5.rl.weight_sync import DiskTransport, ObjectStoreTransport, state_hash

pytestmark = pytest.mark.usefixtures("one_thread")


def _system(name: str = "digits-sync", steps: int = 4, *, buffer=None, rollout=None, trainer=None, **changes):
    base = recipe_preset(name)
    recipe = base.replace(steps=steps, buffer={**base.buffer, **(buffer or {})},
                          rollout={**base.rollout, **(rollout or {})}, trainer={**base.trainer, **(trainer or {})},
                          **changes)  # fmt: skip
    system = build_local(recipe, build_task(recipe, None, log=lambda *_: None))
    return recipe, system


def _run(recipe, system, on_step=None, **kw):
    return run_loop(system["buffer"], system["rollout"], system["trainer"], system["transport"], steps=recipe.steps,
                    overlap=recipe.overlap, on_step=on_step, **kw)  # fmt: skip


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_eta0_async_pipeline_equals_the_sequential_reference_loop():
    """eta = 0 with generation on a background thread gives bitwise the parameter trajectory of the inline loop."""
    trajectories = []
    for overlap in (False, True):
        recipe, system = _system(steps=4, overlap=overlap, rollout={"filter_zero_variance": False})
        seen: list = []

        def on_step(rec, batch, seen=seen, model=system["trainer"].model):
            seen.append(([s.uid for g in batch for s in g], _params(model)))

        _run(recipe, system, on_step=on_step)
        trajectories.append(seen)
    for (uids_a, params_a), (uids_b, params_b) in zip(*trajectories):
        assert uids_a == uids_b
        assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_first_step_invariants_and_weight_hashes_after_every_sync():
    recipe, system = _system(steps=4)
    trainer, engine, buffer, rollout = system["trainer"], system["engine"], system["buffer"], system["rollout"]
    rollout.run_until(lambda: buffer.num_ready() >= buffer.batch_size())
    batch = buffer.get_batch()
    samples = [s for g in batch for s in g]
    for s, lp in zip(samples, trainer.logprobs(samples)):  # before any update: recompute == engine logprobs
        assert torch.allclose(torch.tensor(lp), torch.tensor(s.behavior_logprobs), atol=1e-5)
    first = trainer.train_step(batch)
    assert first["ppo_kl"] == 0.0 and first["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert first["train_rollout_logp_diff"] < 1e-5
    records = []

    def on_step(rec, batch):
        records.append(rec)
        assert state_hash(engine.model.state_dict()) == state_hash(trainer.model.state_dict())
        assert engine.weight_version == rec["version"] == trainer.version

    _run(recipe, system, on_step, start_version=1)
    assert len(records) == 3
    assert all(r["staleness"] == {"0": r["num_samples"]} for r in records)  # synchronous: version == trainer's


@pytest.mark.parametrize("policy,mode,partial", [("drop_and_requeue", "in_place", False),
                                                 ("abort_at_update", "abort", True)])  # fmt: skip
def test_trained_token_versions_stay_within_the_bound(policy, mode, partial):
    eta = 1
    recipe, system = _system("digits-async", steps=6, buffer={"policy": policy, "max_staleness": eta, "max_concurrent": 6},
                             rollout={"update_mode": mode, "partial_rollout": partial, "max_new_tokens": 6},
                             delay={"alpha": 1.2, "scale": 0.002, "cap": 0.05})  # fmt: skip
    straddling = []

    def on_step(rec, batch):
        v = rec["version"] - 1  # the trainer's version when it consumed the batch
        for g in batch:
            for s in g:
                s.check()  # one version per token, non-decreasing
                assert len(s.token_versions) == s.response_len and all(x <= v for x in s.token_versions)
                head, tail = s.head_version(), s.tail_version()
                assert (v - head if policy == "drop_and_requeue" else v - tail) <= eta
                straddling.append(head != tail)

    _run(recipe, system, on_step)
    if mode == "in_place" or partial:
        assert straddling  # (some samples may straddle an update: only these modes allow it)
    else:
        assert not any(straddling)


def test_abort_keeps_prefix_and_resumes_with_the_remaining_budget():
    recipe, system = _system("digits-sync", steps=1, rollout={"max_new_tokens": 8, "partial_rollout": True},
                             delay={"alpha": 3.0, "scale": 0.01, "cap": 0.02})  # fmt: skip
    rollout, buffer, engine = system["rollout"], system["buffer"], system["engine"]
    until = time.monotonic() + 0.05  # 10-20 ms per token: a few tokens are out, the rest still to come
    while time.monotonic() < until:
        rollout.step()
        time.sleep(0.002)
    assert rollout.abort_all() > 0
    partial = [grp for _, _, grp in buffer.queue if grp is not None]
    assert partial, "aborted groups are requeued with their partial samples"
    prefixes = {s.uid: (list(s.tokens), list(s.behavior_logprobs), list(s.token_versions))
                for g in partial for s in g if s.status == ABORTED}  # fmt: skip
    assert any(len(t) > 2 for t, _, _ in prefixes.values())  # prompts are 2 tokens: these kept a prefix
    engine.update_weights({}, 7)  # a weight update in between: the continuation is stamped with version 7
    rollout.run_until(lambda: buffer.num_ready() + buffer.counts()["filtered"] >= len(partial), timeout=60)
    done = {s.uid: s for _, group in buffer.completed.values() for s in group}
    for uid, (tokens, lps, versions) in prefixes.items():
        if uid not in done:
            continue  # its group was filtered (zero variance)
        s = done[uid]
        assert s.tokens[: len(tokens)] == tokens and s.behavior_logprobs[: len(lps)] == lps
        assert s.token_versions[: len(versions)] == versions and set(s.token_versions[len(versions):]) <= {7}
        assert sum(s.loss_mask) <= 8  # the budget counts the prefix


def test_restart_without_partial_rollouts_never_mixes_versions():
    recipe, system = _system("digits-sync", steps=1, rollout={"max_new_tokens": 8, "partial_rollout": False},
                             delay={"alpha": 3.0, "scale": 0.01, "cap": 0.02})  # fmt: skip
    rollout, buffer, engine = system["rollout"], system["buffer"], system["engine"]
    for _ in range(5):
        rollout.step()
    rollout.abort_all()
    assert all(grp is None for _, _, grp in buffer.queue)
    engine.update_weights({}, 3)
    rollout.run_until(lambda: buffer.num_ready() >= 1, timeout=60)
    for _, group in buffer.completed.values():
        for s in group:
            assert set(s.token_versions) == {3}


def test_trainer_resume_continues_with_no_skipped_or_repeated_prompts(tmp_path):
    """Kill after step 2 (the process state is dropped), restore weights + optimizer + buffer, continue: the
    prompts trained and the final weights equal those of an uninterrupted run."""
    def trained_keys(records_batches):
        return [g[0].group_id for batch in records_batches for g in batch]

    recipe, straight = _system(steps=4)
    ref_batches: list = []
    _run(recipe, straight, on_step=lambda rec, batch: ref_batches.append(batch))

    recipe, first = _system(steps=2)
    got: list = []
    _run(recipe, first, on_step=lambda rec, batch: got.append(batch))
    save_rl_checkpoint(str(tmp_path / "ckpt"), first["trainer"], first["buffer"].state_dict())
    del first
    recipe, second = _system(steps=4)
    state = load_rl_checkpoint(str(tmp_path / "ckpt"), second["trainer"])
    second["buffer"].load_state_dict(state["buffer"])
    _run(recipe, second, on_step=lambda rec, batch: got.append(batch), start_version=state["version"])
    assert trained_keys(got) == trained_keys(ref_batches)
    assert len(set(trained_keys(got))) == len(trained_keys(got))
    a, b = _params(straight["trainer"].model), _params(second["trainer"].model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_object_store_and_disk_transports_deliver_identical_versioned_weights(tmp_path):
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(4, 3), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}
    for transport in (ObjectStoreTransport(use_ray=False, keep=2), DiskTransport(tmp_path / "w", keep=2)):
        for v in (1, 2, 3):
            transport.publish({k: t + v if t.is_floating_point() else t for k, t in state.items()}, v)
        got, version = transport.fetch()
        assert version == 3 == transport.latest
        assert state_hash(got) == state_hash({k: t + 3 if t.is_floating_point() else t for k, t in state.items()})
        with pytest.raises(KeyError):
            transport.fetch(1)  # only the newest `keep` versions are held


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, port: int, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from glm5.rl.weight_sync import CollectiveTransport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        transport = CollectiveTransport(src=0, bucket_bytes=256)  # tiny buckets: several per dtype
        torch.manual_seed(0)
        state = {f"layer{i}.w": torch.randn(7, 5) * (i + 1) for i in range(4)} | {"ids": torch.arange(9)}
        for version in (1, 2):
            if rank == 0:
                state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
                transport.publish(state, version)
                results[f"trainer-{version}"] = state_hash(state)
            else:
                got, v = transport.fetch(version)
                results[f"engine-{version}"] = state_hash(got)
    finally:
        dist.destroy_process_group()


def test_collective_transport_over_gloo_matches_the_trainer_hash():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_collective_worker, args=(_free_port(), results), nprocs=2, start_method="spawn")
        assert results["trainer-1"] == results["engine-1"] and results["trainer-2"] == results["engine-2"]
        assert results["trainer-1"] != results["trainer-2"]


@pytest.mark.parametrize("name,steps", [("digits-sync", 24), ("digits-async", 30)])
def test_reward_rises_on_the_digits_task(name, steps):
    """Learning smoke test: the (unfiltered) rollout reward rises from chance (~0.1) in sync and async mode."""
    recipe, system = _system(name, steps=steps)
    records = _run(recipe, system)
    rewards = [r["rollout_reward"] for r in records if "rollout_reward" in r]
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.3 and end >= 0.4 and end - start >= 0.2, rewards
    if name == "digits-async":
        assert max(r["staleness_max"] for r in records) >= 1  # it really ran ahead
