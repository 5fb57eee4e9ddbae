"""`EngineConfig`: the engine's settings that do not change the model (shared by the engine, its scheduler and its
model runner)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Engine settings that do not change the model."""

    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """Blocks in the cache (None: as many as `kv_cache_memory` holds)."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache (None: 2 GiB on CPU -- touched only as used -- else 80% of free device memory)."""
    max_num_seqs: int = 256
    """Most sequences running at once (the decode batch)."""
    max_num_batched_tokens: int = 2048
    """Prefill tokens per step: longer prompts are prefilled in chunks, interleaved with decode steps."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None = the config's max_position_embeddings (capped by the cache)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    num_speculative_tokens: int = 0
    """MTP draft tokens per step (0 = off, 1-3 = speculative decoding)."""
    decode_steps: int = 1
    """Tokens per decode step when every decode row takes the plain argmax (greedy, no penalties, logprobs or
    min_tokens ban) and nothing speculates: the steps run back to back in one native kernel call (one round
    trip through Python per `decode_steps` tokens), or one after another elsewhere. Tokens after a stop are
    computed and dropped; output streams in groups of this many."""
    seed: int = 0
    """Seeds the generators of requests that bring no seed of their own."""
    attention_impl: str | None = None
    """Override the model's attention path ("sparse" or the dense "mask" reference)."""
    fused_decode: bool | None = None
    """Decode steps (and speculative verification / MTP drafting) through glm5.engine.fused.FusedDecoder: packed
    projections and folded norms, the whole step one call into the native C kernel where a C compiler exists.
    None: on for float32 models on a CPU, where dispatch dominates decode; the model's own forward otherwise
    (or when the model is unsupported: FP8 "keep" weights, the "mask" attention). True asks for it anywhere."""
    compile: str = "auto"
    """The decode step under torch.compile (glm5.engine.compiled): "on", "off" or "auto" (on for CUDA devices, with
    CUDA graphs through mode "reduce-overhead"); where the fused CPU step applies, it runs instead. A compile that
    fails warns once and decodes eagerly."""
    compile_backend: str = "inductor"
    """torch.compile backend of the compiled decode step ("eager"/"aot_eager" check the capture without codegen)."""
    force_token: Callable[[list[int], list[int]], int | None] | None = None
    """Scripted output: `(prompt ids, output ids so far) -> token id to emit instead of the sampled one, or None`.
    The forced token then goes through the usual logprobs, stop and streaming handling (glm5/serve/scripted.py
    replays given outputs with random weights). Speculative decoding is turned off while it is set: verification
    samples inside the verify kernel, where the hook could not apply."""
