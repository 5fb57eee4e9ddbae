"""Zero-copy loading: a checkpoint tensor stored in the dtype and shape the model holds is not copied; the model's
parameter is a copy-on-write view of the shard's memory mapping (fp32, bf16 and FP8-kept checkpoints), writes into
it never reach the file, and the per-expert slices of the fused banks (which cannot be views) are copied."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import CFG, _model

from glm5 import GLM5ForCausalLM
from glm5.checkpoint.files import CheckpointFolder, ShardReader
from glm5.model.fp8 import FP8_DTYPE


def _mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the folder's shard files (from /proc/self/maps)."""
    shards = {str(p.resolve()) for p in folder.glob("*.safetensors")}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() in shards:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _inside(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    start = t.data_ptr()
    return any(lo <= start and start + t.numel() * t.element_size() <= hi for lo, hi in ranges)


pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "fp8"])
def test_whole_tensors_of_the_model_share_the_shard_mapping(tmp_path: Path, kind: str) -> None:
    source = _model()
    if kind == "bfloat16":
        source = source.to(torch.bfloat16)
    source.save_pretrained(str(tmp_path), fp8=kind == "fp8", max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # several shards, each mapped on its own
    options = {"fp8": "keep"} if kind == "fp8" else {"dtype": getattr(torch, kind)}
    model = GLM5ForCausalLM.from_pretrained(str(tmp_path), **options)
    ranges = _mapped_ranges(tmp_path)
    assert ranges, "no shard of the checkpoint is mapped"
    shared, copied = [], []
    for name, t in model.state_dict().items():
        if "rotary" in name or "cos" in name or "sin" in name:
            continue  # recomputed tables, not in the checkpoint
        (shared if _inside(t, ranges) else copied).append(name)
    routed = [n for n in copied if ".experts." in n and "shared_experts" not in n]
    # routers are saved in the model's dtype (as published) but held in fp32: a bf16 checkpoint's are converted
    converted = [n for n in copied if n.endswith("mlp.gate.weight")] if kind == "bfloat16" else []
    unexpected = sorted(set(copied) - set(routed) - set(converted))
    assert not unexpected, f"copied although stored as held: {unexpected}"
    assert routed, "the fused expert banks are filled by copies of the per-expert slices"
    assert any(n.endswith("embed_tokens.weight") for n in shared)
    if kind == "fp8":
        fp8_shared = [n for n in shared if model.state_dict()[n].dtype == FP8_DTYPE]
        assert fp8_shared and all(f"{n}_scale_inv" in shared for n in fp8_shared if n.endswith(".weight"))
    # same values as the source, through the model forward
    ids = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = GLM5ForCausalLM.from_pretrained(str(tmp_path), **options)
        for t in reference.state_dict().values():  # a copied twin: compare against plain memory
            t.data = t.data.clone()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_writes_into_a_mapped_parameter_stay_in_the_process(tmp_path: Path) -> None:
    _model().save_pretrained(str(tmp_path))
    before = load_file(str(tmp_path / "model.safetensors"))
    model = GLM5ForCausalLM.from_pretrained(str(tmp_path))
    embed = model.model.embed_tokens.weight
    assert _inside(embed, _mapped_ranges(tmp_path))
    with torch.no_grad():
        embed.add_(1.0)  # an optimizer step / update_weights writes in place
    assert torch.equal(embed, before["model.embed_tokens.weight"] + 1.0)
    after = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in before), "a write reached the checkpoint file"
    again = GLM5ForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(again.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_a_mapped_view_outlives_the_reader_and_a_deleted_file(tmp_path: Path) -> None:
    _model().save_pretrained(str(tmp_path))
    folder = CheckpointFolder(tmp_path)
    with ShardReader(folder) as reader:
        view = reader.mapped("model.embed_tokens.weight")
        copy = reader.get("model.embed_tokens.weight")
    (tmp_path / "model.safetensors").unlink()
    assert view is not None and torch.equal(view, copy)


def test_loading_runs_no_python_reference_ops(tmp_path: Path) -> None:
    """Building the model on the meta device must not reach torch's Python references (normal_ or arange on meta
    import torch._dynamo: about 1 s and 68 MB resident in a process that only loads a checkpoint; empty_like or
    Module.to_empty on meta import sympy: ~30 MB); and the rotary table a meta build leaves behind is recomputed on
    load."""
    _model().save_pretrained(str(tmp_path))
    code = (
        "import sys, torch\n"
        "from glm5 import GLM5ForCausalLM, GLM5Config\n"
        f"m = GLM5ForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "ref = GLM5ForCausalLM(m.config).rotary.inv_freq\n"
        "assert torch.equal(m.rotary.inv_freq, ref), (m.rotary.inv_freq, ref)\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False False", (
        f"loading imported (torch._dynamo, sympy): {out.stdout.strip()}"
    )
