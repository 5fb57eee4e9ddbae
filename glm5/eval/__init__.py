"""Evaluation harness: synthetic arithmetic, unanswerable and tool-use questions plus held-out perplexity, scored
through a local checkpoint (the glm5 engine) or any OpenAI-compatible endpoint; Markdown report and PNG plots.

    from glm5.eval import LocalBackend, evaluate, write_report, compare
    result = evaluate(LocalBackend("out/export"), ["arithmetic", "tool_use"], num=50)
    write_report(result, "eval-out")
"""

import importlib
from typing import Any

_EXPORTS = {
    "GenerationOptions": "backends", "LocalBackend": "backends", "OpenAIBackend": "backends", "Reply": "backends",
    "abstention_rate": "metrics", "accuracy": "metrics", "hallucination_rate": "metrics",
    "mean_pass_at_k": "metrics", "pass_at_k": "metrics", "summarize": "metrics", "wilson_interval": "metrics",
    "compare": "report", "markdown_report": "report", "plot_metrics": "report", "write_report": "report",
    "EvalResult": "runner", "evaluate": "runner",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: `glm5 eval`'s parser must not import torch (via glm5.data)
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"glm5.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'glm5.eval' has no attribute {name!r}")
