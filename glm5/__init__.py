"""glm5: an independent, hardware-portable PyTorch implementation of the GLM-5 system."""

from glm5.config import GLM5Config

__version__ = "0.1.0"
__all__ = ["GLM5Config", "GLM5ForCausalLM", "GLM5Tokenizer", "LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import glm5` stays light (no torch import for config-only use such as `glm5 info`).
    if name == "GLM5ForCausalLM":
        from glm5.model import GLM5ForCausalLM  # lazy: torch-free CLI start-up

        return GLM5ForCausalLM
    if name == "GLM5Tokenizer":
        from glm5.tokenizer import GLM5Tokenizer  # lazy: torch-free CLI start-up

        return GLM5Tokenizer
    if name in ("LLM", "SamplingParams"):
        from glm5 import engine  # lazy: torch-free CLI start-up

        return getattr(engine, name)
    raise AttributeError(f"module 'glm5' has no attribute {name!r}")
