"""DataBuffer: admission under max staleness, consumption policies, exactly-once accounting across requeues,
filters and checkpoint-restore, blocking get_batch (docs/rl.md § What the tests prove, items 5, 6, 13)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm5.rl.buffer import BufferConfig, DataBuffer, staleness_histogram
from glm5.rl.types import Sample, SampleStatus, new_group


def _prompts(n: int) -> list[dict]:
    return [{"tokens": [1, 2, i % 7 + 3], "metadata": {"answer": str(i)}} for i in range(n)]


def _finish(lease, version: int, n: int = 2) -> list[Sample]:
    """A completed group whose response tokens were produced at `version` (a partial group keeps its prefix)."""
    group = lease.samples or new_group(lease.prompt_id, lease.epoch, lease.prompt, n, lease.metadata)
    for s in group:
        s.append([5], [-0.5], [version], trainable=True)
        s.status, s.reward = SampleStatus.COMPLETED, float(s.index)
    return group


def test_admission_follows_the_areal_formula():
    buf = DataBuffer(_prompts(50), BufferConfig(batch_size=3, max_staleness=1, max_concurrent=100))
    assert len(buf.lease()) == 6  # (eta + v + 1) * B = 6 at v = 0
    assert buf.lease() == []
    buf2 = DataBuffer(_prompts(50), BufferConfig(batch_size=3, max_staleness=1, max_concurrent=4))
    assert len(buf2.lease()) == 4  # C bounds the running groups
    leases = buf.leases.copy()
    first = min(leases)
    buf.filter(first, "zero_variance")  # a filtered group gives its slot back
    assert len(buf.lease()) == 1
    buf.set_version(1)
    assert buf.capacity() == 3


ops = st.lists(
    st.tuples(
        st.sampled_from(["lease", "complete", "filter", "requeue", "partial", "train", "restore", "die"]),
        st.integers(0, 10**6),
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    eta=st.integers(0, 2),
    batch=st.integers(1, 3),
    policy=st.sampled_from(["pace", "drop_and_requeue", "abort_at_update"]),
    over=st.integers(0, 2),
)
def test_staleness_and_exactly_once_invariants(ops, eta, batch, policy, over):
    """Random interleavings of leases, completions (in any order), filters, requeues with partial samples,
    training steps, worker deaths and checkpoint-restores. Invariants: admission A holds at all times; under
    drop_and_requeue staleness never exceeds eta; with eta = 0 every trained token is of the trainer's version
    (drop_and_requeue) ; pace never drops; and once drained, every (prompt, epoch) has exactly one terminal state."""
    cfg = BufferConfig(
        batch_size=batch, max_staleness=eta, policy=policy, over_sample=over, num_epochs=2, seed=3
    )
    prompts = _prompts(7)
    buf = DataBuffer(prompts, cfg)
    held: list = []  # leases the simulated worker holds

    def check_admission():
        limit = (eta + buf.version + 1) * batch + over
        assert buf.accepted + len(buf.leases) <= limit

    def train():
        batch_groups = buf.get_batch()
        if batch_groups is None:
            return
        v = buf.version
        for g in batch_groups:
            for s in g:
                stale = v - s.head_version()
                if policy == "drop_and_requeue":
                    assert stale <= eta
                if policy == "abort_at_update":
                    assert v - s.tail_version() <= eta
        buf.set_version(v + 1)

    for op, r in ops:
        if op == "lease":
            held += buf.lease("w0", 1 + r % 3)
            check_admission()
        elif op in ("complete", "filter", "requeue", "partial") and held:
            lease = held.pop(r % len(held))
            if op == "complete":
                buf.complete(lease.lease_id, _finish(lease, buf.version))
            elif op == "filter":
                buf.filter(lease.lease_id, "zero_variance")
            elif op == "requeue":
                buf.requeue(lease.lease_id)
            else:  # aborted at an update: the prefix (of this version) is kept for the next lease
                group = lease.samples or new_group(
                    lease.prompt_id, lease.epoch, lease.prompt, 2, lease.metadata
                )
                for s in group:
                    s.append([4], [-0.1], [buf.version], trainable=True)
                buf.requeue(lease.lease_id, group)
        elif op == "train":
            train()
        elif op == "die":
            buf.release_worker("w0")
            held = []
        elif (
            op == "restore"
        ):  # a crash: the state goes through JSON into a fresh buffer; in-flight work is lost
            state = json.loads(json.dumps(buf.state_dict()))
            buf = DataBuffer(prompts, cfg)
            buf.load_state_dict(state)
            held = []
        check_admission()
    # drain: finish everything, training as batches fill
    for _ in range(10_000):
        if buf.exhausted():
            break
        for lease in held:
            buf.complete(lease.lease_id, _finish(lease, buf.version))
        held = buf.lease("w0")
        if not held and buf.num_ready() < batch and not buf.leases:
            # the tail of the data is smaller than a batch: train it as a last, smaller batch
            last = buf.get_batch(buf.num_ready()) if buf.num_ready() else None
            if last is None:
                buf.set_version(buf.version + 1)  # lets drop_and_requeue requeue what went stale
            continue
        train()
    assert buf.exhausted()
    expected = {f"{p}.{e}" for p in range(len(prompts)) for e in range(2)}
    # every prompt of every epoch, exactly once (no duplicate can be stored)
    assert set(buf.terminal) == expected
    if policy == "pace":
        assert buf.stats["dropped_stale"] == 0


def test_partial_samples_and_leases_survive_a_checkpoint():
    buf = DataBuffer(_prompts(5), BufferConfig(batch_size=2, max_staleness=1))
    a, b, c = buf.lease("w", 3)
    partial = new_group(a.prompt_id, a.epoch, a.prompt, 2, a.metadata)
    for s in partial:
        s.append([7, 8], [-0.3, -0.4], [0, 0], trainable=True)
    buf.requeue(a.lease_id, partial)
    buf.complete(b.lease_id, _finish(b, 0))
    state = json.loads(json.dumps(buf.state_dict()))  # c is still leased (in flight) at save time
    fresh = DataBuffer(_prompts(5), BufferConfig(batch_size=2, max_staleness=1))
    fresh.load_state_dict(state)
    assert fresh.num_ready() == 1 and not fresh.leases
    again = fresh.lease("w2", 2)
    by_prompt = {lease.prompt_id: lease for lease in again}
    assert set(by_prompt) == {a.prompt_id, c.prompt_id}  # the in-flight lease was requeued, not lost
    kept = by_prompt[a.prompt_id].samples
    assert [s.response_ids for s in kept] == [[7, 8], [7, 8]]
    assert kept[0].behavior_logprobs == [-0.3, -0.4] and kept[0].token_versions == [0, 0]


def test_pace_reports_staleness_and_drop_requeues():
    for policy, dropped in (("pace", 0), ("drop_and_requeue", 1)):
        buf = DataBuffer(
            _prompts(10), BufferConfig(batch_size=1, max_staleness=0, policy=policy, over_sample=1)
        )
        x, y = buf.lease("w", 2)
        buf.complete(x.lease_id, _finish(x, 0))
        buf.complete(y.lease_id, _finish(y, 0))
        assert buf.get_batch() is not None
        buf.set_version(1)
        got = buf.get_batch()
        assert buf.stats["dropped_stale"] == dropped
        if policy == "pace":
            assert staleness_histogram(got, 1) == {1: 2}
        else:
            assert got is None and buf.queue[0][0] == y.prompt_id


def test_get_batch_blocks_until_data_arrives():
    buf = DataBuffer(_prompts(4), BufferConfig(batch_size=1))
    (lease,) = buf.lease("w", 1)
    t0 = time.perf_counter()
    assert buf.get_batch(timeout=0.2) is None
    # it waited (slept on the condition) rather than returning at once
    assert time.perf_counter() - t0 >= 0.19
    timer = threading.Timer(0.1, lambda: buf.complete(lease.lease_id, _finish(lease, 0)))
    timer.start()
    got = buf.get_batch(timeout=5.0)
    assert got is not None and got[0][0].prompt_id == lease.prompt_id


def test_late_result_of_a_released_lease_is_ignored():
    buf = DataBuffer(_prompts(4), BufferConfig(batch_size=1))
    (lease,) = buf.lease("dead", 1)
    assert buf.release_worker("dead") == 1
    # dedupe: the requeued copy will be the one trained
    assert not buf.complete(lease.lease_id, _finish(lease, 0))
    assert buf.counts()["late_results"] == 1


def test_bad_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="policy must be one of"):
        BufferConfig(policy="fifo")


def test_outcome_rates_use_the_eval_definitions() -> None:
    """Correct = abstaining on an unanswerable question or the full reward otherwise; hallucination rate =
    wrong / (wrong + abstentions) over the replies that are not correct."""
    from glm5.rl.controller import outcome_rates

    def sample(answer, reply: str, reward: float) -> Sample:  # noqa: ANN001
        return Sample("u", 0, "g", 0, [1, 2], 1, reward=reward, metadata={"answer": answer, "reply": reply})

    samples = [
        sample("4", "4", 1.0),  # right
        sample("4", "5", -1.0),  # wrong
        sample("4", "I don't know.", 0.0),  # abstained on an answerable question
        sample(None, "I don't know.", 1.0),  # right: abstained on an unanswerable question
        sample(None, "Paris", -1.0),  # wrong: answered an unanswerable question
    ]
    rates = outcome_rates(samples)
    assert rates["accuracy"] == 2 / 5
    assert rates["abstention_rate"] == 2 / 5
    assert rates["hallucination_rate"] == 2 / 3  # 2 wrong, 1 abstention among the 3 not correct
    # with the plain math reward an abstention on an unanswerable question earns 0 but is still correct
    assert outcome_rates([sample(None, "I don't know.", 0.0)])["accuracy"] == 1.0
    assert outcome_rates([sample("4", "4", 1.0)])["hallucination_rate"] is None


def test_a_sample_status_is_an_enum_that_reads_and_serialises_as_its_string():
    (s,) = new_group(3, 1, [5, 6], 1, {"answer": "7"})
    assert s.status is SampleStatus.PENDING and not s.done
    s.append([8, 9], [-0.5, -0.25], [2, 2], trainable=True)
    s.status = SampleStatus.TRUNCATED
    assert s.done and s.status == "truncated" and f"{s.status}" == str(s.status) == "truncated"
    raw = json.dumps(s.to_dict())
    assert json.loads(raw)["status"] == "truncated" and type(s.to_dict()["status"]) is str
    back = Sample.from_dict(json.loads(raw))  # a checkpoint's plain string becomes the enum again
    assert back.status is SampleStatus.TRUNCATED and back == s
    back.check()
    assert [m.done for m in SampleStatus] == [False, True, True, False, True]  # aborted rollouts resume
    with pytest.raises(ValueError, match=r"unknown status 'finished'; use one of pending, completed"):
        Sample.from_dict(json.loads(raw) | {"status": "finished"})
