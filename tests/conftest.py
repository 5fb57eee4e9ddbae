"""Shared pytest set-up: `gpu`-marked tests skip on machines without an accelerator."""

from __future__ import annotations

import pytest


def _has_accelerator() -> bool:
    from glm5.device import available_device_types

    return any(t in available_device_types() for t in ("cuda", "npu", "xpu"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_accelerator():
        return
    skip = pytest.mark.skip(reason="needs a GPU/NPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are op-dispatch bound: one thread is faster, and immune to a busy machine (two OpenMP
    threads sharing a loaded core run these tests many times slower). Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
