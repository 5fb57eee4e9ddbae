"""Shared pytest set-up: which tests may skip, and the `one_thread` fixture.

Skip policy. Only accelerator tests may skip: tests marked `gpu` (skipped here on machines without a CUDA/NPU/XPU
device) and skips whose reason starts with "accelerator:". Anything else a test needs (transformers, ray, a C
compiler, ...) is a dependency of the test suite: on a developer machine its absence skips the tests that use it,
with the reason in the summary (`-ra` in pyproject's addopts lists every skip and why); in CI (`CI=true`, as
`.ci/run` runs) a skip for any other reason is turned into a failure, so a reference that silently went missing
cannot pass for a green run. Tests ask for optional modules with `require("name")` (this file), which imports the
module, or skips (fails in CI) naming it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

ACCELERATOR = "accelerator:"
"""Prefix of the skip reasons that are allowed in CI (no device of that kind here)."""

# the suite trains in fp32 wherever it runs ("auto" would pick bf16 on AVX512-BF16 CPUs only): the same numbers on
# every machine; the tests of the dtype choice clear it (tests/test_train_dtype.py)
os.environ.setdefault("GLM5_TRAIN_DTYPE", "float32")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, why: str = "") -> ModuleType:
    """Import `module` for a test: skip without it (`pytest.importorskip`), fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = f"needs {module}{f' ({why})' if why else ''}: {exc}"
        if in_ci():
            pytest.fail(f"CI=true: a test dependency is missing: {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def _has_accelerator() -> bool:
    from glm5.device import available_device_types

    return any(t in available_device_types() for t in ("cuda", "npu", "xpu"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_accelerator():
        return
    skip = pytest.mark.skip(reason=f"{ACCELERATOR} needs a GPU/NPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed(reason: str, item: pytest.Item | None) -> bool:
    return reason.startswith(ACCELERATOR) or (item is not None and item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - pluggy hook wrapper
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report.longrepr)
        if not _allowed(reason, item):
            report.outcome = "failed"
            report.longrepr = f"CI=true: only accelerator tests may skip; this one skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ANN201 - pluggy hook wrapper
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped:
        reason = _skip_reason(report.longrepr)
        if not reason.startswith(ACCELERATOR):
            report.outcome = "failed"
            report.longrepr = (
                f"CI=true: only accelerator tests may skip; {collector.nodeid} skipped: {reason}"
            )


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
