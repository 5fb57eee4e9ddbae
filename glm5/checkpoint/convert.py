"""Checkpoint conversion BF16 <-> block FP8, streaming tensor by tensor, and a summary of what a folder holds.

`convert_checkpoint` first checks every tensor's name, shape and dtype against the layout its config.json implies
(from the shard headers; the same checks as loading), then reads one tensor at a time from the source shards
(memory-mapped, one open at a time) and writes the destination in the published layout through the same atomic
shard writer as `save_pretrained` (a temporary folder renamed into place: a failure leaves nothing). No model is
built, so converting the 744B checkpoint needs memory for about one output shard.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from glm5.checkpoint import fp8 as fp8_format
from glm5.checkpoint.files import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointFolder,
    ShardReader,
    TensorInfo,
    TensorSpec,
    dtype_name,
    write_checkpoint,
)
from glm5.checkpoint.hf import is_glm5_name, is_shared_copy
from glm5.checkpoint.pretrained import _match, _without_absent_mtp
from glm5.checkpoint.synthetic import list_tensors
from glm5.config import GLM5Config

TARGETS = ("fp8", "bf16")


def _specs(folder: CheckpointFolder, reader: ShardReader, to: str) -> list[TensorSpec]:
    """What to write for each source tensor, in source file order (so reading streams shard by shard)."""
    specs: list[TensorSpec] = []
    tensors = folder.tensors
    for _, infos in folder.by_file():
        for info in infos:
            name = info.name
            if name.endswith(fp8_format.SCALE_SUFFIX):
                if name.removesuffix(fp8_format.SCALE_SUFFIX) not in tensors:
                    raise CheckpointError(
                        f"{os.path.join(folder.path, info.file)}: scale {name!r} has no weight"
                    )
                continue  # written (or dropped) with its weight
            specs += _convert_one(folder, reader, info, to)
    return specs


def _convert_one(
    folder: CheckpointFolder, reader: ShardReader, info: TensorInfo, to: str
) -> list[TensorSpec]:
    name, shape = info.name, info.shape
    sname = fp8_format.scale_name(name)
    scale = folder.tensors.get(sname)
    if info.dtype == fp8_format.FP8_DTYPE:
        if scale is None:
            raise CheckpointError(
                f"{os.path.join(folder.path, info.file)}: {name!r} is float8_e4m3fn but {sname!r} is missing"
            )
        if to == "fp8":
            return [
                TensorSpec(name, shape, info.dtype, lambda: reader.get(name)),
                TensorSpec(sname, scale.shape, torch.float32, lambda: reader.get(sname).float()),
            ]
        return [
            TensorSpec(
                name,
                shape,
                torch.bfloat16,
                lambda: fp8_format.dequantize(reader.get(name), reader.get(sname), torch.bfloat16),
            )
        ]
    if not info.dtype.is_floating_point:
        raise CheckpointError(
            f"{os.path.join(folder.path, info.file)}: tensor {name!r} has dtype {info.dtype}"
        )
    if to == "fp8" and fp8_format.is_quantized(name) and len(shape) == 2:
        pending: dict[str, torch.Tensor] = {}

        def quantized() -> torch.Tensor:
            q, pending["scale"] = fp8_format.quantize(reader.get(name))
            return q

        return [
            TensorSpec(name, shape, fp8_format.FP8_DTYPE, quantized),
            TensorSpec(sname, fp8_format.scale_shape(shape), torch.float32, lambda: pending.pop("scale")),
        ]
    # BF16 target: every float tensor in bfloat16 except the fp32 router bias. FP8 target: the BF16 part
    # keeps its source dtype.
    keep_fp32 = name.endswith("e_score_correction_bias")
    dtype = torch.float32 if keep_fp32 else torch.bfloat16 if to == "bf16" else info.dtype
    return [TensorSpec(name, shape, dtype, lambda: reader.get(name).to(dtype))]


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    max_shard_size: int | str = "5GB",
    progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict:
    """Convert the checkpoint folder `src` to `to` ("fp8": GLM-5-FP8's block-FP8 split; "bf16": every weight
    in bfloat16) and write it to `dst` (atomically; other files of `src`, e.g. the tokenizer, are copied).

    on_start(num_tensors, num_bytes) is called once before writing, progress(tensors, bytes) after each
    tensor. Returns the written index.
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if os.path.abspath(os.fspath(src)) == os.path.abspath(os.fspath(dst)):
        raise ValueError("SRC and DST are the same folder; write the converted checkpoint elsewhere")
    folder = CheckpointFolder(src)
    config_path = os.path.join(folder.path, CONFIG_FILE)
    try:
        cfg = GLM5Config.from_hf_config(folder.config)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    for info in folder.tensors.values():
        if not is_glm5_name(info.name, cfg) and not is_shared_copy(info.name, cfg):
            raise CheckpointError(f"{os.path.join(folder.path, info.file)}: unknown tensor {info.name!r}")
    check_layout(folder, cfg)
    config = dict(folder.config)
    config.pop("quantization_config", None)
    if to == "fp8":
        config["quantization_config"] = fp8_format.quantization_config(cfg)
    else:
        config["dtype"] = "bfloat16"
    with folder.reader() as reader:
        specs = _specs(folder, reader, to)
        if on_start is not None:
            on_start(len(specs), sum(s.nbytes for s in specs))
        return write_checkpoint(
            dst, config, specs, max_shard_size, progress=progress, keep_files_from=folder.path
        )


def check_layout(folder: CheckpointFolder, cfg: GLM5Config) -> None:
    """CheckpointError naming the file and tensor unless every tensor the config implies is there with its shape
    (and a float dtype, or e4m3 with a well-shaped scale) and nothing else is: what loading checks, from the
    shard headers alone. A checkpoint saved without its MTP layer (as transformers saves) passes as one without."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing MTP layer is reported by loading, not by conversion
        cfg = _without_absent_mtp(cfg, folder)
    expected = {
        name: (shape, dtype) for name, shape, dtype in list_tensors(cfg.replace(torch_dtype="bfloat16"))
    }
    _match(folder, expected, cfg)


@dataclass
class CheckpointSummary:
    """What a checkpoint folder holds, from its shard headers: tensor counts and bytes by role and dtype."""

    path: str
    num_files: int
    counts: Counter = field(default_factory=Counter)
    nbytes: Counter = field(default_factory=Counter)
    index_total_size: int | None = None
    """`metadata.total_size` of the index (None for a single-file checkpoint)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())

    @property
    def total_tensors(self) -> int:
        return sum(self.counts.values())


ROLES = ("FP8 e4m3 weights", "fp32 block scales", "bfloat16", "float32", "float16")


def summarize_checkpoint(path: str | os.PathLike) -> CheckpointSummary:
    """Count the tensors and bytes of a checkpoint folder by role: e4m3 weights, their fp32 scales, and the
    unquantised tensors by dtype."""
    folder = CheckpointFolder(path)
    total = folder.metadata.get("total_size")
    out = CheckpointSummary(
        folder.path, len(folder.files), index_total_size=int(total) if total is not None else None
    )
    for info in folder.tensors.values():
        if info.dtype == fp8_format.FP8_DTYPE:
            role = "FP8 e4m3 weights"
        elif info.name.endswith(fp8_format.SCALE_SUFFIX):
            role = "fp32 block scales"
        else:
            role = dtype_name(info.dtype)
        out.counts[role] += 1
        out.nbytes[role] += info.nbytes
    return out
