"""FSDP2 + expert parallel on 2 CPU processes (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from trainutil import losses, prepare, run_folder, smoke_recipe

from glm5.model import GLM5ForCausalLM
from glm5.tokenizer import GLM5Tokenizer
from glm5.train import Trainer
from glm5.train.parallel import ExpertParallelExperts, init_distributed, shutdown

pytestmark = pytest.mark.dist
RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    ctx = init_distributed()
    try:
        trainer = Trainer(smoke_recipe(), out, ctx, quiet=True)
        sharded = [m for m in trainer.model.modules() if isinstance(m, ExpertParallelExperts)]
        local_experts = sharded[0].gate_up_proj.to_local().shape[0]
        # 5 steps: dense, indexer warm-up (main model frozen), sparse; then a DCP save
        records = trainer.fit()
        summary = trainer.finish()  # gathers the full weights on rank 0, evaluates, exports
        if rank == 0:
            result = {
                "losses": losses(records),
                "local_experts": local_experts,
                "num_sharded": len(sharded),
                "val_lm": summary["val_lm"],
            }
            (Path(out) / "result.json").write_text(json.dumps(result))
    finally:
        shutdown(ctx)


def _close(a: list, b: list) -> bool:
    return all(abs(x - y) <= RTOL * max(abs(x), abs(y), 1e-6) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.slow
def test_two_processes_with_fsdp_and_expert_parallel_match_one_process(tmp_path):
    base = prepare(tmp_path / "base")
    one = Trainer(smoke_recipe(), run_folder(base, tmp_path / "one"), quiet=True)
    expected = losses(one.fit())
    one_summary = one.finish()

    out = run_folder(base, tmp_path / "two")
    mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn", join=True)
    result = json.loads((out / "result.json").read_text())
    assert result["num_sharded"] == 2  # the MoE layer and the MTP module's MoE
    assert result["local_experts"] == smoke_recipe().model_config().n_routed_experts // 2
    assert len(result["losses"]) == len(expected) == 5
    assert _close(result["losses"], expected), (result["losses"], expected)
    assert abs(result["val_lm"] - one_summary["val_lm"]) <= RTOL * one_summary["val_lm"]

    # the gathered export is a complete single-device checkpoint
    model = GLM5ForCausalLM.from_pretrained(str(out / "model"))
    tok = GLM5Tokenizer.from_pretrained(out / "model")
    reference = GLM5ForCausalLM.from_pretrained(str(tmp_path / "one/model"))
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-3

    # the sharded (FSDP + EP) training checkpoint resumes in one process, exactly where 1 process would be
    resumed = Trainer(smoke_recipe(steps=6), out, quiet=True)
    continued = Trainer(smoke_recipe(steps=6), tmp_path / "one", quiet=True)
    assert _close(losses(resumed.fit()), losses(continued.fit()))
