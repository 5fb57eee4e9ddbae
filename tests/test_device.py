"""glm5.device: device choice, dtypes, autocast and memory stats (CPU here; `gpu`-marked tests need CUDA)."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from glm5 import device as dev

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerator: needs a CUDA device")


def only(monkeypatch: pytest.MonkeyPatch, *types: str) -> None:
    """Pretend exactly these device types are available."""
    monkeypatch.setattr(dev, "is_available", lambda t: t in types or t == "cpu")


def test_pick_device_without_accelerators_is_cpu(monkeypatch):
    only(monkeypatch)
    assert dev.pick_device() == torch.device("cpu")


@pytest.mark.parametrize(
    "available, expected",
    [
        (("cuda", "npu", "xpu", "mps"), "cuda"),
        (("npu", "xpu", "mps"), "npu"),
        (("xpu", "mps"), "xpu"),
        (("mps",), "mps"),
    ],
)
def test_pick_device_tries_cuda_npu_xpu_mps_then_cpu(monkeypatch, available, expected):
    only(monkeypatch, *available)
    assert dev.available_device_types() == [*[t for t in dev.DEVICE_TYPES if t in available], "cpu"]
    if expected != "npu":  # torch.device("npu") only parses once the real torch_npu is imported
        assert dev.pick_device().type == expected


def test_pick_device_honours_an_available_preference():
    assert dev.pick_device("cpu") == torch.device("cpu")
    assert dev.pick_device(" CPU ") == torch.device("cpu")
    assert dev.pick_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("prefer", ["cuda", "npu", "xpu", "mps", "cuda:1"])
def test_pick_device_refuses_an_unavailable_preference_with_a_clear_message(monkeypatch, prefer):
    only(monkeypatch)
    with pytest.raises(ValueError, match=r"is not available here \(available: cpu\)"):
        dev.pick_device(prefer)


@pytest.mark.parametrize("prefer", ["tpu", "cuda:x", "gpu0"])
def test_pick_device_rejects_unknown_device_names(prefer):
    with pytest.raises(ValueError, match="unknown device"):
        dev.pick_device(prefer)


def test_pick_device_rejects_an_index_past_the_last_device():
    with pytest.raises(ValueError, match="has 1 cpu device"):
        dev.pick_device("cpu:1")


@pytest.mark.skipif(
    importlib.util.find_spec("torch_npu") is not None,
    reason="accelerator: torch_npu is installed (its NPU back end decides)",
)
def test_npu_is_unavailable_without_torch_npu():
    assert dev.is_available("npu") is False
    assert "npu" not in dev.available_device_types()
    assert dev.available_device_types()[-1] == "cpu"


def test_cpu_dtypes_prefer_float32_and_list_float16_last_of_the_compute_dtypes():
    dtypes = dev.supported_dtypes("cpu")
    assert dtypes[:3] == [torch.float32, torch.bfloat16, torch.float16]
    assert set(dtypes[3:]) <= {torch.float8_e4m3fn}  # FP8 only after the compute dtypes, if at all
    assert dev.default_dtype(torch.device("cpu")) == torch.float32


def test_autocast_bf16_on_cpu_runs_matmuls_in_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with dev.autocast("cpu", torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_autocast_fp32_is_a_no_op():
    ctx = dev.autocast("cpu", torch.float32)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_autocast_refuses_float8():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        dev.autocast("cpu", torch.float8_e4m3fn)


def test_synchronize_and_device_name_on_cpu():
    dev.synchronize("cpu")
    name = dev.device_name("cpu")
    assert isinstance(name, str) and name.strip()


def test_cpu_peak_memory_is_the_process_high_water_mark_in_bytes():
    before = dev.peak_memory_bytes("cpu")
    x = torch.ones(32 * 2**20)  # 128 MiB, touched
    after = dev.peak_memory_bytes("cpu")
    assert after >= before
    assert after >= 128 * 2**20  # bytes, not KiB: a unit slip would read ~1000x smaller
    dev.reset_peak_memory("cpu")  # documented as unable to lower the OS high-water mark
    assert dev.peak_memory_bytes("cpu") >= after
    del x


@pytest.mark.gpu
@needs_cuda
def test_cuda_is_picked_first_and_supports_bf16():
    device = dev.pick_device()
    assert device.type == "cuda"
    assert torch.bfloat16 in dev.supported_dtypes(device)
    assert dev.default_dtype(device) == torch.bfloat16
    assert dev.device_name(device)


@pytest.mark.gpu
@needs_cuda
def test_cuda_autocast_and_synchronize():
    device = dev.pick_device("cuda")
    a = torch.randn(16, 16, device=device)
    with dev.autocast(device, torch.bfloat16):
        y = a @ a
    dev.synchronize(device)
    assert y.dtype == torch.bfloat16


@pytest.mark.gpu
@needs_cuda
def test_cuda_peak_memory_tracks_allocations_and_resets():
    device = dev.pick_device("cuda")
    dev.reset_peak_memory(device)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    assert dev.peak_memory_bytes(device) >= 64 * 2**20
    del x
    torch.cuda.empty_cache()
    dev.reset_peak_memory(device)
    assert dev.peak_memory_bytes(device) < 64 * 2**20
