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

