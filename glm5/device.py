"""Hardware backends in one place: pick a device, its dtypes, autocast, synchronisation and memory stats.

This is the only glm5 module that names vendors (CUDA/ROCm `cuda`, Ascend `npu` through the optional
`torch_npu` plug-in, Intel `xpu`, Apple `mps`, `cpu`); everything else asks these functions.

Dtypes on CPU: float32 is the default. bfloat16 and float16 work everywhere, but their matmuls are only fast
on CPUs with AVX512-BF16/AMX; on an AVX2 server (torch 2.13) both ran ~10x slower than float32 in a
linear layer. float16 is listed last of the compute dtypes on CPU because nothing in glm5 needs it there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import sys
import time
import warnings
from types import ModuleType
from typing import Any

import torch

DEVICE_TYPES = ("cuda", "npu", "xpu", "mps", "cpu")
"""Device types in the order `pick_device` tries them."""

DeviceLike = torch.device | str


@functools.cache
def _npu_module() -> ModuleType | None:
    """`torch.npu` once the Ascend plug-in `torch_npu` is imported, or None when it is not installed."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        import torch_npu  # noqa: F401  # lazy: optional dependency (registers torch.npu and the "npu" device type)
    except Exception as e:  # a broken vendor install must not stop CPU/CUDA users
        warnings.warn(
            f"torch_npu is installed but failed to import ({e}); Ascend NPUs are ignored", stacklevel=2
        )
        return None
    return getattr(torch, "npu", None)


def _backend(device_type: str) -> Any:
    """The torch submodule driving `device_type` (torch.cuda, torch.npu, torch.xpu, torch.mps), or None."""
    if device_type == "npu":
        return _npu_module()
    return getattr(torch, device_type, None) if device_type in ("cuda", "xpu", "mps") else None


def is_available(device_type: str) -> bool:
    """Whether this process can run on `device_type` ("cuda", "npu", "xpu", "mps" or "cpu")."""
    if device_type == "cpu":
        return True
    if device_type == "mps":
        return torch.backends.mps.is_available()
    backend = _backend(device_type)
    return backend is not None and hasattr(backend, "is_available") and bool(backend.is_available())


def available_device_types() -> list[str]:
    """The device types usable here, in `pick_device` order (always ends with "cpu")."""
    return [t for t in DEVICE_TYPES if is_available(t)]


def _device_count(device_type: str) -> int:
    if device_type in ("cpu", "mps"):
        return 1
    return int(_backend(device_type).device_count())


_INSTALL_HINT = {
    "cuda": "a CUDA (or ROCm) build of PyTorch and a visible GPU",
    "npu": "the Ascend plug-in torch_npu and a visible NPU",
    "xpu": "a PyTorch build with Intel XPU support",
    "mps": "PyTorch on macOS 12.3+ with Apple silicon",
}


def _parse(spec: DeviceLike) -> torch.device:
    """Parse "cuda:1", "npu", torch.device("cpu"), ... into an available device, or raise ValueError why."""
    name = str(spec)
    device_type, _, index_text = name.strip().lower().partition(":")
    if device_type not in DEVICE_TYPES or (index_text and not index_text.isdigit()):
        choices = ", ".join(DEVICE_TYPES)
        raise ValueError(f"unknown device {name!r}; use one of {choices}, optionally with an index (cuda:1)")
    if not is_available(device_type):
        available = ", ".join(available_device_types())
        raise ValueError(
            f"device {name!r} is not available here (available: {available}); "
            f"it needs {_INSTALL_HINT[device_type]}, or choose an available device"
        )
    if index_text:
        index, count = int(index_text), _device_count(device_type)
        if index >= count:
            raise ValueError(
                f"device {name!r}: this machine has {count} {device_type} device(s), 0..{count - 1}"
            )
        return torch.device(device_type, index)
    return torch.device(device_type)


def pick_device(prefer: DeviceLike | None = None) -> torch.device:
    """The device to run on: `prefer` if given (ValueError if unavailable), else the first available of
    cuda, npu, xpu, mps, cpu."""
    if prefer is not None:
        return _parse(prefer)
    return torch.device(available_device_types()[0])


def _as_device(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device) and device.type in ("cpu", "meta"):
        return device
    return _parse(device)


@functools.cache
def _fp8_matmul_works(device: str) -> bool:
    """Whether a scaled e4m3 GEMM (`torch._scaled_mm`) runs on `device`; probed once with 16x16 inputs.

    That is what "usable" means for FP8 here: as a storage format (dequantise to BF16 on load) FP8 works on
    every device. NVIDIA needs sm_89+ (Ada, Hopper, Blackwell), AMD MI300-class; recent CPU builds have one.
    """
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except Exception:  # no kernel for this device or architecture (RuntimeError, NotImplementedError, ...)
        return False


def _bf16_works(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    backend = _backend(device.type)
    if backend is not None and hasattr(backend, "is_bf16_supported"):
        return bool(backend.is_bf16_supported())
    try:  # MPS supports bf16 from macOS 14; older systems raise on allocation
        torch.zeros(1, dtype=torch.bfloat16, device=device)
        return True
    except Exception:
        return False


def supported_dtypes(device: DeviceLike) -> list[torch.dtype]:
    """Dtypes glm5 can compute in on `device`, most preferred first (`default_dtype` is the first), then
    torch.float8_e4m3fn where an FP8 GEMM runs (see `_fp8_matmul_works`)."""
    device = _as_device(device)
    if device.type == "meta":
        return [torch.float32, torch.bfloat16, torch.float16]
    if device.type == "cpu":
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    else:
        dtypes = ([torch.bfloat16] if _bf16_works(device) else []) + [torch.float16, torch.float32]
    if _fp8_matmul_works(str(device)):
        dtypes.append(torch.float8_e4m3fn)
    return dtypes


def default_dtype(device: DeviceLike) -> torch.dtype:
    """bfloat16 on accelerators that support it (else float16), float32 on CPU."""
    return supported_dtypes(device)[0]


def autocast(device: DeviceLike, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for `device`: torch.autocast for bf16/fp16, a no-op for fp32.

    float8 is a weight format (block-scaled GEMMs), not an autocast dtype, so it is refused.
    """
    device = _as_device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast runs in bfloat16 or float16 (or float32 = off), not {dtype}")
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: DeviceLike) -> None:
    """Wait for all queued work on `device` (for timing); nothing to wait for on CPU."""
    device = _as_device(device)
    if device.type == "mps":
        torch.mps.synchronize()
    elif device.type in ("cuda", "npu", "xpu"):
        _backend(device.type).synchronize(device)


def device_name(device: DeviceLike) -> str:
    """A human-readable name: "NVIDIA H200", "Ascend910B3", "AMD EPYC 7763 64-Core Processor", ..."""
    device = _as_device(device)
    if device.type in ("cuda", "npu", "xpu"):
        index = device.index if device.index is not None else _backend(device.type).current_device()
        return str(_backend(device.type).get_device_name(index))
    if device.type == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    return _cpu_name()


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _cpu_max_rss_bytes() -> int:
    try:
        import resource  # lazy: platform-specific
    except ImportError:  # Windows has no getrusage
        return 0
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024  # Linux reports KiB, macOS bytes


def peak_memory_bytes(device: DeviceLike) -> int:
    """Peak memory since the last `reset_peak_memory`.

    CUDA/NPU/XPU: the caching allocator's peak of allocated tensor bytes on that device. MPS has no peak
    counter: this is the memory the Metal driver holds now. CPU: the process's maximum resident set size
    (getrusage), a process-wide high-water mark since start that `reset_peak_memory` cannot lower; 0 on
    Windows.
    """
    device = _as_device(device)
    if device.type in ("cuda", "npu", "xpu"):
        return int(_backend(device.type).max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    return _cpu_max_rss_bytes()


def reset_peak_memory(device: DeviceLike) -> None:
    """Start a new peak for `peak_memory_bytes` (a no-op on CPU and MPS, which have no resettable peak)."""
    device = _as_device(device)
    if device.type in ("cuda", "npu", "xpu"):
        _backend(device.type).reset_peak_memory_stats(device)


@functools.cache
def has_grouped_mm(device: DeviceLike) -> bool:
    """Whether `torch._grouped_mm` runs as one fused kernel on `device` (NVIDIA sm_90+, bf16).

    Elsewhere glm5's MoE falls back to one GEMM per expert (see `glm5.kernels.grouped_mm`).
    """
    device = _as_device(device)
    return (
        device.type == "cuda"
        and hasattr(torch, "_grouped_mm")
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


DIST_BACKENDS = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "cpu": "gloo", "mps": "gloo"}
"""torch.distributed backend per device type (multi-process inference: glm5.engine.multiproc)."""


def dist_backend(device: DeviceLike) -> str:
    """The collective backend for tensors on `device`: nccl (CUDA/ROCm), hccl (Ascend), xccl (Intel XPU), gloo (CPU)."""
    kind = device if isinstance(device, str) and ":" not in device else _as_device(device).type
    return DIST_BACKENDS.get(kind, "gloo")


# --- the training dtype: bf16 autocast where it is faster, fp32 elsewhere ----------------------------------------
TRAIN_DTYPES = ("auto", "float32", "bfloat16")
"""Values of `glm5 train --dtype`, the recipe's `dtype` field and the GLM5_TRAIN_DTYPE variable."""
TRAIN_DTYPE_ENV = "GLM5_TRAIN_DTYPE"
"""Environment variable that sets the training dtype when the recipe says "auto" (float32 or bfloat16)."""
BF16_MIN_SPEEDUP = 1.25
"""bf16 autocast is chosen on a CPU when the probe's bf16 step is at least this much faster than fp32 (a margin
for the casts and the ops autocast leaves in fp32, which the probe does not see)."""
PROBE_SHAPE = (2048, 256, 512)
"""(tokens, in features, out features) of the probe's linear layer: a training micro-batch of a small model."""
SCREEN_SHAPE = (256, 128, 256)
"""A cheap first look: where bf16 has no fast kernels (AVX2: ~100x slower) the probe stops here."""


def _linear_step_seconds(
    device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], reps: int
) -> float:
    """Best time of a linear layer's forward + backward under `autocast(device, dtype)` (fp32 weights): on a CPU
    the process's CPU time (a machine shared with other work slows the wall clock, not that), elsewhere wall time."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    tokens, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=gen).to(device).requires_grad_()
    w = torch.randn(n, k, generator=gen).to(device).requires_grad_()
    best = float("inf")
    for _ in range(reps + 1):  # the first run allocates and picks kernels: not timed
        synchronize(device)
        start = clock()
        with autocast(device, dtype):
            y = torch.nn.functional.linear(x, w)
        y.float().sum().backward()
        synchronize(device)
        best = min(best, clock() - start)
        x.grad = w.grad = None
    return best


@functools.cache
def bf16_probe(device: str = "cpu") -> tuple[float, float]:
    """(fp32 seconds, bf16 seconds) of a training-like linear step on `device`, measured once per process.

    On a CPU it runs on one thread and counts CPU time, so the ratio is the kernels' and not the machine's load.
    A screen at SCREEN_SHAPE first: when bf16 is over 2x slower there (no bf16 kernels), the full probe is
    skipped and the screen's times returned. ~0.2 s in all.
    """
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # one thread: the kernels' speed ratio, free of OpenMP waits on a busy machine
        torch.set_num_threads(1)
    try:
        fp32 = _linear_step_seconds(dev, torch.float32, SCREEN_SHAPE, 1)
        bf16 = _linear_step_seconds(dev, torch.bfloat16, SCREEN_SHAPE, 1)
        if bf16 > 2 * fp32:
            return fp32, bf16
        fp32 = bf16 = float("inf")
        for _ in range(3):  # interleaved
            fp32 = min(fp32, _linear_step_seconds(dev, torch.float32, PROBE_SHAPE, 1))
            bf16 = min(bf16, _linear_step_seconds(dev, torch.bfloat16, PROBE_SHAPE, 1))
        return fp32, bf16
    finally:
        torch.set_num_threads(threads)


def choose_train_dtype(
    device_type: str, bf16_supported: bool, probe: tuple[float, float] | None
) -> tuple[torch.dtype, str]:
    """The "auto" training dtype and why: bf16 autocast on accelerators that support it (no probe needed);
    on a CPU bf16 when `probe` = (fp32 s, bf16 s) shows it at least BF16_MIN_SPEEDUP x faster; else fp32."""
    if not bf16_supported:
        return torch.float32, f"{device_type} has no bfloat16 support"
    if device_type != "cpu":
        return torch.bfloat16, f"{device_type} supports bfloat16"
    if probe is None:
        return torch.float32, "no probe"
    fp32, bf16 = probe
    speedup = fp32 / bf16 if bf16 > 0 else 0.0
    if speedup >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"probe: bf16 matmuls {speedup:.1f}x faster than fp32"
    return torch.float32, f"probe: bf16 matmuls {speedup:.2f}x the speed of fp32 (< {BF16_MIN_SPEEDUP}x)"


def train_dtype(device: DeviceLike, requested: str = "auto") -> tuple[torch.dtype, str]:
    """The compute dtype a training run uses on `device` and why (printed at start, kept in the summary).

    requested: "float32" or "bfloat16" are taken as they are; "auto" reads GLM5_TRAIN_DTYPE, then decides with
    `choose_train_dtype` (on a CPU by `bf16_probe`, cached per process). Weights and optimiser state stay fp32
    either way; bfloat16 means autocast around the forward.
    """
    device = _as_device(device)
    if requested == "auto":
        env = os.environ.get(TRAIN_DTYPE_ENV, "").strip().lower()
        if env and env not in TRAIN_DTYPES:
            raise ValueError(f"{TRAIN_DTYPE_ENV}={env!r}: use one of {', '.join(TRAIN_DTYPES)}")
        if env and env != "auto":
            return getattr(torch, env), f"{TRAIN_DTYPE_ENV}={env}"
    elif requested in TRAIN_DTYPES:
        return getattr(torch, requested), "asked for"
    else:
        raise ValueError(f"training dtype {requested!r}: use one of {', '.join(TRAIN_DTYPES)}")
    supported = device.type == "cpu" or torch.bfloat16 in supported_dtypes(device)
    probe = bf16_probe(str(device)) if device.type == "cpu" else None
    return choose_train_dtype(device.type, supported, probe)
