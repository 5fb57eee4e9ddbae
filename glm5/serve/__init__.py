"""OpenAI-compatible server: `glm5 serve --model PATH`, or `create_app(engine, ServerConfig(...))` from Python.

Exports load lazily, so `glm5.serve.cli` (imported by `glm5 --help`) pulls in neither torch nor fastapi.
"""

from glm5._lazy import lazy_exports

_HOMES = {
    "create_app": "glm5.serve.app",
    "ServerConfig": "glm5.serve.core",
    "ServerThread": "glm5.serve.server",
    "build_engine": "glm5.serve.server",
    "serve": "glm5.serve.server",
    "ScriptedOutputs": "glm5.serve.scripted",
    "load_script": "glm5.serve.scripted",
}
__getattr__, __all__ = lazy_exports("glm5.serve", _HOMES)
