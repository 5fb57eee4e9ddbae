"""Multi-process inference (glm5.engine.multiproc.MultiProcExecutor): the engine's process is rank 0 and spawns
the other ranks (gloo, one thread each). Each layout's `LLM` is built once and runs every scenario in one
continuous batch; its tokens must equal one process's and its logprobs agree within 1e-5. Then faults: a worker
killed with SIGKILL makes the engine raise EngineDeadError naming the rank; the server (a real `glm5 serve -tp 2`)
answers the openai SDK, drains on SIGTERM leaving no process behind, and on a dead rank answers 503 and exits
non-zero; a layout the model cannot take is refused before loading (exit 2, one line).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from configs import FP8_ALIGNED, FRONTEND, MICRO, biased_model, stdlib_tokenizer

from glm5 import GLM5ForCausalLM
from glm5.engine import LLM, SamplingParams
from glm5.engine.multiproc import EngineDeadError
from glm5.engine.sharding import LayoutError

pytestmark = pytest.mark.dist

TOL = 1e-5
# group-limited routing, an IndexCache shared layer ("FFS"), MTP, a vocabulary 2 does not divide
GROUPED = MICRO.replace(n_group=4, topk_group=2, vocab_size=255, max_position_embeddings=256)
# every FP8 split on 128-blocks for TP2 (tests/configs.py)
FP8_ALIGNED = FP8_ALIGNED.replace(max_position_embeddings=256)
ENGINE = dict(block_size=4, num_blocks=160, max_num_seqs=8)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multiproc")
    biased_model(GROUPED).save_pretrained(str(folder / "grouped"))
    biased_model(FP8_ALIGNED).save_pretrained(str(folder / "fp8"), fp8=True)
    return folder


def _prompts(cfg) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [3, cfg.index_topk + 5, 2 * cfg.index_topk + 7, 5]  # ragged, two longer than index_topk
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return prompts + [prompts[2]]  # the same prompt twice in one batch


def _params(n: int) -> list[SamplingParams]:
    greedy = [SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True) for _ in range(n)]
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=7, logprobs=1, ignore_eos=True)
    return greedy + [sampled]


def _scenario(llm: LLM, cfg) -> list:
    prompts = _prompts(cfg)
    prompts.append(prompts[1])  # one seeded sampled completion
    outs = llm.generate(prompts, _params(len(prompts) - 1))
    return outs + llm.generate([prompts[2]], _params(1)[:1])  # again, later: a prefix-cache hit


def _same(ref: list, got: list) -> None:
    for r, g in zip(ref, got, strict=True):
        a, b = r.outputs[0], g.outputs[0]
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < TOL


def _cached_tokens(outs: list) -> int:
    return sum(o.metrics.num_cached_tokens or 0 for o in outs)


@pytest.fixture(scope="module")
def reference(ckpts) -> dict:
    torch.set_num_threads(1)
    out = {}
    out["grouped"] = _scenario(LLM(str(ckpts / "grouped"), **ENGINE), GROUPED)
    out["mtp"] = _scenario(LLM(str(ckpts / "grouped"), num_speculative_tokens=2, **ENGINE), GROUPED)
    out["fp8"] = _scenario(LLM(str(ckpts / "fp8"), fp8="keep", **ENGINE), FP8_ALIGNED)
    return out


@pytest.mark.parametrize(
    "tp, ep, ckpt, extra",
    [
        (2, 1, "grouped", {}),
        (1, 2, "grouped", {}),
        (2, 2, "grouped", {}),
        (2, 1, "mtp", {"num_speculative_tokens": 2}),
        (1, 2, "mtp", {"num_speculative_tokens": 2}),
        (2, 1, "fp8", {"fp8": "keep"}),
    ],
    ids=["tp2", "ep2", "tp2xep2", "tp2_mtp2", "ep2_mtp2", "tp2_fp8_keep"],
)
def test_sharded_engine_reproduces_one_process(ckpts, reference, tp, ep, ckpt, extra) -> None:
    folder = ckpts / ("grouped" if ckpt == "mtp" else ckpt)
    cfg = FP8_ALIGNED if ckpt == "fp8" else GROUPED
    with LLM(str(folder), tensor_parallel_size=tp, expert_parallel_size=ep, **ENGINE, **extra) as llm:
        assert len(llm.engine.executor.procs) == tp * ep - 1
        # forced: the fused step is not shard-aware
        assert llm.engine.executor.runner.config.fused_decode is False
        got = _scenario(llm, cfg)
        _same(reference[ckpt], got)
        assert _cached_tokens(got) > 0 and _cached_tokens(got) == _cached_tokens(reference[ckpt])
        if extra.get("num_speculative_tokens"):
            assert llm.engine.spec_metrics.num_draft_tokens > 0
        procs = list(llm.engine.executor.procs.values())
    assert all(not p.is_alive() for p in procs)


def test_refusals_before_loading(ckpts, tiny_model) -> None:
    with pytest.raises(LayoutError, match="rule: heads % tp_size == 0|tp_size <= heads"):
        LLM(str(ckpts / "grouped"), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        LLM(tiny_model, tensor_parallel_size=2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm5.cli",
            "generate",
            "--model",
            str(ckpts / "grouped"),
            "-tp",
            "4",
            "--prompt-ids",
            "1,2,3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "rule:" in lines[0] and "tp_size" in lines[0], r.stderr


def test_serve_flags_are_validated_before_loading(ckpts, capsys, monkeypatch) -> None:
    import glm5.serve.server as server
    from glm5.cli import main

    monkeypatch.setattr(server, "build_engine", lambda *a, **k: pytest.fail("loaded despite a bad layout"))
    base = ["serve", "--model", str(ckpts / "grouped"), "--port", str(_free_port())]
    assert main([*base, "-tp", "0"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
    assert main([*base, "--expert-parallel-size", "3"]) == 2  # 8 experts over 3 ranks
    err = capsys.readouterr().err
    assert "n_routed_experts % (tp_size x ep_size) == 0" in " ".join(err.split())
    assert main(["generate", "--preset", "tiny", "-tp", "2", "--prompt-ids", "1"]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_torchrun_runs_one_rank_per_process(ckpts) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("no torchrun next to this python")
    args = [
        "-m",
        "glm5.cli",
        "generate",
        "--model",
        str(ckpts / "grouped"),
        "--prompt-ids",
        "5,6,7,8",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
    ]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
    two = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), *args, "-tp", "2"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert one.stdout.strip() and two.stdout.strip() == one.stdout.strip()  # only rank 0 prints


@pytest.fixture()
def tiny_model() -> GLM5ForCausalLM:
    return biased_model(GROUPED)


def test_update_weights_reaches_every_rank_then_a_killed_worker_makes_the_engine_raise(ckpts) -> None:
    new = biased_model(GROUPED, seed=1).state_dict()
    prompts, params = _prompts(GROUPED), _params(len(_prompts(GROUPED)))[:-1]
    ref = LLM(str(ckpts / "grouped"), **ENGINE)
    ref.update_weights(new)
    want = ref.generate(prompts, params)
    llm = LLM(str(ckpts / "grouped"), tensor_parallel_size=2, **ENGINE)
    try:
        before = llm.generate(prompts, params)
        assert llm.update_weights(new) == 1
        _same(want, llm.generate(prompts, params))
        assert [o.outputs[0].token_ids for o in before] != [o.outputs[0].token_ids for o in want]
        with pytest.raises(
            ValueError, match="unknown parameter names"
        ):  # refused on rank 0, before any change
            llm.update_weights({"no.such.weight": torch.zeros(1)})
        _same(want, llm.generate(prompts, params))
        (pid,) = llm.engine.executor.pids().values()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.generate([[4, 5, 6]], SamplingParams(max_tokens=50, ignore_eos=True))
        assert time.monotonic() - start < 15
        with pytest.raises(EngineDeadError, match="rank 1"):  # and every later call
            llm.engine.executor.check_alive()
    finally:
        llm.shutdown()
    import torch.distributed as dist

    # no dead process group left behind for whatever runs next in this process
    assert not dist.is_initialized()
    import multiprocessing

    assert multiprocessing.active_children() == []


# --- the server, as a real `glm5 serve -tp 2` process ---------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The spawned rank processes of `pid` (not multiprocessing's resource tracker)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            cmd = Path(f"/proc/{d}/cmdline").read_bytes() if Path(f"/proc/{d}/cmdline").exists() else b""
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
                out.append(int(d))
    return out


@pytest.fixture(scope="module")
def served_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served") / "model"
    tok = stdlib_tokenizer()
    torch.manual_seed(0)
    GLM5ForCausalLM(FRONTEND.replace(eos_token_id=tok.eos_token_ids)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _serve(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glm5.cli",
            "serve",
            "--model",
            str(folder),
            "--port",
            str(port),
            "-tp",
            "2",
            "--threads",
            "1",
            "--max-num-seqs",
            "4",
            "--graceful-timeout",
            "5",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
SCRIPT = [
    {
        "match": "weather in Paris",
        "output": "Hm.</think>I will check.<tool_call>get_weather<arg_key>city"
        "</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
        "<|observation|>",
    }
]


def test_server_tp2_answers_the_openai_sdk_and_drains_on_sigterm(served_ckpt, tmp_path) -> None:
    import openai

    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    proc, url = _serve(served_ckpt, "--scripted-outputs", str(script))
    try:
        workers = _children(proc.pid)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "hello there"}]
        r = client.chat.completions.create(
            model="model", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
        )
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        chunks = list(
            client.chat.completions.create(
                model="model", messages=msgs, max_tokens=8, temperature=0, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == (r.choices[0].message.content or "")
        # scripted output is forced on every rank (the hook travels to the workers)
        r = client.chat.completions.create(
            model="model",
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=[WEATHER],
            max_tokens=80,
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris",
            "days": 3,
        }
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert workers and not any(
        Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
        for p in workers
    )


def test_server_with_a_dead_rank_answers_503_and_exits_non_zero(served_ckpt) -> None:
    proc, url = _serve(served_ckpt)
    try:
        (worker,) = _children(proc.pid)[:1] or [None]
        assert worker is not None
        body = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        long = {**body, "max_tokens": 400, "ignore_eos": True}
        pool = ThreadPoolExecutor(1)
        in_flight = pool.submit(httpx.post, url + "/v1/chat/completions", json=long, timeout=30)
        time.sleep(0.3)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        assert in_flight.result().status_code == 503, in_flight.result().text
        assert "rank 1" in in_flight.result().json()["error"]["message"]
        pool.shutdown()
        try:  # a new request: 503 too, unless the server has already exited
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 503, r.text
        except httpx.TransportError:
            pass
        code = proc.wait(30)
        assert code not in (0, None) and time.monotonic() - start < 30
        log = proc.stdout.read()
        assert "rank 1" in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not [p for p in _children(proc.pid) if Path(f"/proc/{p}").exists()]


def test_docs_describe_the_launch_commands() -> None:
    doc = (REPO / "docs" / "engine.md").read_text()
    assert "torchrun" in doc and "--tensor-parallel-size" in doc
