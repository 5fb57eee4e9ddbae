"""Inference engine: paged latent KV cache, continuous batching, sampling, MTP speculative decoding, async front end.

Exports load lazily, so `glm5.engine.cli` (imported by `glm5 --help`) does not pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "glm5.engine.llm",
    "AsyncLLMEngine": "glm5.engine.async_engine",
    "EngineConfig": "glm5.engine.engine",
    "LLMEngine": "glm5.engine.engine",
    "PagedLatentCache": "glm5.engine.kv_cache",
    "CompletionOutput": "glm5.engine.outputs",
    "RequestMetrics": "glm5.engine.outputs",
    "RequestOutput": "glm5.engine.outputs",
    "SamplingParams": "glm5.engine.sampling",
    "SpecMetrics": "glm5.engine.speculative",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glm5.engine' has no attribute {name!r}")
