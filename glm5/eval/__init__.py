"""Evaluation harness: synthetic arithmetic, unanswerable and tool-use questions plus held-out perplexity, scored
through a local checkpoint (the glm5 engine) or any OpenAI-compatible endpoint; Markdown report and PNG plots.

    from glm5.eval import LocalBackend, evaluate, write_report, compare
    result = evaluate(LocalBackend("out/export"), ["arithmetic", "tool_use"], num=50)
    write_report(result, "eval-out")
"""

from glm5._lazy import lazy_exports

_HOMES = {
    name: f"glm5.eval.{module}"
    for name, module in {
        "GenerationOptions": "backends",
        "LocalBackend": "backends",
        "OpenAIBackend": "backends",
        "Reply": "backends",
        "abstention_rate": "metrics",
        "accuracy": "metrics",
        "hallucination_rate": "metrics",
        "mean_pass_at_k": "metrics",
        "pass_at_k": "metrics",
        "summarize": "metrics",
        "wilson_interval": "metrics",
        "compare": "report",
        "markdown_report": "report",
        "plot_metrics": "report",
        "write_report": "report",
        "EvalResult": "runner",
        "evaluate": "runner",
    }.items()
}
__getattr__, __all__ = lazy_exports("glm5.eval", _HOMES)
