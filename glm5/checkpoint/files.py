"""Safetensors checkpoint folders: read the index and shard headers, stream tensors, write shards atomically.

A folder holds `config.json` and either one `model.safetensors` or `model.safetensors.index.json` plus the
shards it names (the Hugging Face layout). Reading never unpickles: safetensors files are a JSON header and
raw bytes, opened memory-mapped one shard at a time. Every problem with the files raises `CheckpointError`
(a ValueError) naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file that glm5 cannot read: the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a shard header describes it (nothing read yet)."""

    name: str
    file: str
    """Shard file name inside the folder."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def release_free_memory() -> None:
    """Hand the memory freed so far back to the OS: the heap (glibc's malloc_trim; a no-op elsewhere; loading
    frees many tensor-sized temporaries that glibc would otherwise keep in its arenas, counted in the process's
    RSS), and the pages of live shard mappings read so far (madvise MADV_PAGEOUT, Linux 5.4+: a mapping lives as
    long as any tensor viewing it, and the pages a conversion read of a since-freed tensor would stay resident;
    clean file pages are dropped and read again on use, pages written in the process are kept)."""
    global _LIBC
    for ref in list(_LIVE_MAPS):
        live = ref()
        if live is None:
            _LIVE_MAPS.remove(ref)
            continue
        try:
            live.madvise(_MADV_PAGEOUT)
        except (OSError, ValueError, AttributeError):
            pass
    if _LIBC is None:
        import ctypes  # lazy: platform-specific
        import ctypes.util  # lazy: platform-specific

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)
_LIVE_MAPS: list[weakref.ref] = []
"""The shard mappings handed out by ShardReader.mapped (weak: a mapping closes with its last tensor)."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the config.json spelling)."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' (10^9), '500MB', '2GiB' (2^30), '100KB'."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {size!r}; write e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _open(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt"
        ) from None


class CheckpointFolder:
    """The tensors of a checkpoint folder, from its index and shard headers (validated on construction)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: no such checkpoint folder")
        self.config = self._read_json(CONFIG_FILE, what="config.json")
        self.index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(self.index_path):
            index = self._read_json(INDEX_FILE, what="the index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{self.index_path}: 'weight_map' must map tensor names to shard files")
            self.metadata: dict[str, Any] = index.get("metadata") or {}
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            weight_map, self.metadata = None, {}
        else:
            raise CheckpointError(
                f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}; not a safetensors checkpoint folder"
            )
        self.tensors: dict[str, TensorInfo] = self._read_headers(weight_map)

    def _read_json(self, name: str, what: str) -> dict[str, Any]:
        path = os.path.join(self.path, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing ({what} of the checkpoint)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: must hold a JSON object")
        return data

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = os.path.join(self.path, file)
            if os.path.basename(file) != file:
                raise CheckpointError(
                    f"{self.index_path}: shard {file!r} must be a file name inside the folder"
                )
            if not os.path.exists(path):
                first = next(k for k, v in (weight_map or {}).items() if v == file)
                raise CheckpointError(
                    f"{path}: shard file is missing (the index puts tensor {first!r} there)"
                )
            with _open(path) as f:
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != file:
                        continue  # the index is the authority on where a tensor lives
                    sl = f.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(
                            f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}"
                        )
                    tensors[name] = TensorInfo(name, file, tuple(sl.get_shape()), dtype)
        for name, file in (weight_map or {}).items():
            if name not in tensors:
                raise CheckpointError(
                    f"{os.path.join(self.path, file)}: tensor {name!r} is listed in {INDEX_FILE} "
                    "but absent from the shard"
                )
        return tensors

    @property
    def files(self) -> list[str]:
        return sorted({t.file for t in self.tensors.values()})

    def by_file(self) -> Iterator[tuple[str, list[TensorInfo]]]:
        """(shard, its tensors in header order) for every shard, in file-name order."""
        for file in self.files:
            yield file, [t for t in self.tensors.values() if t.file == file]

    def reader(self) -> ShardReader:
        return ShardReader(self)


class ShardReader:
    """Reads tensors, keeping at most `max_open` shards open at a time. Use as a context manager.

    An open shard is memory-mapped, and the pages read so far count toward the process's resident memory
    until it is closed; reading in file order with one shard open bounds that to one shard.
    """

    def __init__(self, folder: CheckpointFolder, max_open: int = 1) -> None:
        self.folder = folder
        self.max_open = max_open
        self._open: dict[str, Any] = {}
        self._maps: dict[str, _MappedShard] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.folder.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder.path}: no tensor {name!r} in the checkpoint")
        handle = self._open.pop(info.file, None)
        if handle is None:
            if len(self._open) >= self.max_open:
                oldest = next(iter(self._open))
                self._open.pop(oldest).__exit__(None, None, None)
            handle = _open(os.path.join(self.folder.path, info.file)).__enter__()
        self._open[info.file] = handle  # most recently used last
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{os.path.join(self.folder.path, info.file)}: cannot read tensor {name!r} ({e})"
            ) from None

    def mapped(self, name: str) -> torch.Tensor | None:
        """Tensor `name` as a view of its shard, memory-mapped copy-on-write (no bytes read or copied), or None
        where its bytes are not aligned to its dtype (then `get` copies it).

        The mapping is private: writing into the tensor (an optimizer step, `update_weights`) copies the touched
        pages into process memory and never reaches the file. The view keeps the mapping alive for as long as it
        lives; the file's descriptor is closed at once (an unlinked or replaced file stays readable: checkpoints
        are written to a new folder and renamed into place, never rewritten in place)."""
        info = self.folder.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder.path}: no tensor {name!r} in the checkpoint")
        shard = self._maps.get(info.file)
        if shard is None:
            shard = self._maps[info.file] = _MappedShard(os.path.join(self.folder.path, info.file))
        return shard.tensor(info)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()
        self._maps.clear()  # the views handed out keep their mappings alive

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MappedShard:
    """One shard file mapped copy-on-write (MAP_PRIVATE), its header's tensor offsets read from the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            _LIVE_MAPS.append(weakref.ref(self.map))
        except (OSError, ValueError) as e:  # validated when the folder was opened: the file changed since
            raise CheckpointError(
                f"{path}: cannot map the shard ({e}); the file is truncated or corrupt"
            ) from None
        self.start = 8 + n
        self.offsets = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}

    def tensor(self, info: TensorInfo) -> torch.Tensor | None:
        begin, end = self.offsets[info.name]
        offset = self.start + begin
        if end - begin != info.nbytes or offset + info.nbytes > len(self.map):
            raise CheckpointError(f"{self.path}: tensor {info.name!r} lies outside the file; it is truncated")
        if offset % info.dtype.itemsize or info.nbytes == 0:
            return None
        flat = torch.frombuffer(self.map, dtype=torch.uint8, count=info.nbytes, offset=offset)
        return flat.view(info.dtype).view(info.shape)


# --- writing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype, and how to produce its values when its shard is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving: start a new shard when the next tensor would pass the limit (a tensor larger
    than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_checkpoint(
    path: str | os.PathLike,
    config: dict[str, Any],
    specs: Iterable[TensorSpec],
    max_shard_size: int | str = "5GB",
    progress: Callable[[int, int], None] | None = None,
    keep_files_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write config.json and the tensors as size-limited shards (+ index), atomically. Returns the index.

    Everything is written into a fresh temporary folder next to `path`, which then replaces `path` by a
    rename, so a crash never leaves a half-written folder that looks complete. Entries of an existing `path`
    that are not checkpoint files (tokenizer, generation config, ...) are kept; with `keep_files_from`,
    those of another folder are copied in as well (convert copies the source's tokenizer this way).
    `progress(tensors, bytes)` is called after each tensor.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder")
    specs = list(specs)
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("duplicate tensor names in the checkpoint to write")
    shards = plan_shards(specs, parse_size(max_shard_size))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        index = _write_shards(tmp, shards, progress)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if keep_files_from is not None:
            _copy_other_files(os.fspath(keep_files_from), tmp)
        _fsync_dir(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_shards(folder: str, shards: list[list[TensorSpec]], progress) -> dict[str, Any]:
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards):
        tensors: dict[str, torch.Tensor] = {}
        for spec in shard:
            t = spec.produce()
            assert tuple(t.shape) == spec.shape and t.dtype == spec.dtype, (spec.name, t.shape, t.dtype)
            tensors[spec.name] = t.contiguous()
            weight_map[spec.name] = file
            if progress is not None:
                progress(1, spec.nbytes)
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        with open(os.path.join(folder, file), "rb") as f:
            os.fsync(f.fileno())
        del tensors
    index = {
        "metadata": {"total_size": sum(s.nbytes for shard in shards for s in shard)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    if len(shards) > 1:
        with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return index


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in (INDEX_FILE, CONFIG_FILE)


def _other_files(folder: str, dest: str) -> list[str]:
    """Entries of `folder` that are not checkpoint files and that `dest` does not have."""
    return [
        n
        for n in os.listdir(folder)
        if not _is_checkpoint_file(n) and not os.path.exists(os.path.join(dest, n))
    ]


def _copy_other_files(source: str, dest: str) -> None:
    for name in _other_files(source, dest):
        src = os.path.join(source, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        else:
            shutil.copy2(src, os.path.join(dest, name))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: str, path: str) -> None:
    """Rename `tmp` to `path`. An existing `path` is renamed aside first; its entries that are not checkpoint
    files (tokenizer, README, ...) are then moved into the new folder and the rest (the old weights) deleted."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    os.rename(tmp, path)
    for name in _other_files(old, path):
        os.rename(os.path.join(old, name), os.path.join(path, name))
    shutil.rmtree(old, ignore_errors=True)
