"""The decode step under `torch.compile`: the fast decode path on accelerators.

On a CPU the fused step (glm5.engine.fused: packed weights, one native call per layer) is the fast path. On a
GPU/NPU a decode step of a small batch is bound by kernel launches, so the model's own decode forward is compiled
instead: inductor fuses its element-wise work, and with mode "reduce-overhead" replays it as CUDA graphs where
the device has them (shapes it has not seen -- a new batch size, a longer context -- compile or record anew; a
graph whose inputs it cannot keep at fixed addresses runs compiled without a graph, as inductor decides).

`EngineConfig.compile` ("auto" | "on" | "off"; auto = on for CUDA only) turns it on; the model runner sends its
plain decode forwards (not prefill, not the CPU fused step) through `CompiledDecode`. When compiling or running
the compiled step fails, the runner warns once and decodes eagerly from then on: the step is the same forward,
and writing its cache entries again is idempotent, so the result does not change.

    LLM("path/to/model", compile="on")                   # on any device (backend "inductor")
    CompiledDecode(model, backend="eager")               # what the CPU tests use: dynamo capture, eager kernels
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

COMPILE_SETTINGS = ("auto", "on", "off")
"""Values of `EngineConfig.compile`."""


def compile_wanted(setting: str | bool | None, device: torch.device) -> bool:
    """Whether the decode step is compiled: "on"/True, "off"/False, "auto"/None = on for CUDA devices only
    (CPU decode has the fused native step; other accelerators' compilers are opt-in until measured)."""
    if setting is True or setting == "on":
        return True
    if setting is False or setting == "off":
        return False
    if setting is None or setting == "auto":
        return device.type == "cuda"
    raise ValueError(f"EngineConfig.compile={setting!r}: use one of {', '.join(COMPILE_SETTINGS)}")


def default_mode(device: torch.device, backend: str) -> str | None:
    """ "reduce-overhead" (CUDA graphs) for inductor on CUDA, the backend's default elsewhere."""
    return "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None


class CompiledDecode:
    """`model(ids, cache, return_hidden=...)` compiled once (dynamic shapes after the first new size), with an
    eager fallback: `failed` holds the reason once compiling or a compiled run raised."""

    def __init__(
        self,
        model: Any,
        backend: str = "inductor",
        mode: str | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.device = device or next(model.parameters()).device
        self.backend = backend
        self.mode = mode if mode is not None else default_mode(self.device, backend)
        self.failed: str | None = None
        self.calls = 0
        self._fn = torch.compile(self._forward, backend=backend, mode=self.mode, dynamic=None)

    def _forward(self, ids: torch.Tensor, cache: Any, return_hidden: bool) -> tuple[torch.Tensor, Any]:
        out = self.model(ids, cache, return_hidden=return_hidden)
        return out.logits, out.hidden_states

    def __call__(
        self, ids: torch.Tensor, cache: Any, return_hidden: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """(logits [B, T, V], hidden states or None) of one decode forward."""
        self.calls += 1
        if self.failed is None:
            try:
                logits, hidden = self._fn(ids, cache, return_hidden)
                if self.mode == "reduce-overhead":  # a CUDA-graph replay reuses its output buffers
                    logits, hidden = logits.clone(), None if hidden is None else hidden.clone()
                return logits, hidden
            except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly from now on
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"torch.compile of the decode step failed ({self.failed}); decoding eagerly "
                    "(EngineConfig(compile='off') silences this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        out = self.model(ids, cache, return_hidden=return_hidden)
        return out.logits, out.hidden_states
