"""Checkpoint folders: the published layout, streaming load, atomic sharded save, conversion, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import CHECKPOINT
from safetensors.torch import load_file, save_file

import glm5.checkpoint.files as files_module
from glm5 import GLM5Config, GLM5ForCausalLM
from glm5.checkpoint.convert import convert_checkpoint, summarize_checkpoint
from glm5.checkpoint.files import INDEX_FILE, CheckpointError, CheckpointFolder, parse_size
from glm5.checkpoint.synthetic import list_tensors, total_bytes, write_random_checkpoint
from glm5.cli import main

CFG = CHECKPOINT


def _model(cfg: GLM5Config = CFG, seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg).eval()
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def _ids(length: int = 9) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> GLM5ForCausalLM:
    return _model()


@pytest.fixture()
def saved(tmp_path, model) -> Path:
    path = tmp_path / "ckpt"
    model.save_pretrained(path, max_shard_size="16KB")
    return path


# --- layout ---------------------------------------------------------------------------------------
def test_glm5_listing_has_the_published_tensor_counts_and_sizes() -> None:
    glm5, glm52 = GLM5Config.from_preset("glm-5"), GLM5Config.from_preset("glm-5.2")
    bf16, fp8 = list_tensors(glm5), list_tensors(glm5, fp8=True)
    assert not any(isinstance(x, torch.Tensor) for entry in fp8 for x in entry)  # names, shapes, dtypes only
    assert len(bf16) == 59_870 and total_bytes(bf16) == 1_507_728_316_928  # docs/model.md (tensor names)
    assert len(fp8) == 119_028 and total_bytes(fp8) == 756_162_687_872
    glm52_fp8 = list_tensors(glm52, fp8=True)
    assert len(glm52_fp8) == 118_629 and total_bytes(glm52_fp8) == 755_617_140_416  # published total_size
    shapes = {name: (shape, dtype) for name, shape, dtype in fp8}
    assert shapes["model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ((5, 48), torch.float32)
    assert shapes["model.layers.0.self_attn.indexer.wk.weight_scale_inv"] == ((1, 48), torch.float32)
    assert shapes["model.layers.78.mlp.gate.e_score_correction_bias"] == ((256,), torch.float32)
    assert shapes["model.layers.78.eh_proj.weight"] == ((6144, 12288), torch.bfloat16)
    assert (
        "model.layers.78.embed_tokens.weight" not in shapes
        and "model.layers.78.shared_head.head.weight" not in shapes
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"attention_bias": True, "n_shared_experts": 2},
        {"num_nextn_predict_layers": 0, "first_k_dense_replace": 0},
        {"first_k_dense_replace": 4, "index_topk_pattern": None},
    ],
)
def test_saved_checkpoint_is_exactly_the_listed_layout(tmp_path, changes) -> None:
    cfg = CFG.replace(**changes)
    _model(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    tensors = CheckpointFolder(tmp_path).tensors
    listed = list_tensors(cfg.replace(torch_dtype="bfloat16"))
    assert {n: (t.shape, t.dtype) for n, t in tensors.items()} == {n: (s, d) for n, s, d in listed}
    _model(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "fp8", fp8=True)
    tensors = CheckpointFolder(tmp_path / "fp8").tensors
    listed = list_tensors(cfg.replace(torch_dtype="bfloat16"), fp8=True)
    assert {n: (t.shape, t.dtype) for n, t in tensors.items()} == {n: (s, d) for n, s, d in listed}


def test_mtp_is_layer_n_without_embedding_or_head_and_survives_a_round_trip_bit_exactly(saved, model) -> None:
    names = CheckpointFolder(saved).tensors
    layer_n = [n for n in names if n.startswith("model.layers.3.")]
    assert {
        "model.layers.3.enorm.weight",
        "model.layers.3.hnorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.shared_head.norm.weight",
        "model.layers.3.mlp.experts.3.down_proj.weight",
    } <= set(layer_n)
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in layer_n)
    loaded = GLM5ForCausalLM.from_pretrained(saved)
    mtp = {k: v for k, v in model.state_dict().items() if k.startswith("mtp.")}
    assert mtp and all(torch.equal(loaded.state_dict()[k], v) for k, v in mtp.items())
    with torch.no_grad():
        a, b = model(_ids(), mtp_depth=2), loaded(_ids(), mtp_depth=2)
    assert torch.equal(a.logits, b.logits) and all(
        torch.equal(x, y) for x, y in zip(a.mtp_logits, b.mtp_logits)
    )


# --- save / load ----------------------------------------------------------------------------------
def test_sharded_save_has_size_limited_shards_and_an_index_with_total_size(saved, model) -> None:
    index = json.loads((saved / INDEX_FILE).read_text())
    shards = sorted(saved.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p.name) for p in shards)
    contents = {p.name: load_file(p) for p in shards}
    sizes = {name: sum(t.nbytes for t in tensors.values()) for name, tensors in contents.items()}
    # a lone tensor may exceed
    assert all(sizes[name] <= 16_000 or len(contents[name]) == 1 for name in sizes)
    assert (
        index["metadata"]["total_size"]
        == sum(sizes.values())
        == sum(t.nbytes for t in model.state_dict().values())
    )
    # the experts of one layer span several shards and still load into the fused [E, ...] parameters
    expert_files = {f for n, f in index["weight_map"].items() if ".layers.1.mlp.experts." in n}
    assert len(expert_files) > 1
    loaded = GLM5ForCausalLM.from_pretrained(saved)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_that_fits_one_shard_is_a_single_model_safetensors(tmp_path, model) -> None:
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(GLM5ForCausalLM.from_pretrained(tmp_path)(_ids()).logits, model(_ids()).logits)


def test_load_dtype_keeps_routers_in_fp32_and_rebuilds_rope_tables(saved, model) -> None:
    loaded = GLM5ForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    router = loaded.model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert (
        loaded.lm_head.weight.dtype == torch.bfloat16 and loaded.mtp[0].eh_proj.weight.dtype == torch.bfloat16
    )
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)  # not in the files: recomputed
    assert GLM5ForCausalLM.from_pretrained(saved).lm_head.weight.dtype == torch.float32  # config dtype
    with pytest.raises(ValueError, match="fp8="):
        GLM5ForCausalLM.from_pretrained(saved, fp8="int4")


def test_random_checkpoint_in_the_published_layout_loads_and_is_deterministic(tmp_path) -> None:
    write_random_checkpoint(CFG, tmp_path / "a", fp8=True, seed=3, max_shard_size="20KB")
    write_random_checkpoint(CFG, tmp_path / "b", fp8=True, seed=3)
    a, b = load_all(tmp_path / "a"), load_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    model = GLM5ForCausalLM.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.isfinite(model(_ids(), mtp_depth=1).mtp_logits[0]).all()


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in folder.glob("*.safetensors"):
        out.update(load_file(p))
    return out


def test_save_is_atomic_and_keeps_other_files(tmp_path, model, monkeypatch) -> None:
    path = tmp_path / "ckpt"
    model.save_pretrained(path, max_shard_size="16KB")
    (path / "tokenizer.json").write_text("{}")
    (path / ".cache").mkdir()
    before = load_all(path)
    calls = {"n": 0}
    real_save = files_module.save_file

    def crash_on_third_shard(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files_module, "save_file", crash_on_third_shard)
    with pytest.raises(OSError, match="disk full"):
        _model(seed=1).save_pretrained(path, max_shard_size="16KB")
    with pytest.raises(OSError, match="disk full"):
        calls["n"] = 0
        _model(seed=1).save_pretrained(tmp_path / "new", max_shard_size="16KB")
    assert not (tmp_path / "new").exists()  # no half-written folder that looks like a checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # and no temporary folders left behind
    after = load_all(path)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.setattr(files_module, "save_file", real_save)
    _model(seed=1).save_pretrained(path)  # replaces the weights, keeps the tokenizer
    assert sorted(os.listdir(path)) == [".cache", "config.json", "model.safetensors", "tokenizer.json"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1000) == 1000
    assert parse_size("16KB") == 16_000 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="5GB"):
        parse_size("five gigs")


# --- conversion and info --------------------------------------------------------------------------
def test_convert_bf16_to_fp8_and_back_matches_save_pretrained(tmp_path) -> None:
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path / "fp8-saved", fp8=True)
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8", max_shard_size="20KB")
    converted, saved = load_all(tmp_path / "fp8"), load_all(tmp_path / "fp8-saved")
    assert converted.keys() == saved.keys()
    assert all(
        converted[k].dtype == saved[k].dtype and torch.equal(converted[k].float(), saved[k].float())
        for k in saved
    )
    assert (tmp_path / "fp8" / "tokenizer.json").exists()
    assert "quantization_config" in json.loads((tmp_path / "fp8" / "config.json").read_text())
    convert_checkpoint(tmp_path / "fp8", tmp_path / "back", "bf16")
    back = GLM5ForCausalLM.from_pretrained(tmp_path / "back", fp8="keep")  # BF16 files, quantised on load
    fp8_model = GLM5ForCausalLM.from_pretrained(tmp_path / "fp8", fp8="keep")
    for (name, a), (_, b) in zip(back.state_dict().items(), fp8_model.state_dict().items()):
        assert torch.equal(a.float(), b.float()), name  # e4m3 values survive bf16 exactly
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_cli_convert_and_info_report_what_is_quantised(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    _model().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "fp8"), "--to", "fp8"]) == 0
    out = capsys.readouterr()
    assert "tensors" in out.err and "wrote" in out.out
    summary = summarize_checkpoint(tmp_path / "fp8")
    quantised = sum(
        1
        for n, _, d in list_tensors(CFG.replace(torch_dtype="bfloat16"), fp8=True)
        if d == torch.float8_e4m3fn
    )
    assert summary.counts["FP8 e4m3 weights"] == summary.counts["fp32 block scales"] == quantised
    assert main(["info", str(tmp_path / "fp8")]) == 0
    out = capsys.readouterr().out
    assert "FP8 e4m3 weights" in out and "fp32 block scales" in out and "bfloat16" in out
    assert f"{summary.counts['FP8 e4m3 weights']:,}" in out and f"{summary.total_bytes:,} B" in out
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


# --- bad input ------------------------------------------------------------------------------------
def _rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _first_shard_with(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]


O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _corrupt(kind: str, path: Path) -> str:
    """Break the checkpoint at `path`; return a regex the error message must match."""
    shard = _first_shard_with(path, O_PROJ)
    index_path = path / INDEX_FILE
    index = json.loads(index_path.read_text())
    if kind == "missing shard":
        shard.unlink()
        return rf"{shard.name}: shard file is missing"
    if kind == "tensor in index absent from shard":
        _rewrite_shard(shard, lambda t: t.pop(O_PROJ))
        return rf"{shard.name}: tensor '{re.escape(O_PROJ)}' is listed in {INDEX_FILE} but absent"
    if kind == "tensor missing from the index":
        index["weight_map"].pop(O_PROJ)
        index_path.write_text(json.dumps(index))
        _rewrite_shard(shard, lambda t: t.pop(O_PROJ))
        return rf"{INDEX_FILE}: tensor '{re.escape(O_PROJ)}' is missing"
    if kind == "shape mismatch":
        _rewrite_shard(shard, lambda t: t.update({O_PROJ: t[O_PROJ][:, :-1].contiguous()}))
        return rf"{shard.name}: tensor '{re.escape(O_PROJ)}' has shape \[32, 15\], but config.json implies \[32, 16\]"
    if kind == "dtype mismatch":
        _rewrite_shard(shard, lambda t: t.update({O_PROJ: t[O_PROJ].to(torch.int32)}))
        return rf"{shard.name}: tensor '{re.escape(O_PROJ)}' has dtype int32"
    if kind == "e4m3 without scale":
        _rewrite_shard(shard, lambda t: t.update({O_PROJ: t[O_PROJ].to(torch.float8_e4m3fn)}))
        name = re.escape(O_PROJ)
        return rf"{shard.name}: tensor '{name}' is float8_e4m3fn but '{name}_scale_inv' is missing"
    if kind in ("truncated", "corrupt header"):
        data = shard.read_bytes()
        shard.write_bytes(
            data[:-100] if kind == "truncated" else b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all}   "
        )
        return rf"{shard.name}: not a readable safetensors file .*truncated or corrupt"
    if kind == "config does not match":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "v_head_dim": 6}))
        return r"has shape \[.*\], but config.json implies .*config.json does not match the weights"
    if kind == "config has fewer layers":
        config = json.loads((path / "config.json").read_text())
        pattern = config.pop("index_topk_pattern")[:2]
        (path / "config.json").write_text(
            json.dumps({**config, "num_hidden_layers": 2, "index_topk_pattern": pattern})
        )
        return r"config.json does not match the weights"
    if kind == "unknown key":
        _rewrite_shard(shard, lambda t: t.update({"model.layers.1.mlp.fancy.weight": torch.zeros(2)}))
        index["weight_map"]["model.layers.1.mlp.fancy.weight"] = shard.name
        index_path.write_text(json.dumps(index))
        return rf"{shard.name}: unknown tensor 'model\.layers\.1\.mlp\.fancy\.weight'"
    if kind == "bad config.json":
        (path / "config.json").write_text("{")
        return r"config.json: not valid JSON"
    raise AssertionError(kind)


BAD = [
    "missing shard",
    "tensor in index absent from shard",
    "tensor missing from the index",
    "shape mismatch",
    "dtype mismatch",
    "e4m3 without scale",
    "truncated",
    "corrupt header",
    "config does not match",
    "config has fewer layers",
    "unknown key",
    "bad config.json",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoints_raise_one_clear_error_before_any_weight_is_allocated(
    saved, kind, monkeypatch
) -> None:
    pattern = _corrupt(kind, saved)

    def no_allocation(self, *args, **kwargs):
        raise AssertionError("weights were allocated before the checkpoint was validated")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    with pytest.raises(CheckpointError, match=pattern) as info:
        GLM5ForCausalLM.from_pretrained(saved)
    assert isinstance(info.value, ValueError) and str(saved) in str(info.value)


@pytest.mark.parametrize(
    "kind", ["missing shard", "dtype mismatch", "e4m3 without scale", "corrupt header", "unknown key"]
)
def test_convert_rejects_bad_checkpoints_with_one_line_and_writes_nothing(saved, kind, capsys) -> None:
    _corrupt(kind, saved)
    assert main(["convert", str(saved), str(saved.parent / "out"), "--to", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(saved) in err[0]
    assert sorted(os.listdir(saved.parent)) == ["ckpt"]


def test_glm5_never_unpickles() -> None:
    """No pickle.load, and torch.load only with weights_only=True (which refuses arbitrary objects)."""
    root = Path(__file__).resolve().parents[1] / "glm5"
    unsafe = re.compile(r"pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)")
    offenders = [str(p) for p in root.rglob("*.py") if unsafe.search(p.read_text())]
    assert not offenders


def test_the_checkpoint_package_never_imports_the_model() -> None:
    code = (
        "import sys, glm5.checkpoint.pretrained, glm5.checkpoint.convert, glm5.checkpoint.synthetic; "
        "print(sorted(m for m in sys.modules if m.startswith('glm5.model')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
