"""The GLM-5 model, written for one device."""

from glm5.model.attention import AttentionOptions
from glm5.model.cache import ContiguousLatentCache, LatentCache
from glm5.model.model import GLM5ForCausalLM, GLM5Output, LayerStats

__all__ = [
    "AttentionOptions",
    "ContiguousLatentCache",
    "GLM5ForCausalLM",
    "GLM5Output",
    "LatentCache",
    "LayerStats",
]
