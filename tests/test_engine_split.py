"""The engine's seams: the scheduler decides a step without any model, and its `SchedulerOutput` is the whole
contract with execution -- a second model runner fed nothing but the pickled outputs of an engine run samples
exactly what the engine's own runner sampled (what a multi-process executor relies on)."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from configs import MICRO

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.config import EngineConfig
from glm5.engine.executor import Executor
from glm5.engine.request import Request, Seq, Status
from glm5.engine.runner import ModelRunner, ModelRunnerOutput
from glm5.engine.scheduler import Scheduler, SchedulerOutput

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = MICRO.replace(max_position_embeddings=256, eos_token_id=[1])


# ------------------------------------------------------------------------------------- the scheduler alone
class ScriptedEngine:
    """Drives a `Scheduler` the way the engine does, with a stand-in for the runner: every row that samples gets
    the next number from a counter. Keeps the runner's view of each block table, built only from the outputs."""

    def __init__(self, num_blocks: int) -> None:
        config = EngineConfig(block_size=4, max_num_batched_tokens=8, max_num_seqs=8)
        self.sched = Scheduler(config, num_blocks=num_blocks, max_model_len=60)
        self.ids = itertools.count()
        self.sampled = itertools.count(100)
        self.tables: dict[int, list[int]] = {}

    def request(self, rid: str, prompt: list[int], n: int = 1) -> Request:
        req = Request(rid, None, prompt, SamplingParams(n=n, max_tokens=50, temperature=1.0, seed=1))
        req.seqs = [Seq(next(self.ids), req, j, seed=j) for j in range(n)]
        self.sched.add_request(req)
        return req

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        assert pickle.loads(pickle.dumps(out)) == out
        for sid in out.finished + out.preempted:
            self.tables.pop(sid, None)
        for sid, (start, blocks) in out.kv.tables.items():
            self.tables[sid] = self.tables.get(sid, [])[:start] + blocks
        result = ModelRunnerOutput()
        for sid in out.decode:
            result.add(sid, [next(self.sampled)], None)
        children = {parent: [] for parent, _ in out.forks}
        for parent, child in out.forks:
            children[parent].append(child)
        for group in out.prefill:
            for c in group:
                if c.start + c.num_tokens == len(self.sched.seqs[c.seq_id].tokens):  # the prompt is cached
                    for sid in [c.seq_id, *children.get(c.seq_id, [])]:
                        result.add(sid, [next(self.sampled)], None)
                        if sid != c.seq_id:
                            self.tables[sid] = list(self.tables[c.seq_id])  # the runner forks its table too
        self.sched.update_from_output(out, result)
        for sid, tokens in zip(result.seq_ids, result.token_ids):
            self.sched.seqs[sid].tokens += tokens  # the engine appends what was sampled
        # the runner's tables, built from the outputs alone, are the scheduler's
        for sid, seq in self.sched.cache.seqs.items():
            assert self.tables[sid] == seq.blocks, (sid, self.tables[sid], seq.blocks)
        return out


def chunks(out: SchedulerOutput) -> list[list[tuple[int, int, int]]]:
    return [[(c.seq_id, c.start, c.num_tokens) for c in group] for group in out.prefill]


def test_the_scheduler_alone_writes_down_chunks_forks_copies_preemption_prefix_hits_and_aborts() -> None:
    """Blocks of 4 tokens, 7 usable blocks, 8 prefill tokens per step. A: 10-token prompt, n = 2 (sequences 0 and 1);
    B: 6-token prompt (sequence 2)."""
    run = ScriptedEngine(num_blocks=8)
    a = run.request("A", list(range(10, 20)), n=2)
    b = run.request("B", list(range(30, 36)))

    out = run.step()  # A's first 8 prompt tokens fill the budget; B waits
    assert [n.seq_id for n in out.new_seqs] == [0] and chunks(out) == [[(0, 0, 8)]] and out.decode == []
    assert out.new_seqs[0].prompt_token_ids == a.prompt_token_ids and out.new_seqs[0].seed == 0
    assert out.kv.tables[0][0] == 0 and len(out.kv.tables[0][1]) == 2

    out = run.step()  # A's last 2 prompt tokens complete it: A's second completion forks; B is admitted
    assert chunks(out) == [[(2, 0, 6)], [(0, 8, 2)]]  # lengths too different to share a forward
    assert out.forks == [(0, 1)] and sorted(n.seq_id for n in out.new_seqs) == [1, 2]
    assert [s.seq_id for s in run.sched.running] == [0, 2, 1] and a.seqs[1].status is Status.DECODE
    shared = run.tables[0][2]  # the block holding A's prompt positions 8-9, now in both of A's tables
    assert run.sched.cache.block_table(1) == run.sched.cache.block_table(0)

    out = run.step()  # everyone decodes; A's first completion writes the shared block: copy-on-write
    assert out.decode == [0, 2, 1] and chunks(out) == [] and out.new_seqs == []
    ((src, dst),) = out.kv.copies
    assert src == shared and run.tables[0][2] == dst and run.tables[1][2] == shared

    out = run.step()
    assert out.decode == [0, 2, 1] and out.preempted == []
    out = run.step()  # all three need a new block, one is free: the newest sequence is preempted
    assert out.preempted == [1] and out.decode == [0, 2]
    assert run.sched.num_preemptions == 1 and [s.seq_id for s in run.sched.waiting] == [1]
    out = run.step()
    assert out.decode == [0, 2] and run.sched.waiting

    run.sched.finish_seq(b.seqs[0])  # B reaches its length limit: the engine ends it, the next output says so
    out = run.step()  # A's preempted completion comes back: its first 8 positions are prefix-cache hits
    assert out.finished == [2] and out.decode == [0]
    # its 13 tokens (prompt and 3 sampled) from position 8; not new to the runner, which kept its state
    assert chunks(out) == [[(1, 8, 5)]] and out.new_seqs == []
    assert out.kv.tables[1][0] == 0 and run.tables[1][:2] == run.tables[0][:2]

    out = run.step()
    assert out.decode == [0, 1]
    for seq in a.seqs:  # abort: the engine ends both completions
        run.sched.finish_seq(seq)
    out = run.step()
    assert out.finished == [0, 1] and out.decode == [] and chunks(out) == [] and not out.is_empty
    assert run.sched.cache.num_used_blocks == 0 and not run.sched.seqs
    assert run.sched.schedule().is_empty


def test_a_prompt_the_whole_cache_cannot_hold_ends_with_length_before_reaching_the_runner() -> None:
    run = ScriptedEngine(num_blocks=3)  # 2 usable blocks: 8 positions
    req = run.request("big", list(range(2, 12)), n=2)
    out = run.step()
    assert out.is_empty and out.new_seqs == []
    assert all(s.status is Status.FINISHED and s.finish_reason == "length" for s in req.seqs)


# ------------------------------------------------------------------------------------- the contract
class Replicated(Executor):
    """The engine's executor, plus a second runner -- its own model copy and cache -- that is fed only the pickled
    SchedulerOutputs and must return exactly what the engine's runner returned."""

    def __init__(self, inner: Executor, replica: ModelRunner) -> None:
        self.inner, self.replica = inner, replica
        self.num_blocks = inner.num_blocks
        self.bytes_per_block, self.mtp_bytes_per_block = inner.bytes_per_block, inner.mtp_bytes_per_block
        self.outputs: list[SchedulerOutput] = []

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        wire = pickle.dumps(scheduler_output)
        result = self.inner.execute(scheduler_output)
        replayed = self.replica.execute(pickle.loads(wire))
        assert replayed == result, f"step {scheduler_output.step}: the replica sampled something else"
        self.outputs.append(pickle.loads(wire))
        return result

    def update_weights(self, state_dict: dict, hf_names: bool = False) -> None:
        self.inner.update_weights(state_dict, hf_names)
        self.replica.update_weights(state_dict, hf_names)

    @property
    def runner(self) -> ModelRunner | None:
        return self.inner.runner

    def seq_state(self, seq_id: int):  # noqa: ANN201
        return self.inner.seq_state(seq_id)


def prompts(lens: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize(("k", "fused"), [(0, None), (0, False), (2, None), (2, False)])
def test_a_runner_fed_only_the_pickled_scheduler_outputs_samples_exactly_what_the_engine_did(
    k, fused
) -> None:
    torch.manual_seed(3)
    model = GLM5ForCausalLM(CFG.replace(num_nextn_predict_layers=1)).eval()
    llm = LLM(
        model,
        block_size=4,
        num_blocks=26,
        max_num_batched_tokens=16,
        num_speculative_tokens=k,
        fused_decode=fused,
    )
    eng = llm.engine
    replica = ModelRunner(copy.deepcopy(model), eng.config, num_blocks=eng.executor.num_blocks)
    eng.executor = mirror = Replicated(eng.executor, replica)
    p = prompts([21, 9, 30, 5], seed=7)
    eng.add_request(
        "greedy", p[0], SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=2, logprobs=1)
    )
    eng.add_request(
        "n2",
        p[1],
        SamplingParams(
            n=2, max_tokens=16, temperature=1.0, seed=4, logprobs=2, repetition_penalty=1.3, ignore_eos=True
        ),
    )
    eng.add_request(
        "min", p[2], SamplingParams(max_tokens=14, temperature=0.9, top_k=20, min_tokens=5, seed=9)
    )
    cached: dict[str, int] = {}
    for i in itertools.count():
        if i == 3:  # same first 20 tokens as "greedy": prefix-cache hits
            eng.add_request(
                "shared", p[0][:20] + p[3], SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9)
            )
        if i == 6:
            eng.add_request(
                "aborted", p[3] * 3, SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
            )
        if i == 9:
            eng.abort_request("aborted")
        if i > 9 and not eng.has_unfinished_requests():
            break
        for out in eng.step():
            cached[out.request_id] = out.num_cached_tokens
        for cache, mirrored in ((eng.cache, replica.cache), (eng.mtp_cache, replica.mtp_cache)):
            for sid, seq in [] if cache is None else cache.seqs.items():  # the replica's view of every table
                assert mirrored.seqs[sid].blocks == seq.blocks and mirrored.length(sid) == seq.length
    outs = mirror.outputs
    assert eng.num_preemptions > 0 and any(o.forks for o in outs) and any(o.kv.copies for o in outs)
    # prefix-cache hits: its first 20 tokens, or 16 when speculating (the MTP cache's entry at position 19 needs
    # token 20, which differs)
    assert cached["shared"] == (16 if k else 20)
    assert any(o.finished for o in outs) and any(len(g) > 1 for o in outs for g in o.prefill)
    if k:
        assert eng.spec_metrics.num_draft_tokens > 0 and any(o.num_speculative_tokens == k for o in outs)
    assert eng.cache.num_used_blocks == 0


def test_the_replica_can_start_from_the_pickled_outputs_after_the_run() -> None:
    """Record an engine run's SchedulerOutputs, then build a runner afterwards and replay them: same tokens."""
    torch.manual_seed(5)
    model = GLM5ForCausalLM(CFG).eval()
    llm = LLM(model, block_size=4, num_blocks=30)
    recorded: list[tuple[bytes, ModelRunnerOutput]] = []
    execute = llm.engine.executor.execute

    def record(out: SchedulerOutput) -> ModelRunnerOutput:
        result = execute(out)
        recorded.append((pickle.dumps(out), result))
        return result

    llm.engine.executor.execute = record
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=2, ignore_eos=True)
    outputs = llm.generate(prompts([7, 18, 11], seed=1), params)
    replica = ModelRunner(copy.deepcopy(model), llm.engine.config, num_blocks=llm.engine.executor.num_blocks)
    tokens: dict[int, list[int]] = {}
    for wire, result in recorded:
        replayed = replica.execute(pickle.loads(wire))
        assert replayed == result
        for sid, t in zip(replayed.seq_ids, replayed.token_ids):
            tokens.setdefault(sid, []).extend(t)
    completions = [c for o in outputs for c in o.outputs]
    assert sorted(map(tuple, tokens.values())) == sorted(tuple(c.token_ids) for c in completions)
