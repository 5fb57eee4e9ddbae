"""Resumable training checkpoints: model (MoE router biases included), optimizer, trainer state (step, data
cursor, planned length) and every process's RNG, written atomically.

A checkpoint is a folder `step-NNNNNNN/` written as `.step-NNNNNNN.tmp/` and renamed into place only when
complete; the file `latest` (replaced atomically) names the newest one. A process killed in the middle of a
save leaves a temp folder that is ignored and later removed, so the previous checkpoint stays usable.
Tensors go through torch.distributed.checkpoint (DCP): every process writes its own shards (FSDP or
expert-parallel DTensors), and the same code saves a single-process run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LATEST = "latest"
TRAINER_FILE = "trainer.json"


def _distributed() -> bool:
    """A process group of a distributed run exists (not the one a multi-process inference engine in this process
    formed for its ranks, e.g. an RL rollout engine: glm5/engine/multiproc.py)."""
    engine = sys.modules.get("glm5.engine.multiproc")
    return dist.is_initialized() and not (engine is not None and engine.owns_default_group())


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _no_dist() -> bool:
    return not _distributed()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch CPU + accelerator, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(s if not isinstance(s, list) else tuple(s) for s in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place, then point `latest` at it (each step atomic)."""
    if final.exists():  # re-saving the same step (e.g. the end of a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json_atomic(final.parent / LATEST, {"checkpoint": final.name})


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_FILE).is_file() and (path / ".metadata").is_file()


def save_checkpoint(
    folder: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `folder` (every process calls this); returns its path."""
    folder = Path(folder)
    final, tmp = folder / f"step-{step:07d}", folder / f".step-{step:07d}.tmp"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=_no_dist())
    torch.save(rng_state(), tmp / f"rng-{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        _write_json_atomic(tmp / TRAINER_FILE, {"step": step, **trainer})
        _publish(tmp, final)
        _prune(folder, keep)
    _barrier()
    return final


def _prune(folder: Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints, and stale temp folders."""
    done = sorted(p for p in folder.glob("step-*") if _complete(p))
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one; None when there is none."""
    folder = Path(folder)
    try:
        named = folder / json.loads((folder / LATEST).read_text())["checkpoint"]
        if _complete(named):
            return named
    except (OSError, ValueError, KeyError):
        pass
    done = sorted(p for p in folder.glob("step-*") if _complete(p))
    return done[-1] if done else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this process's RNG from `path`; returns the trainer state."""
    path = Path(path)
    if not _complete(path):
        raise ValueError(f"{path} is not a complete training checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=_no_dist())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / TRAINER_FILE).read_text())
