"""Tensor / expert parallel inference (glm5.engine.sharding) and sharded loading (glm5.checkpoint.sharded).

Multi-process checks run in two process pools (2 and 4 gloo processes, one thread each), each spawned once
and running every check of its size; the test functions read their results. Every check compares with the
same model run in one process (each rank builds it from the same seed, computes the reference, then shards
it in place), so the logits of a sharded run must match within 1e-5 and greedy tokens exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from configs import FP8_ALIGNED, MICRO, biased_model

from glm5 import GLM5ForCausalLM
from glm5.checkpoint.files import CheckpointFolder
from glm5.checkpoint.sharded import RangeReader, ShardSlice
from glm5.engine.sharding import (
    LayoutError,
    ShardLayout,
    check_layout,
    load_sharded,
    rank_weight_bytes,
    shard_model,
    state_bytes,
)
from glm5.model import ContiguousLatentCache
from glm5.model.fp8 import quantize_model

TOL = 1e-5
STEPS = 6
# Group-limited routing and a vocabulary that 2 does not divide (padded rows).
GROUPED = MICRO.replace(n_group=4, topk_group=2, vocab_size=255)
# A few hundred MB of fp32 weights (mostly experts), for the resident-memory bound of sharded loading.
BIG = MICRO.replace(
    hidden_size=512,
    num_hidden_layers=3,
    vocab_size=16384,
    n_routed_experts=16,
    moe_intermediate_size=768,
    intermediate_size=1024,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
)
CONFIGS = {"micro": MICRO, "grouped": GROUPED, "fp8_aligned": FP8_ALIGNED, "big": BIG}

pytestmark = pytest.mark.dist


# --- what every rank computes ----------------------------------------------------------------------
@torch.no_grad()
def _run(model: GLM5ForCausalLM, cfg) -> dict[str, torch.Tensor]:
    """Full forward (+ MTP), MTP with its own cache, and prefill + greedy cached decode, for a prompt shorter
    and one longer than index_topk."""
    out: dict[str, torch.Tensor] = {}
    for length in (cfg.index_topk - 3, cfg.index_topk + 4):
        ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        full = model(ids, mtp_depth=2 if cfg.num_nextn_predict_layers else 0, return_hidden=True)
        out[f"forward{length}"] = full.logits
        for d, logits in enumerate(full.mtp_logits):
            out[f"mtp{length}_{d}"] = logits
        if cfg.num_nextn_predict_layers:
            mtp_cache = ContiguousLatentCache(cfg, 2, length)
            out[f"mtp_cached{length}"] = model.mtp_forward(full.hidden_states[:, :-1], ids[:, 1:], mtp_cache)[
                1
            ]
        cache = ContiguousLatentCache(cfg, 2, length + STEPS)
        logits = [model(ids, cache).logits[:, -1]]
        tokens = []
        for _ in range(STEPS):
            tokens.append(logits[-1].argmax(-1))
            logits.append(model(tokens[-1][:, None], cache).logits[:, -1])
        out[f"decode{length}"] = torch.stack(logits, 1)
        out[f"tokens{length}"] = torch.stack(tokens, 1)
    return out


def _compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    diffs = {
        k: (ref[k].float() - got[k].float()).abs().max().item() for k in ref if not k.startswith("tokens")
    }
    return {
        "max_diff": max(diffs.values()),
        "worst": max(diffs, key=diffs.get),
        "tokens_equal": all(torch.equal(ref[k], got[k]) for k in ref if k.startswith("tokens")),
        "num_outputs": len(ref),
    }


def _same_on_every_rank(got: dict[str, torch.Tensor]) -> bool:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, got)
    return all(torch.equal(g[k], gathered[0][k]) for g in gathered for k in got)


def _layout(tp: int, ep: int) -> ShardLayout:
    return ShardLayout.from_rank(dist.get_rank(), tp, ep)


def task_forward(cfg: str, tp: int, ep: int, fp8: bool = False, topk_sync: str = "check") -> dict:
    config = CONFIGS[cfg]
    model = biased_model(config)
    if fp8:
        quantize_model(model)
    ref = _run(model, config)
    lay = _layout(tp, ep)
    plan = shard_model(model, lay.tp_rank, tp, lay.ep_rank, ep, topk_sync=topk_sync)
    got = _run(model, config)
    moe = model.model.layers[-1].mlp
    return {
        **_compare(ref, got),
        "same_on_every_rank": _same_on_every_rank(got),
        "topk_checks": plan.topk_checks,
        "local_heads": model.model.layers[0].self_attn.num_heads,
        "local_experts": moe.experts.num_experts,
        "expert_start": moe.expert_start,
    }


def _promise(full_sd: dict[str, torch.Tensor], cfg, tp: int, ep: int) -> int:
    """Per-rank bytes the layout promises: replicated parts whole, attention's head-split projections, the
    dense MLP and the vocabulary (padded to ceil(V/t) rows) 1/t, routed and shared experts 1/(t*e)."""
    total = 0
    for name, x in full_sd.items():
        nbytes = x.numel() * x.element_size()
        if re.search(r"mlp\.(experts|shared_experts)\.", name):
            parts = tp * ep
        elif re.search(r"self_attn\.(q_b_proj|kv_b_proj|o_proj)\.weight", name) or re.search(
            r"\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name
        ):
            parts = tp
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            nbytes = math.ceil(cfg.vocab_size / tp) * x.shape[1] * x.element_size()
            parts = 1
        else:
            parts = 1
        assert nbytes % parts == 0, name
        total += nbytes // parts
    return total


def _slice(x: torch.Tensor, spec: ShardSlice | None) -> torch.Tensor:
    if spec is None:
        return x
    shape = list(x.shape)
    shape[spec.dim] = spec.size
    out = torch.zeros(shape, dtype=x.dtype)
    real = min(spec.stop, x.shape[spec.dim]) - spec.start
    out.narrow(spec.dim, 0, real).copy_(x.narrow(spec.dim, spec.start, real))
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def task_load(ckpt: str, tp: int, ep: int, fp8: str = "dequantize") -> dict:
    """Sharded load vs one-process `from_pretrained` of the same folder: every local tensor equals its slice
    of the full one (bit for bit), the rank's bytes equal the layout's promise, logits match."""
    path = os.path.join(os.environ["SHARD_TEST_DIR"], ckpt)
    full = GLM5ForCausalLM.from_pretrained(path, fp8=fp8)
    lay = _layout(tp, ep)
    local = load_sharded(path, lay.tp_rank, tp, lay.ep_rank, ep, fp8=fp8, topk_sync="check")
    full_sd, slices = full.state_dict(), local.shard_plan.slices
    unequal = [
        n
        for n, x in local.state_dict().items()
        if not torch.equal(_bits(x), _bits(_slice(full_sd[n], slices.get(n))))
    ]
    dtypes = sorted({str(x.dtype) for x in local.state_dict().values()})
    ref, got = _run(full, full.config), _run(local, local.config)
    return {
        **_compare(ref, got),
        "unequal": unequal,
        "bytes": state_bytes(local),
        "promise": _promise(full_sd, full.config, tp, ep),
        "full_bytes": state_bytes(full),
        "dtypes": dtypes,
        "num_sliced": len(slices),
    }


def _status_kb() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {
            k: int(v.split()[0]) * 1024
            for k, v in (line.split(":", 1) for line in f)
            if k in ("VmRSS", "VmHWM")
        }


def task_rss(ckpt: str, tp: int, ep: int) -> dict:
    """Peak resident memory while loading this rank's shard, above what the process held before."""
    import gc

    torch.empty(1, device="meta").normal_()  # the first meta op imports torch's meta kernels (~80 MB, once)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    base = _status_kb()["VmRSS"]
    lay = _layout(tp, ep)
    local = load_sharded(os.path.join(os.environ["SHARD_TEST_DIR"], ckpt), lay.tp_rank, tp, lay.ep_rank, ep)
    peak = _status_kb()["VmHWM"]
    kept = state_bytes(local)
    return {"kept": kept, "increase": peak - base, "ratio": (peak - base) / kept}


# --- the process pools ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, tasks: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SHARD_TEST_DIR=folder)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    results = {}
    try:
        for name, fn, kwargs in tasks:
            try:
                results[name] = globals()[fn](**kwargs)
            except Exception:  # reported by the test that reads this task
                results[name] = {"error": traceback.format_exc()}
    finally:
        Path(folder, f"results-{world}-{rank}.json").write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()


def _pool(folder: Path, world: int, tasks: list) -> dict[str, list[dict]]:
    mp.start_processes(
        _worker, args=(world, _free_port(), str(folder), tasks), nprocs=world, start_method="spawn"
    )
    per_rank = [json.loads((folder / f"results-{world}-{r}.json").read_text()) for r in range(world)]
    return {name: [per_rank[r][name] for r in range(world)] for name, _, _ in tasks}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharding")
    biased_model(MICRO).save_pretrained(str(folder / "micro"))
    biased_model(MICRO).save_pretrained(str(folder / "micro_fp8"), fp8=True)
    biased_model(GROUPED).save_pretrained(str(folder / "grouped"))
    biased_model(FP8_ALIGNED).save_pretrained(str(folder / "aligned_fp8"), fp8=True)
    biased_model(BIG).save_pretrained(str(folder / "big"), max_shard_size="60MB")
    return folder


TASKS_2 = [
    ("rss_tp2", "task_rss", dict(ckpt="big", tp=2, ep=1)),  # first: nothing else has touched memory yet
    ("tp2", "task_forward", dict(cfg="micro", tp=2, ep=1)),
    ("ep2", "task_forward", dict(cfg="micro", tp=1, ep=2)),
    ("tp2_grouped", "task_forward", dict(cfg="grouped", tp=2, ep=1)),
    ("ep2_grouped", "task_forward", dict(cfg="grouped", tp=1, ep=2, topk_sync="broadcast")),
    ("tp2_fp8", "task_forward", dict(cfg="fp8_aligned", tp=2, ep=1, fp8=True)),
    ("ep2_fp8", "task_forward", dict(cfg="fp8_aligned", tp=1, ep=2, fp8=True)),
    ("load_tp2", "task_load", dict(ckpt="micro", tp=2, ep=1)),
    ("load_ep2", "task_load", dict(ckpt="micro", tp=1, ep=2)),
    ("load_tp2_fp8_dequantize", "task_load", dict(ckpt="micro_fp8", tp=2, ep=1)),
    ("load_tp2_padded_vocab", "task_load", dict(ckpt="grouped", tp=2, ep=1)),
    ("load_tp2_fp8_keep", "task_load", dict(ckpt="aligned_fp8", tp=2, ep=1, fp8="keep")),
]
TASKS_4 = [
    ("tp2ep2", "task_forward", dict(cfg="micro", tp=2, ep=2)),
    ("tp2ep2_grouped", "task_forward", dict(cfg="grouped", tp=2, ep=2)),
    ("tp2ep2_fp8", "task_forward", dict(cfg="fp8_aligned", tp=2, ep=2, fp8=True)),
    ("load_tp2ep2", "task_load", dict(ckpt="micro", tp=2, ep=2)),
    ("load_tp2ep2_fp8_keep", "task_load", dict(ckpt="aligned_fp8", tp=2, ep=2, fp8="keep")),
]


@pytest.fixture(scope="module")
def pool2(checkpoints) -> dict[str, list[dict]]:
    return _pool(checkpoints, 2, TASKS_2)


@pytest.fixture(scope="module")
def pool4(checkpoints) -> dict[str, list[dict]]:
    return _pool(checkpoints, 4, TASKS_4)


def _ok(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r, r["error"]
    return results


# --- multi-process: forward, cache, MTP, FP8 ---------------------------------------------------------
@pytest.mark.parametrize("task", ["tp2", "ep2", "tp2_grouped", "ep2_grouped", "tp2_fp8", "ep2_fp8"])
def test_two_ranks_match_one_process(pool2, task) -> None:
    for r in _ok(pool2[task]):
        assert r["max_diff"] <= TOL, r
        assert r["tokens_equal"], r
        assert r["same_on_every_rank"], r  # gloo all-reduce hands every rank the same bits
    assert pool2[task][0]["num_outputs"] >= 10


@pytest.mark.parametrize("task", ["tp2ep2", "tp2ep2_grouped", "tp2ep2_fp8"])
def test_four_ranks_tp2_x_ep2_match_one_process(pool4, task) -> None:
    results = _ok(pool4[task])
    for r in results:
        assert r["max_diff"] <= TOL, r
        assert r["tokens_equal"] and r["same_on_every_rank"], r
    cfg = FP8_ALIGNED if "fp8" in task else MICRO
    assert [r["local_heads"] for r in results] == [cfg.num_attention_heads // 2] * 4  # attention: 2 ways, x2
    per_rank = cfg.n_routed_experts // 4  # experts: over all 4 ranks
    assert [r["expert_start"] for r in results] == [0, per_rank, 2 * per_rank, 3 * per_rank]
    assert all(r["local_experts"] == per_rank for r in results)


def test_layouts_split_heads_and_experts_as_documented(pool2) -> None:
    tp2, ep2 = _ok(pool2["tp2"]), _ok(pool2["ep2"])
    assert [r["local_heads"] for r in tp2] == [1, 1] and [r["local_heads"] for r in ep2] == [2, 2]
    assert [r["expert_start"] for r in tp2] == [0, 4] == [r["expert_start"] for r in ep2]


def test_topk_check_mode_compared_the_indexer_and_router_on_every_call(pool2, pool4) -> None:
    # 2 prompts x (forward + MTP + prefill + 6 decode steps) x (indexer layers + MoE layers), all equal
    for r in _ok(pool2["tp2"]) + _ok(pool4["tp2ep2"]):
        assert r["topk_checks"] > 50, r
    assert all(r["topk_checks"] == 0 for r in _ok(pool2["ep2_grouped"]))  # broadcast mode checks nothing


# --- multi-process: sharded loading -------------------------------------------------------------------
@pytest.mark.parametrize(
    "task", ["load_tp2", "load_ep2", "load_tp2_fp8_dequantize", "load_tp2_padded_vocab", "load_tp2_fp8_keep"]
)
def test_sharded_load_equals_the_slices_of_the_full_model(pool2, task) -> None:
    for r in _ok(pool2[task]):
        assert r["unequal"] == [], r
        assert r["bytes"] == r["promise"], r
        assert r["max_diff"] <= TOL and r["tokens_equal"], r
    if task.endswith("keep"):
        assert "torch.float8_e4m3fn" in pool2[task][0]["dtypes"]


@pytest.mark.parametrize("task", ["load_tp2ep2", "load_tp2ep2_fp8_keep"])
def test_four_rank_sharded_load_keeps_the_promised_bytes(pool4, task) -> None:
    results = _ok(pool4[task])
    for r in results:
        assert r["unequal"] == [] and r["bytes"] == r["promise"], r
        assert r["max_diff"] <= TOL and r["tokens_equal"], r
    # attention x2 (e copies), MoE x1
    assert sum(r["bytes"] for r in results) < 2.2 * results[0]["full_bytes"]


def test_sharded_load_peak_memory_is_close_to_what_the_rank_keeps(pool2) -> None:
    for r in _ok(pool2["rss_tp2"]):
        assert r["kept"] > 100e6, r  # a few hundred MB checkpoint, half per rank
        assert r["ratio"] <= 1.2, r


# --- one process: layout rules, byte ranges, memory planning ----------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "tp", "ep", "fp8", "rule"),
    [
        (MICRO, 4, 1, False, "tp_size <= heads"),
        (MICRO.replace(num_attention_heads=4, num_key_value_heads=4), 3, 1, False, "heads % tp_size == 0"),
        (MICRO, 1, 3, False, "n_routed_experts % (tp_size x ep_size) == 0"),
        (
            MICRO.replace(num_attention_heads=4, intermediate_size=98),
            4,
            1,
            False,
            "intermediate_size % tp_size",
        ),
        (MICRO.replace(moe_intermediate_size=12), 1, 8, False, "shared % (tp_size x ep_size) == 0"),
        (MICRO.replace(attention_bias=True), 2, 1, False, "attention_bias needs tp_size == 1"),
        (MICRO, 2, 1, True, "FP8-kept splits fall on 128-blocks"),
        (FP8_ALIGNED, 4, 1, True, "o_proj columns"),
    ],
)
def test_refused_layouts_name_their_rule(cfg, tp, ep, fp8, rule) -> None:
    with pytest.raises(LayoutError, match=re.escape(rule)):
        check_layout(cfg, ShardLayout(0, tp, 0, ep), fp8=fp8)
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    if fp8:
        quantize_model(model)
    with pytest.raises(LayoutError, match=re.escape(rule)):
        shard_model(model, 0, tp, 0, ep)
    assert getattr(model, "shard_plan", None) is None


def test_fp8_keep_refusal_comes_before_anything_is_read(checkpoints, monkeypatch) -> None:
    def no_reads(*args, **kwargs):
        raise AssertionError("read a tensor before refusing the layout")

    monkeypatch.setattr(RangeReader, "read", no_reads)
    with pytest.raises(LayoutError, match="128-blocks"):
        load_sharded(str(checkpoints / "micro_fp8"), 0, 2, fp8="keep")
    with pytest.raises(LayoutError, match="tp_size <= heads"):
        load_sharded(str(checkpoints / "micro"), 0, 4)


def test_range_reader_reads_row_and_column_slices_and_padding(checkpoints) -> None:
    folder = CheckpointFolder(checkpoints / "micro")
    full = GLM5ForCausalLM.from_pretrained(str(checkpoints / "micro")).hf_state_dict()
    name = "model.layers.0.self_attn.o_proj.weight"
    with RangeReader(folder) as reader:
        assert torch.equal(reader.read(name), full[name])
        assert torch.equal(reader.read(name, ShardSlice(0, 5, 9)), full[name][5:9])
        assert torch.equal(reader.read(name, ShardSlice(1, 12, 24)), full[name][:, 12:24])
        assert torch.equal(reader.read(name, ShardSlice(1, 20, 30)), full[name][:, 20:])  # clipped at the end


def test_one_rank_layout_changes_nothing() -> None:
    model = biased_model(MICRO)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = shard_model(model)
    assert plan.slices == {} and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_per_rank_bytes_on_the_meta_device_match_the_promise() -> None:
    model = biased_model(MICRO)
    full_sd = model.state_dict()
    for tp, ep in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (1, 8), (2, 4)]:
        for rank in range(tp * ep):
            assert rank_weight_bytes(MICRO, tp, ep, rank=rank, dtype=torch.float32) == _promise(
                full_sd, MICRO, tp, ep
            )


def test_tied_embeddings_stay_tied_and_a_forward_without_process_groups_says_so() -> None:
    cfg = MICRO.replace(tie_word_embeddings=True)
    model = biased_model(cfg)
    full_rows = model.model.embed_tokens.weight[128:].clone()
    shard_model(model, 1, 2)  # torch.distributed is not initialised here: no groups
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, full_rows)
    with pytest.raises(RuntimeError, match="no tensor-parallel process group"):
        model(torch.zeros(1, 3, dtype=torch.long))
