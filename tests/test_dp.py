"""Data-parallel attention + expert parallelism (glm5/engine/dp.py, glm5.engine.sharding.MoEDispatcher): real gloo
processes spawned by the engine, one thread each. Under continuous batching with uneven load -- a long request on
one DP rank while the other's short one ends, so that rank answers the MoE calls with no tokens of its own (the
dummy step) -- every request's greedy tokens equal one process's and its logprobs agree within 1e-5; a request
sharing a cached prefix goes to the DP rank that holds it, the others to the least loaded rank. Layouts: DP2+EP2
with each token dispatch, with MTP speculation (the ranks then run different layers' MoE calls at once), and
DP2 x TP2 with EP4 (4 processes). A weight update reaches every rank (equal hashes, one-process tokens after it);
preemption and an abort inside a DP rank keep the other requests' tokens; several decode steps per engine step
(DP2+EP2, TP2) keep them too. Bad flags are refused before anything
loads; `glm5 plan` prints a launch command `glm5 serve` accepts, and predicts the per-rank bytes the engine holds.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from configs import MICRO, biased_model

from glm5.engine import LLM, SamplingParams
from glm5.engine.dp import DPScheduler, resolve_layout
from glm5.engine.sharding import LayoutError

pytestmark = pytest.mark.dist

TOL = 1e-5
CFG = MICRO.replace(n_group=4, topk_group=2, vocab_size=255, max_position_embeddings=256)
ENGINE = dict(block_size=4, num_blocks=160, max_num_seqs=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dp") / "micro"
    biased_model(CFG).save_pretrained(str(folder))
    return folder


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist() for n in (13, 5, 21)]


def _run(llm: LLM) -> dict[str, tuple[list[int], list[dict]]]:
    """a (12 tokens) and b (2) start together; after 5 steps c (a's prompt + 3 tokens: a prefix hit) and d join."""
    eng, (p0, p1, p2) = llm.engine, _prompts()

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2)

    eng.add_request("a", p0, params(12))
    eng.add_request("b", p1, params(2))
    out: dict[str, tuple[list[int], list[dict]]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            tokens, lps = out.setdefault(o.request_id, ([], []))
            tokens += o.outputs[0].token_ids
            lps += o.outputs[0].logprobs
        steps += 1
        if steps == 5:
            eng.add_request("c", p0 + [7, 8, 9], params(6))
            eng.add_request("d", p2, params(5))
    return out


def _same(ref: dict, got: dict) -> None:
    assert ref.keys() == got.keys() == {"a", "b", "c", "d"}
    for rid in ref:
        assert got[rid][0] == ref[rid][0], rid
        for la, lb in zip(ref[rid][1], got[rid][1], strict=True):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < TOL


@pytest.fixture(scope="module")
def reference(ckpt) -> dict:
    torch.set_num_threads(1)
    return {k: _run(LLM(str(ckpt), num_speculative_tokens=k, **ENGINE)) for k in (0, 2)}


@pytest.mark.parametrize(
    "tp, dispatch, k",
    [
        (1, "allgather", 0),
        (1, "alltoall", 0),
        (1, "allgather", 2),
        pytest.param(2, "alltoall", 2, marks=pytest.mark.slow),
        pytest.param(2, "allgather", 0, marks=pytest.mark.slow),
    ],
    ids=["dp2_ep2_allgather", "dp2_ep2_alltoall", "dp2_ep2_mtp2", "dp2xtp2_ep4_alltoall_mtp2", "dp2xtp2_ep4"],
)
def test_dp_attention_reproduces_one_process(ckpt, reference, tp, dispatch, k) -> None:
    dp = 2
    with LLM(
        str(ckpt),
        tensor_parallel_size=tp,
        expert_parallel_size=dp * tp,
        data_parallel_size=dp,
        moe_dispatch=dispatch,
        num_speculative_tokens=k,
        **ENGINE,
    ) as llm:
        executor = llm.engine.executor
        assert executor.data_parallel_size == dp and len(executor.procs) == dp * tp - 1
        assert isinstance(llm.engine.scheduler, DPScheduler)
        got = _run(llm)
        _same(reference[k], got)
        sched = llm.engine.scheduler
        # a -> DP rank 0, b -> 1 (least loaded); c shares a's cached prefix -> 0; d -> 1 (least loaded)
        assert sched.routed == [2, 2]
        counters = executor.counters
        idle = [r for r in range(dp * tp) if r // tp == 1]
        busy = [r for r in range(dp * tp) if r // tp == 0]
        # while a decodes alone, DP rank 1's ranks ran dummy steps: MoE calls answered with no tokens
        assert all(counters[r]["idle_steps"] > 0 and counters[r]["dummy_calls"] > 0 for r in idle)
        assert all(counters[r]["dummy_calls"] == 0 for r in busy)
        # every call is a collective over all ranks: each rank made the same number of them
        assert len({c["calls"] + c["dummy_calls"] for c in counters.values()}) == 1
        stats = llm.engine.stats()["data_parallel"]
        assert stats["size"] == dp and stats["routed"] == [2, 2]
        if k:
            assert llm.engine.spec_metrics.num_draft_tokens > 0


def test_prefix_hit_routing_then_a_weight_update_reaches_every_rank(ckpt) -> None:
    new = biased_model(CFG, seed=1).state_dict()
    one = LLM(str(ckpt), **ENGINE)
    one.update_weights(new)
    with LLM(str(ckpt), expert_parallel_size=2, data_parallel_size=2, **ENGINE) as llm:
        p0 = _prompts()[0]
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        llm.generate([_prompts()[1], p0], params)  # the first -> DP rank 0, p0 -> 1
        # both ranks idle now: the least loaded would be rank 0, but rank 1's cache holds p0's three blocks
        (out,) = llm.generate([p0 + [1, 2]], params)
        assert out.metrics.num_cached_tokens >= 12
        assert llm.engine.scheduler.routed == [1, 2]
        # new weights: every rank loads its slices (the experts and shared expert of a DP layout) and reports
        # the same hash; both DP ranks then generate what one process does with those weights
        assert llm.update_weights(new) == 1
        hashes = llm.engine.executor.weight_hashes
        assert len(hashes) == 2 and len(set(hashes.values())) == 1
        prompts = _prompts()
        want = one.generate(prompts, params)
        got = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        # the update dropped the prefix caches: the three requests alternate, least loaded first
        assert llm.engine.stats()["data_parallel"]["routed"] == [3, 3]


def test_layout_flags_are_checked_before_loading(ckpt, capsys) -> None:
    assert resolve_layout(2, 4, 2) == (2, 2, True)
    assert resolve_layout(2, 1, 1) == (2, 1, False)
    with pytest.raises(LayoutError, match="pass --expert-parallel-size 4"):
        resolve_layout(2, 2, 2)
    with pytest.raises(LayoutError, match="pass --expert-parallel-size 2"):
        LLM(str(ckpt), data_parallel_size=2)
    from glm5.cli import main

    base = ["generate", "--model", str(ckpt), "--prompt-ids", "1,2"]
    assert main([*base, "-dp", "2"]) == 2
    assert "pass --expert-parallel-size 2" in capsys.readouterr().err
    assert main([*base, "-dp", "2", "-ep", "2", "--moe-dispatch", "ring"]) == 2
    assert "--moe-dispatch" in capsys.readouterr().err
    # 8 experts over 3 ranks: refused by the layout rules, nothing loaded
    assert main([*base, "-dp", "3", "-ep", "3"]) == 2
    assert "n_routed_experts" in capsys.readouterr().err


def test_plan_prints_a_launch_command_whose_rank_bytes_it_predicts(ckpt, capsys, monkeypatch) -> None:
    """`glm5 plan` on the checkpoint prints a `glm5 serve` line; the serve front end accepts its flags as they
    are, and the engine built with them holds, on rank 0, the weight bytes the plan predicted (within 2%)."""
    import glm5.serve.server as server
    from glm5.cli import main
    from glm5.engine.sharding import rank_weight_bytes, state_bytes
    from glm5.hardware import HARDWARE
    from glm5.plan import PlanSettings, plan

    args = ["plan", str(ckpt), "--dtype", "bf16", "--devices", "2", "--attn-tp", "1"]
    args += ["--mtp-steps", "1", "--mtp-accept", "1.5", "--context", "64", "--concurrency", "4"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    (cmd,) = [line for line in lines if line.startswith("glm5 serve")]
    assert any(line.startswith("# per rank (predicted): weights") for line in lines)
    assert f"--model {ckpt} " in cmd and " -dp 2 -ep 2 " in cmd
    seen: dict = {}

    class Loaded(Exception):
        pass

    def build_engine(model, tokenizer, **options):  # noqa: ANN001, ANN202 - records what serve would load
        seen.update(options)
        raise Loaded

    monkeypatch.setattr(server, "build_engine", build_engine)
    with pytest.raises(Loaded):
        main([*cmd.split()[1:], "--port", str(_free_port())])
    assert seen["data_parallel_size"] == 2 and seen["expert_parallel_size"] == 2
    assert seen["num_speculative_tokens"] == 1 and seen["max_num_seqs"] == 2 and seen["max_model_len"] == 64
    predicted = plan(
        CFG, HARDWARE["h200"], PlanSettings(dtype="bf16", devices=2, attn_tp=1, mtp_steps=1)
    ).memory
    layout = {k: seen[k] for k in ("tensor_parallel_size", "expert_parallel_size", "data_parallel_size")}
    with LLM(str(ckpt), dtype=torch.bfloat16, num_speculative_tokens=1, **layout, **ENGINE) as llm:
        held = state_bytes(llm.engine.model)
    assert abs(predicted.weights / held - 1) < 0.02
    assert rank_weight_bytes(CFG, 1, 2, rank=1, data_parallel=True) == held  # rank 1 holds as much


@pytest.mark.slow
def test_plan_predicts_the_glm5_rank_bytes_of_its_layouts() -> None:
    """The meta-built GLM-5 sharded as the plan's layouts: per-rank weight bytes within 2% of the plan's."""
    from glm5 import GLM5Config
    from glm5.engine.sharding import rank_weight_bytes
    from glm5.hardware import HARDWARE
    from glm5.plan import PlanSettings, device_memory, parameter_table

    cfg = GLM5Config.from_preset("glm-5")
    table = parameter_table(cfg)
    for dtype, t, d in (("fp8", 1, 16), ("bf16", 8, 2), ("fp8", 4, 4)):
        s = PlanSettings(dtype=dtype, devices=t * d, attn_tp=t, mtp_steps=1)
        predicted = device_memory(table, HARDWARE["h200"], s, t * d, t).weights
        held = rank_weight_bytes(cfg, t, d, dtype=torch.bfloat16, fp8=dtype == "fp8", data_parallel=True)
        assert abs(predicted / held - 1) < 0.02, (dtype, t, d, predicted, held)
    # 16 H200s (nodes of 8): one torchrun line per node, the layout the plan chose
    from glm5.plan import launch_commands, plan

    p = plan(cfg, HARDWARE["h200"], PlanSettings(dtype="fp8", devices=16))
    *_, cmd = launch_commands(p, "/ckpt")
    assert cmd.startswith("torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK")
    assert f"-m glm5.cli serve --model /ckpt --fp8 keep -dp {16 // p.attn_tp} -ep 16" in cmd.replace(
        f"-tp {p.attn_tp} ", ""
    )


def test_preemption_and_abort_within_a_dp_rank(ckpt) -> None:
    """Each DP rank's cache (24 blocks of 4) cannot hold its three 47-token sequences: its scheduler preempts and
    recomputes them, one request is aborted mid-run; the other requests' tokens are the one-process ones."""
    small = dict(block_size=4, num_blocks=24, max_num_seqs=4)

    def run(llm: LLM) -> tuple[dict, int]:
        eng, out = llm.engine, {}
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        for i in range(6):
            eng.add_request(f"r{i}", [1 + i, 2, 3, 4, 5, 6, 7], params)
        steps = 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
            steps += 1
            if steps == 3:
                eng.abort_request("r0")
        return out, eng.stats()["num_preemptions"]

    ref, _ = run(LLM(str(ckpt), **small))
    with LLM(str(ckpt), expert_parallel_size=2, data_parallel_size=2, **small) as llm:
        got, preemptions = run(llm)
        assert llm.engine.stats()["kv_cache"]["used_blocks"] == 0  # every DP rank's blocks came back
    assert preemptions > 0 and len(got["r0"]) < 40
    assert {k: v for k, v in got.items() if k != "r0"} == {k: v for k, v in ref.items() if k != "r0"}
    assert all(len(v) == 40 for k, v in got.items() if k != "r0")


def test_several_decode_steps_per_engine_step_reproduce_one_process(ckpt) -> None:
    """decode_steps=3 with DP2+EP2 (a DP rank that finishes early answers the other's MoE calls of every one of
    its several forwards with no tokens) and with TP2: the one-process greedy tokens, in fewer engine steps."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (12, 2, 7)]
    one = LLM(str(ckpt), decode_steps=1, **ENGINE)
    ref = [o.outputs[0].token_ids for o in one.generate(_prompts(), params)]
    for layout in (dict(expert_parallel_size=2, data_parallel_size=2), dict(tensor_parallel_size=2)):
        with LLM(str(ckpt), decode_steps=3, **layout, **ENGINE) as llm:
            assert [o.outputs[0].token_ids for o in llm.generate(_prompts(), params)] == ref
            assert llm.engine.num_steps < one.engine.num_steps
