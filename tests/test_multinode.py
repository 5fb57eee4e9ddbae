"""Multi-node launch on one machine: the same `glm5 serve` / `glm5 generate` command under two launchers.

- two `torchrun --nnodes 2 --nproc-per-node 1` invocations (one per "node", static rendezvous on loopback) run
  `glm5 serve -dp 2 -ep 2` (data-parallel attention across the nodes): only the front rank binds the HTTP port
  (the other runs the same command with the same --port and would fail with "address in use" if it bound it),
  the server answers the `openai` SDK (concurrent requests, routed over the DP ranks) and on SIGTERM the front
  drains and stops the other node's rank, whose launcher exits 0;
- a launcher that is not torchrun: two plain processes with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT set by hand run `glm5 generate -dp 2 -ep 2`; only rank 0 prints, the one-process tokens.
"""

from __future__ import annotations

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
from configs import FRONTEND, stdlib_tokenizer

from glm5 import GLM5ForCausalLM

pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multinode") / "model"
    tok = stdlib_tokenizer()
    torch.manual_seed(0)
    GLM5ForCausalLM(FRONTEND.replace(eos_token_id=tok.eos_token_ids)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _worker_of(launcher: int) -> int:
    """The worker process torchrun started (its one child running glm5.cli)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if ppid == launcher and b"glm5.cli" in cmd:
                return int(d)
    raise AssertionError(f"no worker under launcher {launcher}")


def test_two_torchrun_nodes_serve_the_openai_sdk(ckpt) -> None:
    import openai

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("no torchrun next to this python")
    port, master = _free_port(), _free_port()
    serve = [
        *("-m", "glm5.cli", "serve", "--model", str(ckpt), "--port", str(port), "-dp", "2", "-ep", "2"),
        *("--threads", "1", "--max-num-seqs", "4", "--graceful-timeout", "5"),
    ]
    nodes = [
        subprocess.Popen(
            [
                str(torchrun),
                *("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank)),
                *("--master-addr", "127.0.0.1", "--master-port", str(master)),
                *serve,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        for rank in (1, 0)  # the other node first: it waits at the rendezvous for the head
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            for p in nodes:
                assert p.poll() is None, p.stdout.read()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(i: int):  # noqa: ANN202
            return client.completions.create(
                model="model",
                prompt=f"request {i} says",
                max_tokens=6,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(ask, range(3)))
        assert all(o.choices[0].finish_reason == "length" and o.usage.completion_tokens == 6 for o in outs)
        again = ask(1)  # greedy: the same text whichever DP rank serves it
        assert again.choices[0].text == outs[1].choices[0].text
        # SIGTERM to the front rank: it drains, then stops the other node's rank, which exits 0 (the front's own
        # exit status is the SIGTERM that uvicorn re-raises after the drain, as without torchrun)
        os.kill(_worker_of(nodes[1].pid), signal.SIGTERM)
        codes = [p.wait(60) for p in nodes]
        logs = [p.stdout.read() for p in nodes]
        assert codes[0] == 0, logs[0][-3000:]
        assert "Application shutdown complete" in logs[1] and "exitcode  : -15" in logs[1], logs[1][-3000:]
        assert "address already in use" not in logs[0].lower()
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()


def test_any_launcher_that_sets_the_environment(ckpt) -> None:
    args = [sys.executable, "-m", "glm5.cli", "generate", "--model", str(ckpt), "--prompt-ids", "5,6,7,8"]
    args += ["--max-tokens", "6", "--temperature", "0", "--ignore-eos"]
    one = subprocess.run(args, capture_output=True, text=True, timeout=60, env=_env())
    master = str(_free_port())
    procs = [
        subprocess.Popen(
            [*args, "-dp", "2", "-ep", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **_env(),
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",  # each "node" has one device
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": master,
            },
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one.returncode == 0 and [p.returncode for p in procs] == [0, 0], (
        outs[0][1][-2000:] + outs[1][1][-2000:]
    )
    assert one.stdout.strip() and outs[0][0].strip() == one.stdout.strip()
    assert outs[1][0].strip() == ""  # only rank 0 prints
