"""OpenAI-compatible server: `glm5 serve --model PATH`, or `create_app(engine, ServerConfig(...))` from Python.

Exports load lazily, so `glm5.serve.cli` (imported by `glm5 --help`) pulls in neither torch nor fastapi.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "glm5.serve.app",
    "ServerConfig": "glm5.serve.core",
    "ServerThread": "glm5.serve.server",
    "build_engine": "glm5.serve.server",
    "serve": "glm5.serve.server",
    "ScriptedOutputs": "glm5.serve.scripted",
    "load_script": "glm5.serve.scripted",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glm5.serve' has no attribute {name!r}")
