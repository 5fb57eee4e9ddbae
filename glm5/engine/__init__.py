"""Inference engine: paged latent KV cache, continuous batching, sampling, MTP speculative decoding, async front end.

Exports load lazily, so `glm5.engine.cli` (imported by `glm5 --help`) does not pull in torch.
"""

from glm5._lazy import lazy_exports

_HOMES = {
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
__getattr__, __all__ = lazy_exports("glm5.engine", _HOMES)
