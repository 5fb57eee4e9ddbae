"""`WeightTransport`: how versioned weights travel from trainer to rollout engines (docs/rl.md § Weight transports).

Three implementations behind one interface, `publish(state_dict, version)` on the trainer side and
`fetch(version=None) -> (state_dict, version)` on the engine side (None = the newest):

- `ObjectStoreTransport`: the state dict is put once into the Ray object store (or, without Ray, kept in
  memory) and registered under its version; the last `keep` versions stay available (pi_old recomputation).
- `DiskTransport`: a safetensors file per version plus an atomic `version` file (temp + rename), for engines
  outside the cluster; a reader never sees a half-written version.
- `CollectiveTransport`: a torch.distributed broadcast from the trainer rank to every engine rank (gloo on
  CPU, NCCL on GPU): a metadata header (version, names, shapes, dtypes) then flat buckets in a fixed order.

`state_hash` fingerprints a state dict so tests (and users) can check that engines hold the trainer's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


def state_hash(state: StateDict) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cpu(state: StateDict) -> StateDict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


class WeightTransport(Protocol):
    def publish(self, state: StateDict, version: int) -> Any: ...

    def fetch(self, version: int | None = None) -> tuple[StateDict, int]: ...

    @property
    def latest(self) -> int | None: ...


class ObjectStoreTransport:
    """Versions in the Ray object store (`use_ray`) or in process memory; keeps the newest `keep`."""

    def __init__(self, keep: int = 2, use_ray: bool | None = None) -> None:
        if use_ray is None:
            try:
                import ray  # lazy: optional dependency

                use_ray = ray.is_initialized()
            except ImportError:
                use_ray = False
        self.keep, self.use_ray = keep, use_ray
        self.versions: OrderedDict[int, Any] = OrderedDict()

    def publish(self, state: StateDict, version: int) -> Any:
        if self.use_ray:
            import ray  # lazy: optional dependency

            # an ObjectRef (e.g. a trainer actor's weights() call) is registered as is: no copy via the driver
            ref = state if isinstance(state, ray.ObjectRef) else ray.put(_cpu(state))
        else:
            ref = _cpu(state)
        self.versions[int(version)] = ref
        while len(self.versions) > self.keep:
            self.versions.popitem(last=False)
        return ref

    @property
    def latest(self) -> int | None:
        return next(reversed(self.versions)) if self.versions else None

    def fetch(self, version: int | None = None) -> tuple[StateDict, int]:
        version = self.latest if version is None else version
        if version not in self.versions:
            raise KeyError(f"weight version {version} is not held (have {list(self.versions)})")
        return self.resolve(self.versions[version]), version

    def resolve(self, ref: Any) -> StateDict:
        if self.use_ray:
            import ray  # lazy: optional dependency

            state = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            return {
                k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v.copy()) for k, v in state.items()
            }
        return ref


class DiskTransport:
    """`weights-NNNNNNN.safetensors` + an atomically replaced `version` file naming the newest."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder, self.keep = Path(folder), keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, version: int) -> Path:
        return self.folder / f"weights-{version:07d}.safetensors"

    def publish(self, state: StateDict, version: int) -> Path:

        final = self._file(version)
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(_cpu(state), str(tmp), metadata={"version": str(version)})
        os.replace(tmp, final)
        pointer = self.folder / ".version.tmp"
        pointer.write_text(json.dumps({"version": version, "file": final.name, "sha256": state_hash(state)}))
        os.replace(pointer, self.folder / "version")
        for old in sorted(self.folder.glob("weights-*.safetensors"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    @property
    def latest(self) -> int | None:
        path = self.folder / "version"
        return json.loads(path.read_text())["version"] if path.is_file() else None

    def fetch(self, version: int | None = None) -> tuple[StateDict, int]:

        version = self.latest if version is None else version
        if version is None or not self._file(version).is_file():
            raise KeyError(f"no weights of version {version} under {self.folder}")
        return load_file(str(self._file(version))), version


class CollectiveTransport:
    """Broadcast over a torch.distributed group: `src` publishes, every other rank fetches (same order of
    calls on every rank). Buckets of at most `bucket_bytes` per dtype; the header carries the version."""

    def __init__(self, group: Any = None, src: int = 0, bucket_bytes: int = 32 << 20) -> None:

        if not dist.is_initialized():
            raise ValueError("CollectiveTransport needs torch.distributed initialised (init_process_group)")
        self.group, self.src, self.bucket_bytes = group, src, bucket_bytes
        self._latest: int | None = None

    @property
    def latest(self) -> int | None:
        return self._latest

    def _buckets(self, meta: list[tuple[str, list[int], str]]) -> list[list[int]]:
        out: list[list[int]] = []
        size = 0
        for i, (_, shape, dtype) in enumerate(meta):
            nbytes = int(torch.tensor([], dtype=getattr(torch, dtype)).element_size() * max(1, _numel(shape)))
            same = out and meta[out[-1][0]][2] == dtype
            if not out or not same or size + nbytes > self.bucket_bytes:
                out.append([])
                size = 0
            out[-1].append(i)
            size += nbytes
        return out

    def _exchange(self, state: StateDict | None, version: int | None) -> tuple[StateDict, int]:

        header: list[Any] = [None]
        if state is not None:
            names = sorted(state)
            header = [
                (version, [(n, list(state[n].shape), str(state[n].dtype).split(".")[-1]) for n in names])
            ]
        dist.broadcast_object_list(header, src=self.src, group=self.group)
        version, meta = header[0]
        out: StateDict = {}
        for bucket in self._buckets(meta):
            dtype = getattr(torch, meta[bucket[0]][2])
            if state is not None:
                flat = torch.cat([state[meta[i][0]].detach().to("cpu").reshape(-1).to(dtype) for i in bucket])
            else:
                flat = torch.empty(sum(_numel(meta[i][1]) for i in bucket), dtype=dtype)
            dist.broadcast(flat, src=self.src, group=self.group)
            offset = 0
            for i in bucket:
                name, shape, _ = meta[i]
                n = _numel(shape)
                out[name] = flat[offset : offset + n].view(shape).clone()
                offset += n
        self._latest = version
        return out, version

    def publish(self, state: StateDict, version: int) -> None:
        self._exchange(state, version)

    def fetch(self, version: int | None = None) -> tuple[StateDict, int]:
        state, got = self._exchange(None, None)
        if version is not None and got != version:
            raise RuntimeError(f"expected weight version {version}, the trainer sent {got}")
        return state, got


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_transport(kind: str, **options: Any) -> Any:
    """ "object_store" | "disk" (folder=...) | "collective" (group=..., src=...)."""
    kinds = {"object_store": ObjectStoreTransport, "disk": DiskTransport, "collective": CollectiveTransport}
    if kind not in kinds:
        raise ValueError(f"unknown weight transport {kind!r}; choose one of {', '.join(kinds)}")
    return kinds[kind](**options)
