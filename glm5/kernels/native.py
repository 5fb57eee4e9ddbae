"""The native decode-layer kernel (decode_layer.c): built with the system C compiler on first use, loaded with ctypes.

No Python headers and no torch extension machinery: `cc -O3 -march=native -fopenmp -shared` takes about a second
(OpenMP is dropped if the compiler lacks it; the OpenMP runtime is the one torch already loaded, so the kernel
splits its large products over torch.get_num_threads() threads), and the library is cached under
`$GLM5_CACHE_DIR` (default `~/.cache/glm5`) keyed by the source, the compiler flags and this CPU, so each machine
builds once. Without a compiler, on a failed build, or with `GLM5_NATIVE=0`, `load()` returns None (the reason is
in `load_error()`) and callers use their torch path.

The SIMD path follows the build target, so with the default `-march=native` it is chosen by the features of the
CPU the library loads on: AVX-512 (512-bit loads widening bf16 / e4m3 / int8 in registers), AVX2 + FMA + F16C, or
portable C. `isa()` names it and `describe()` gives the line the CLI prints at start. `GLM5_NATIVE_MARCH` picks
the target instead of `native` (read at the first `load()`, part of the cache key): e.g. `x86-64-v3` (AVX2),
`x86-64-v4` (AVX-512) or `x86-64` (portable), to build and test the code paths of another CPU family than the
one at hand, or a library for a fleet of mixed machines.

`Mat` and `LayerArgs` mirror the C structs (the contract is at the top of decode_layer.c and of
glm5/engine/fused.py); the library exports both sizes and the loader refuses a mismatch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("decode_layer.c")
FLAGS = ["-O3", "-fPIC", "-shared", "-std=c99", "-fno-math-errno", "-Werror=implicit-function-declaration"]
"""Compiler flags besides -march (see `compile_flags`)."""
MARCH_ENV = "GLM5_NATIVE_MARCH"


def march() -> str:
    """The -march the kernel is built for: `$GLM5_NATIVE_MARCH`, default `native` (this CPU's instruction set)."""
    value = os.environ.get(MARCH_ENV, "").strip() or "native"
    if not all(c.isalnum() or c in "-_.+" for c in value):
        raise RuntimeError(f"{MARCH_ENV}={value!r} is not a -march value (e.g. native, x86-64-v3, x86-64-v4)")
    return value


def compile_flags() -> list[str]:
    """Every compiler flag of a build (OpenMP aside): FLAGS with `-march=<march()>`."""
    return [*FLAGS, f"-march={march()}"]


_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


FORMATS = {"fp32": 0, "bf16": 1, "fp8": 2, "int8": 3}
"""Weight formats of a `Mat` (the C enum): fp32, bf16 bits, block-FP8 e4m3 with 128x128 scales, int8 with one
scale per group of 32 inputs."""


class Mat(ctypes.Structure):
    """Mirror of the C `Mat`: one weight matrix as the model stores it (see decode_layer.c's contract)."""

    _fields_ = [
        *[(n, _ptr) for n in "w scale bias".split()],
        *[(n, _i64) for n in "fmt rows cols split".split()],
        ("out_scale", _f32),
        ("pad_", ctypes.c_int32),
    ]


class LayerArgs(ctypes.Structure):
    """Mirror of the C `LayerArgs` (same field order and types)."""

    _fields_ = [
        *[(n, _i64) for n in "B D q_lora rank R H nope v Hi Di topk n_in n_q".split()],
        *[(n, _i64) for n in "has_indexer dsa rope_interleave idx_rope_interleave".split()],
        *[(n, _f32) for n in "in_eps q_eps kv_eps idx_ln_eps ffn_eps softmax_scale".split()],
        ("in_", Mat * 4),
        ("q", Mat * 2),
        ("kv_b", Mat),
        ("o", Mat),
        *[(n, _i64) for n in "n_in_mats n_q_mats".split()],
        *[(n, _ptr) for n in "in_norm_w q_norm_w kv_norm_w idx_ln_w idx_ln_b".split()],
        ("ffn", Mat * 3),
        ("down", Mat),
        ("n_ffn_mats", _i64),
        ("post_norm_w", _ptr),
        *[(n, _i64) for n in "ffn_inter is_moe E top_k n_group topk_group Fe norm_topk".split()],
        ("route_scale", _f32),
        ("e_bias", _ptr),
        ("gate_up", Mat),
        ("down_e", Mat),
        *[(n, _ptr) for n in "h cos sin".split()],
        ("rope_stride", _i64),
        *[(n, _ptr) for n in "kv_store idx_store write_slot gather".split()],
        ("gather_stride", _i64),
        *[(n, _ptr) for n in "lengths topk_idx topk_count".split()],
    ]


class DraftArgs(ctypes.Structure):
    """Mirror of the C `DraftArgs`: greedy MTP drafting in one call (decode_layer.c glm5_mtp_draft)."""

    _fields_ = [
        *[(n, _i64) for n in "steps B D V".split()],
        *[(n, _ptr) for n in "embed enorm_w hnorm_w head_norm_w".split()],
        *[(n, _f32) for n in "enorm_eps hnorm_eps head_norm_eps".split()],
        ("pad_", ctypes.c_int32),
        ("eh_proj", Mat),
        ("lm_head", Mat),
        *[(n, _ptr) for n in "h ids write_slot gather lengths cos sin".split()],
        ("T0", _i64),
        *[(n, _ptr) for n in "first_h first_ids".split()],
    ]


class StepArgs(ctypes.Structure):
    """Mirror of the C `StepArgs`: a decode step of several layers, then the final norm and head, in one call
    (decode_layer.c glm5_decode_step)."""

    _fields_ = [
        ("n_layers", _i64),
        *[(n, _ptr) for n in "layers kv_stores idx_stores".split()],
        ("B", _i64),
        *[(n, _ptr) for n in "h cos sin".split()],
        ("rope_stride", _i64),
        *[(n, _ptr) for n in "write_slot gather".split()],
        ("gather_stride", _i64),
        *[(n, _ptr) for n in "lengths topk_idx topk_count".split()],
        *[(n, _i64) for n in "dsa failed_layer".split()],
        ("norm_w", _ptr),
        ("norm_eps", _f32),
        ("pad_", ctypes.c_int32),
        ("lm_head", Mat),
        *[(n, _ptr) for n in "hidden logits".split()],
    ]


class GreedyArgs(ctypes.Structure):
    """Mirror of the C `GreedyArgs`: several greedy decode steps in one call (decode_layer.c glm5_decode_greedy)."""

    _fields_ = [
        *[(n, _i64) for n in "steps B".split()],
        *[(n, _ptr) for n in "embed first_ids ids write_slot gather lengths cos sin".split()],
    ]


ERRORS = {
    1: "out of memory for the kernel's scratch buffers",
    2: "more than 256 routed experts, 256 experts per token or 64 expert groups",
    3: "a layer that shares the top-k of a previous layer, but none selected it",
}

_lib: ctypes.CDLL | None = None
_error: str | None = None
_tried = False
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("GLM5_CACHE_DIR") or Path.home() / ".cache" / "glm5") / "kernels"


def _cpu_tag() -> str:
    """The CPU model and its feature flags: a `-march=native` build must not be reused on a CPU lacking some."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    seen: dict[str, str] = {}
    for ln in lines:
        key = ln.split(":", 1)[0].strip()
        if key in wanted and key not in seen:
            seen[key] = ln
    return "|".join([platform.machine(), platform.processor(), *(seen[k] for k in sorted(seen))])


def build(compiler: str | None = None) -> Path:
    """Compile decode_layer.c (or reuse the cached build) and return the library's path; raises on failure."""
    cc = (
        compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH; install one or set CC")
    source = SOURCE.read_bytes()
    flags = compile_flags()
    key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_tag()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"glm5_decode_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in (["-fopenmp"], []):  # OpenMP if the compiler has it (the kernel is correct without)
            cmd = [cc, *flags, *extra, str(SOURCE), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each install a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; None when disabled or unavailable (see `load_error`).
    Thread-safe: concurrent first callers wait for the one build."""
    with _lock:
        return _load()


def _load() -> ctypes.CDLL | None:
    global _lib, _error, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("GLM5_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        _error = "disabled by GLM5_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _error = str(e)
        return None
    sizes = [f"glm5_{n}_args_size" for n in ("layer", "draft", "step", "greedy")] + ["glm5_mat_size"]
    for fn in sizes:
        getattr(lib, fn).argtypes = []
        getattr(lib, fn).restype = _i64
    for name, c_size, py_size in (
        ("LayerArgs", lib.glm5_layer_args_size(), ctypes.sizeof(LayerArgs)),
        ("Mat", lib.glm5_mat_size(), ctypes.sizeof(Mat)),
        ("DraftArgs", lib.glm5_draft_args_size(), ctypes.sizeof(DraftArgs)),
        ("StepArgs", lib.glm5_step_args_size(), ctypes.sizeof(StepArgs)),
        ("GreedyArgs", lib.glm5_greedy_args_size(), ctypes.sizeof(GreedyArgs)),
    ):
        if c_size != py_size:  # the C struct and its ctypes mirror disagree: every call would read garbage
            _error = (
                f"{SOURCE.name}'s {name} is {c_size} bytes but native.{name} is {py_size}: the two "
                "declarations differ; the native kernel is off (torch back end)"
            )
            return None
    lib.glm5_decode_layer.argtypes = [ctypes.POINTER(LayerArgs)]
    lib.glm5_decode_layer.restype = ctypes.c_int
    lib.glm5_decode_step.argtypes = [ctypes.POINTER(StepArgs)]
    lib.glm5_decode_step.restype = ctypes.c_int
    lib.glm5_decode_greedy.argtypes = [ctypes.POINTER(StepArgs), ctypes.POINTER(GreedyArgs)]
    lib.glm5_decode_greedy.restype = ctypes.c_int
    lib.glm5_rms_norm.argtypes = [_ptr, _ptr, _i64, _i64, _f32, _ptr]
    lib.glm5_rms_norm.restype = None
    lib.glm5_linear.argtypes = [ctypes.POINTER(Mat), _ptr, _i64, _ptr]
    lib.glm5_linear.restype = None
    lib.glm5_mtp_draft.argtypes = [ctypes.POINTER(LayerArgs), ctypes.POINTER(DraftArgs)]
    lib.glm5_mtp_draft.restype = ctypes.c_int
    lib.glm5_isa.argtypes = []
    lib.glm5_isa.restype = ctypes.c_char_p
    lib.glm5_int8_quantize.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr]
    lib.glm5_int8_quantize.restype = None
    _lib = lib
    return lib


def load_error() -> str | None:
    """Why `load()` returned None (None if it has not been called or succeeded)."""
    return _error


def isa() -> str | None:
    """The SIMD path of the loaded kernel: "avx512", "avx2" or "portable" (None: no kernel)."""
    lib = load()
    return None if lib is None else lib.glm5_isa().decode()


def describe() -> str:
    """One line for `glm5 info --hardware` and engine start: the kernel's build target, SIMD path and formats,
    or why it is off."""
    lib = load()
    if lib is None:
        return f"native decode kernel: off ({load_error()}); the fused step runs as torch ops"
    return (
        f"native decode kernel: {isa()} SIMD (-march={march()}), weights {'/'.join(FORMATS)} read as stored, "
        f"fp32 accumulation"
    )
