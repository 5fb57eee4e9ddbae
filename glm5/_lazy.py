"""Lazy package exports: names load from their home module on first use, so building the `glm5` command line
(which imports every package's cli module) pulls in neither torch nor fastapi, ray or math-verify."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(`__getattr__`, `__all__`) of a package whose exported names map to their home modules in `homes`."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(homes)
