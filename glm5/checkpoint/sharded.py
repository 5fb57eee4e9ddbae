"""Sharded loading: each process reads only the slices of a checkpoint that its shard of the model keeps.

The model is built on the meta device at its full size (so the checkpoint's names, shapes and dtypes are
checked exactly as `load_pretrained` checks them, from the shard headers alone), then a `shard` callback
(glm5.engine.sharding) swaps in the local modules, still on the meta device, and returns a plan: for every
local tensor that is a slice of the global one, a `ShardSlice` (dimension, start, stop). Only then are the
local tensors allocated, and each is filled from the byte ranges of its slice.

Reads go through `RangeReader`: `os.preadv` of the byte ranges, straight into the destination tensor when
the dtype matches. Not through the memory map of `safe_open(...).get_slice`: the pages a memory map touches
count toward the process's resident memory while the file is mapped (measured on a 384 MB file: reading
half its rows through get_slice raised RSS by 251 MB on top of the 192 MB kept; half its columns by the
whole file, 395 MB). With `preadv` the resident memory is the kept tensors plus a bounded staging buffer.

Block FP8: keeping e4m3 weights (fp8="keep") needs every split to fall on a 128-element block boundary
(the sharding module refuses other layouts before anything is read; `check_block_aligned` is the rule);
dequantising (fp8="dequantize") reads the scale blocks that cover the slice, so any split works.
This module works on generic nn.Modules and state dicts; it never imports glm5.model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from glm5.checkpoint import fp8 as fp8_format
from glm5.checkpoint.files import CheckpointError, CheckpointFolder, TensorInfo
from glm5.checkpoint.hf import _FUSED, internal_to_hf_name, to_hf_state_dict
from glm5.checkpoint.pretrained import (
    _Read,
    _reset_non_persistent_buffers,
    build_and_match,
    materialize,
    open_checkpoint,
)
from glm5.config import GLM5Config

_STAGING_BYTES = 4 << 20
"""Largest staging buffer for strided reads (a column slice is read a few whole rows at a time)."""


@dataclass(frozen=True)
class ShardSlice:
    """The part of a global tensor a process keeps: indices [start, stop) along `dim`.

    `stop` may pass the global size (vocabulary padding): those local rows are zero. For fused expert
    tensors [E, ...] the slice is along dim 0 and names the global expert ids."""

    dim: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def blocks(self, size: int) -> ShardSlice:
        """The block-FP8 scale entries covering this slice of a dimension of `size` elements."""
        b = fp8_format.FP8_BLOCK
        return ShardSlice(self.dim, self.start // b, math.ceil(min(self.stop, size) / b))


def check_block_aligned(name: str, spec: ShardSlice, size: int) -> str | None:
    """None when a split of a block-FP8 dimension keeps whole 128-blocks, else the reason (for an error)."""
    b = fp8_format.FP8_BLOCK
    if spec.start % b == 0 and (spec.stop % b == 0 or spec.stop >= size):
        return None
    return (
        f"{name}: the slice [{spec.start}, {spec.stop}) of dim {spec.dim} (size {size}) does not start and end on "
        f"{b}-element FP8 block boundaries, so its weight_scale_inv blocks cannot be split with it"
    )


# --- byte-range reads -----------------------------------------------------------------------------
class RangeReader:
    """Reads slices of checkpoint tensors with positioned reads (`os.preadv`), one file descriptor per shard.

    The safetensors layout: 8 bytes little-endian header length N, N bytes of JSON (name -> dtype, shape,
    data_offsets relative to the end of the header), then the data, row-major. Use as a context manager.
    """

    def __init__(self, folder: CheckpointFolder) -> None:
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self._staging: torch.Tensor | None = None

    def _file(self, info: TensorInfo) -> tuple[int, int]:
        """(file descriptor, absolute byte offset of the tensor's data)."""
        if info.file not in self._fds:
            path = os.path.join(self.folder.path, info.file)
            fd = os.open(path, os.O_RDONLY)
            try:
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                header = json.loads(os.pread(fd, n, 8))
            except (struct.error, ValueError) as e:
                os.close(fd)
                raise CheckpointError(f"{path}: cannot read the safetensors header ({e})") from None
            self._fds[info.file] = fd
            self._offsets[info.file] = {
                k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                for k, v in header.items()
                if k != "__metadata__"
            }
        begin, end = self._offsets[info.file].get(info.name, (0, -1))
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{os.path.join(self.folder.path, info.file)}: tensor {info.name!r} has "
                f"{end - begin} data bytes, its shape and dtype need {info.nbytes}"
            )
        return self._fds[info.file], begin

    def _pread(self, fd: int, out: torch.Tensor, offset: int, info: TensorInfo) -> None:
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{os.path.join(self.folder.path, info.file)}: tensor {info.name!r} is "
                    "truncated; the file is shorter than its header says"
                )
            done += n

    def read(
        self, name: str, spec: ShardSlice | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tensor `name`, or its slice `spec` (clipped to the tensor), in the file's dtype, on the CPU.

        `out` (contiguous, CPU, the file's dtype and the slice's shape) receives the bytes directly."""
        info = self.folder.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder.path}: no tensor {name!r} in the checkpoint")
        shape = list(info.shape)
        dim, start, stop = (
            (0, 0, shape[0] if shape else 1) if spec is None else (spec.dim, spec.start, spec.stop)
        )
        if shape:
            stop = max(start, min(stop, shape[dim]))  # a rank of vocabulary padding only reads nothing
        local = shape.copy()
        if shape:
            local[dim] = stop - start
        if out is None:
            out = torch.empty(local, dtype=info.dtype)
        assert out.is_contiguous() and out.dtype == info.dtype and list(out.shape) == local, (
            name,
            out.shape,
            local,
        )
        if out.numel() == 0:
            return out
        fd, base = self._file(info)
        item = info.dtype.itemsize
        outer = math.prod(shape[:dim]) if shape else 1
        inner = math.prod(shape[dim + 1 :]) * item if shape else item
        row = (shape[dim] if shape else 1) * inner  # bytes of one index of the dims before `dim`
        if outer == 1 or stop - start == (shape[dim] if shape else 1):
            self._pread(fd, out, base + start * inner, info)  # one contiguous range
            return out
        # strided (e.g. a column slice): whole rows through a bounded staging buffer
        rows_per_read = max(1, _STAGING_BYTES // row)
        if self._staging is None or self._staging.numel() < min(rows_per_read, outer) * row:
            self._staging = torch.empty(min(rows_per_read, outer) * row, dtype=torch.uint8)
        dst = out.view(torch.uint8).view(outer, (stop - start) * inner)
        for r0 in range(0, outer, rows_per_read):
            r1 = min(outer, r0 + rows_per_read)
            buf = self._staging[: (r1 - r0) * row]
            self._pread(fd, buf, base + r0 * row, info)
            dst[r0:r1].copy_(buf.view(r1 - r0, row)[:, start * inner : stop * inner])
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._staging = None

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- where each local tensor comes from -------------------------------------------------------------
def local_targets(
    local_sd: dict[str, torch.Tensor], slices: dict[str, ShardSlice], cfg: GLM5Config
) -> dict[str, tuple[torch.Tensor, ShardSlice | None]]:
    """Checkpoint (HF, global) name -> (local tensor to fill, slice of the checkpoint tensor or None = whole).

    Fused local experts [E_local, ...] whose slice starts at expert e0 become the per-expert checkpoint
    tensors `experts.{e0 + j}.{gate,up,down}_proj.weight[_scale_inv]`, each read whole."""
    out: dict[str, tuple[torch.Tensor, ShardSlice | None]] = {}
    for name, tensor in local_sd.items():
        spec = slices.get(name)
        hf = internal_to_hf_name(name, cfg)
        m = _FUSED.match(hf)
        if m is None:
            out[hf] = (tensor, spec)
            continue
        if spec is not None and spec.dim != 0:
            raise ValueError(f"{name}: fused experts are divided along dim 0 (experts), not dim {spec.dim}")
        e0 = 0 if spec is None else spec.start
        per_expert = to_hf_state_dict({name: tensor}, cfg)  # views named by local expert index
        prefix = f"{m.group(1)}."
        for key, view in per_expert.items():
            local_e, rest = key[len(prefix) :].split(".", 1)
            out[f"{prefix}{e0 + int(local_e)}.{rest}"] = (view, None)
    return out


# --- loading --------------------------------------------------------------------------------------
def load_pretrained_sharded(
    path: str | os.PathLike,
    build: Callable[[GLM5Config], nn.Module],
    shard: Callable[[nn.Module], dict[str, ShardSlice]],
    *,
    check: Callable[[GLM5Config], None] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    fp8: str = "dequantize",
    prepare: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Like `load_pretrained`, for one process of a sharded model: reads only this process's slices.

    check(config): refuses a layout the model cannot take, before anything is built or read.
    shard(meta_model): swaps in the local modules on the meta device and returns the slices it keeps
      (internal names; tensors absent from it are replicated whole).
    Peak resident memory: the kept tensors, one staging buffer of at most a few MB, and for a converted
    tensor (dtype cast, FP8 (de)quantisation) one temporary copy of its slice.
    """
    folder, cfg = open_checkpoint(path, fp8, prepare)
    if check is not None:
        check(cfg)
    # validated against the global model
    model, reads = build_and_match(folder, cfg, build, dtype, fp8, prepare)

    slices = shard(model)
    materialize(model, device)
    targets = local_targets(model.state_dict(keep_vars=True), slices, cfg)
    with torch.no_grad(), RangeReader(folder) as reader:
        for r in reads:
            if r.name in targets:
                _read_one(folder, reader, r, targets)
    _reset_non_persistent_buffers(model)
    if not any(t.dtype == fp8_format.FP8_DTYPE for t in model.state_dict().values()):
        cfg.extra.pop("quantization_config", None)
    return model.eval()


def _scale_slice(folder: CheckpointFolder, weight: str, spec: ShardSlice | None) -> ShardSlice | None:
    """The scale blocks of a block-aligned weight slice (2-D weights: the slice dim is a block dim)."""
    if spec is None:
        return None
    return spec.blocks(folder.tensors[weight].shape[spec.dim])


def _read_one(folder: CheckpointFolder, reader: RangeReader, r: _Read, targets) -> None:
    target, spec = targets[r.name]
    info = folder.tensors[r.name]
    if r.name.endswith(fp8_format.SCALE_SUFFIX):  # an e4m3 weight's scale, copied as it is (fp8="keep")
        weight = r.name.removesuffix(fp8_format.SCALE_SUFFIX)
        spec = _scale_slice(folder, weight, targets[weight][1])
    if spec is not None and target.dtype == fp8_format.FP8_DTYPE:  # kept e4m3: whole blocks only
        problem = check_block_aligned(r.name, spec, info.shape[spec.dim])
        if problem:
            raise CheckpointError(
                f"{os.path.join(folder.path, info.file)}: {problem}; load with fp8='dequantize'"
            )
    if r.scale is not None:  # e4m3 -> float: dequantise the covering blocks, then cut the slice out
        cover = None
        if spec is not None:
            b, size = fp8_format.FP8_BLOCK, info.shape[spec.dim]
            cover = ShardSlice(
                spec.dim, spec.start // b * b, min(size, math.ceil(min(spec.stop, size) / b) * b)
            )
        q = reader.read(r.name, cover)
        s = reader.read(r.scale, None if spec is None else spec.blocks(info.shape[spec.dim]))
        tensor = fp8_format.dequantize(q, s, target.dtype)
        if spec is not None:
            tensor = tensor.narrow(
                spec.dim, spec.start - cover.start, min(spec.stop, info.shape[spec.dim]) - spec.start
            )
        _copy(target, tensor, spec)
        return
    if r.quantize_into is not None:  # float -> e4m3 (block-aligned slice: same blocks as the whole tensor)
        tensor, scale = fp8_format.quantize(reader.read(r.name, spec))
        targets[r.quantize_into][0].copy_(scale)
        _copy(target, tensor, spec)
        return
    direct = target.device.type == "cpu" and target.dtype == info.dtype and target.is_contiguous()
    if direct and (spec is None or spec.stop <= info.shape[spec.dim]):
        reader.read(r.name, spec, out=target)
    else:
        _copy(target, reader.read(r.name, spec), spec)


def _copy(target: torch.Tensor, tensor: torch.Tensor, spec: ShardSlice | None) -> None:
    """target <- tensor (cast, moved); local rows past the end of the global tensor (padding) become 0."""
    if spec is None or tensor.shape[spec.dim] == target.shape[spec.dim]:
        target.copy_(tensor)
        return
    n = tensor.shape[spec.dim]
    target.narrow(spec.dim, 0, n).copy_(tensor)
    target.narrow(spec.dim, n, target.shape[spec.dim] - n).zero_()
