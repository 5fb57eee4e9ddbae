"""The sharded RL trainer (glm5/rl/trainer_group.py): 2 gloo processes holding the policy under FSDP2 + expert
parallel take the same optimizer steps as the one-process RLTrainer on the same batches (losses and weights
within fp32 tolerance; one rank's share ends in a zero-weight pass that keeps the collectives in step); its DCP
checkpoint loads into a one-process trainer; a killed rank fails the next call with an error naming it.
`glm5 rl` with a 2-rank rollout engine and a 2-process trainer completes with equal hashes on every rank after
each sync and balanced books.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch

from glm5.rl.recipes import CharTokenizer, tiny_model
from glm5.rl.trainer import RLTrainer, TrainerConfig
from glm5.rl.trainer_group import TrainerDeadError, TrainerGroup
from glm5.rl.types import Sample

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("one_thread")]

LOSS = dict(off_policy="decoupled", is_level="token", is_rule="truncate", is_threshold_high=2.0)


def _policy() -> torch.nn.Module:
    tok = CharTokenizer()
    return tiny_model(tok.vocab_size, tok.eos_token_ids, tok.pad_token_id, seed=0)


def _batch(seed: int, groups: int = 3, n: int = 3) -> list[list[Sample]]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        group = []
        for i in range(n):
            prompt = [rng.randrange(12) for _ in range(rng.randint(2, 4))]
            resp = [rng.randrange(12) for _ in range(rng.randint(1, 4))]
            mask = [1] * len(resp)
            if len(resp) > 2:
                mask[1] = 0  # an observed (environment) token: no loss
            group.append(
                Sample(
                    uid=f"{seed}.{g}.{i}",
                    prompt_id=g,
                    group_id=f"{seed}.{g}",
                    index=i,
                    tokens=prompt + resp,
                    prompt_len=len(prompt),
                    loss_mask=mask,
                    behavior_logprobs=[-rng.uniform(0.5, 3.0) * m for m in mask],
                    token_versions=[0] * len(resp),
                    reward=float(rng.random() < 0.5),
                    status="completed",
                )
            )
        out.append(group)
    return out


def _close(a: dict, b: dict) -> float:
    """Largest |a - b| / (|b| + 1e-3) over every weight."""
    assert a.keys() == b.keys()
    return max(float(((a[k].float() - b[k].float()).abs() / (b[k].float().abs() + 1e-3)).max()) for k in a)


def _update_error(a: dict, b: dict, start: dict) -> float:
    """|| (a - start) - (b - start) || / || b - start || over all weights: how far apart the two runs' updates are.

    Not per element: Adam's first steps are lr * g / (|g| + 1e-8), a sign for gradient entries that cancel to
    ~1e-9, where fp32 summation order (FSDP's reduce-scatter, the expert-parallel grouping) moves g by ~1e-10 and
    flips a few single updates; the gradients themselves agree to ~1e-6 relative per tensor."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float((b[k].double() - start[k].double()).pow(2).sum()) for k in a)
    return (num / den) ** 0.5


def test_two_fsdp_ranks_take_the_one_process_steps_and_checkpoint_across_layouts(tmp_path) -> None:
    # 9 samples, 2 per micro-batch: rank 1 ends with an empty pass
    cfg = TrainerConfig(lr=5e-3, micro_batch_size=2, loss=LOSS)
    policy = _policy()
    single = RLTrainer(_policy(), cfg)
    group = TrainerGroup(policy, cfg, procs=2)
    try:
        assert group.ep_size == 2  # the tiny model's 4 experts: 2 per rank
        start = group.weights()
        assert _close(start, single.weights()) == 0.0  # the gathered full state dict is the policy's, bitwise
        for step in range(3):
            batch = _batch(step)
            got, want = group.train_step(batch), single.train_step(batch)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), step
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), step
            assert got["num_samples"] == want["num_samples"] == 9
            err = _update_error(group.weights(), single.weights(), start)
            print(f"step {step}: loss {got['loss']:.8f} vs {want['loss']:.8f}, update error {err:.2e}")
            assert err < 1e-4, step
        moved = group.weights()
        assert _close(moved, start) > 1e-3  # the steps did change the weights
        assert group.version == single.version == 3
        path = group.save(str(tmp_path / "ckpt"), {"cursor": 7}, {"note": "fsdp"})
        assert path.endswith("step-0000003")
    finally:
        group.shutdown()
    # the 2-rank DCP checkpoint loads into one process (resharded) with the same weights and version
    resumed = RLTrainer(_policy(), cfg)
    state = resumed.load(str(tmp_path / "ckpt"))
    assert state["buffer"] == {"cursor": 7} and resumed.version == 3
    assert _close(resumed.weights(), moved) == 0.0
    # ... and the optimizer state came along: the next step matches the uninterrupted single trainer
    batch = _batch(3)
    assert resumed.train_step(batch)["loss"] == pytest.approx(single.train_step(batch)["loss"], rel=1e-5)
    assert _update_error(resumed.weights(), single.weights(), start) < 1e-4


def test_a_dead_trainer_rank_fails_the_run_with_its_name(tmp_path) -> None:
    cfg = TrainerConfig(lr=5e-3, micro_batch_size=4, loss=LOSS)
    group = TrainerGroup(_policy(), cfg, procs=2)
    try:
        group.train_step(_batch(0))
        os.kill(group.pids()[1], signal.SIGKILL)
        with pytest.raises(TrainerDeadError, match="trainer rank 1 of 2 .* died") as err:
            group.train_step(_batch(1))
        assert err.value.rank == 1
        # the survivor was stopped, not left in a collective
        assert all(not p.is_alive() for p in group.procs)
        with pytest.raises(TrainerDeadError):
            group.weights()
    finally:
        group.shutdown()
    failing = TrainerGroup(_policy(), cfg, procs=2)
    try:
        with pytest.raises(TrainerDeadError, match="failed during fail: RuntimeError: failure injected"):
            failing._call("fail")
    finally:
        failing.shutdown()
    with pytest.raises(ValueError, match="at least 2 processes"):
        TrainerGroup(_policy(), cfg, procs=1)


@pytest.mark.slow
def test_glm5_rl_with_a_sharded_rollout_engine_and_an_fsdp_trainer(tmp_path) -> None:
    from glm5.cli import main

    out = tmp_path / "run"
    args = ["rl", "--recipe", "digits-sync", "--steps", "12", "--rollout-ep", "2", "--trainer-procs", "2"]
    assert main([*args, "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    engine = summary["rollout_engine"]
    assert engine["ranks"] == 2 and engine["replaced"] == [] and summary["trainer_procs"] == 2
    versions = [e["version"] for e in engine["syncs"]]
    assert versions == sorted(versions) and set(versions) == set(range(13))  # the start, then every step
    assert all(len(e["hashes"]) == 2 and len(set(e["hashes"].values())) == 1 for e in engine["syncs"])
    assert engine["syncs"][-1]["hashes"]["0"] == summary["trainer_final_hash"]
    counts = summary["buffer"]
    assert counts["trained"] == 12 * 8
    terminal = counts["trained"] + counts["filtered"]
    assert (
        counts["leased"]
        == terminal + counts["running"] + counts["ready"] + counts["requeued"] + counts["dropped_stale"]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [round(r["rollout_reward"], 3) for r in records if "rollout_reward" in r]
    print("rollout reward per step (2 rollout ranks, 2 FSDP trainer ranks):", rewards)
    # resume: the group loads its DCP checkpoint (step 12) and trains on to 14; only versions 12.. are synced
    assert main([*args[:4], "14", *args[5:], "--quiet", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert sorted({e["version"] for e in again["rollout_engine"]["syncs"]}) == [12, 13, 14]
    assert again["rollout_engine"]["syncs"][-1]["hashes"]["0"] == again["trainer_final_hash"]
    assert again["buffer"]["trained"] == 14 * 8  # the buffer's books continue from the checkpoint
