"""What every benchmark shares: the bench-tiny config and one model of either side with identical weights."""

from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "configs" / "bench-tiny.json"
RESULTS = HERE / "results"


def build(impl: str, weights: str, threads: int):
    """(config, eval-mode model) of `impl` ("glm5" | "hf") holding the HF-named weights saved at `weights`."""
    from safetensors.torch import load_file

    from glm5 import GLM5Config, GLM5ForCausalLM

    torch.set_num_threads(threads)
    cfg = GLM5Config.from_hf_config(CONFIG_PATH)
    state = load_file(weights)
    if impl == "glm5":
        model = GLM5ForCausalLM(cfg)
        model.load_hf_state_dict(state)
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.GlmMoeDsaForCausalLM(transformers.GlmMoeDsaConfig(**cfg.to_hf_config()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    return cfg, model.eval()


def run_in_fresh_process(target, args: tuple, timeout: float) -> dict:  # noqa: ANN001
    """Run `target(*args, queue)` in a spawned process and return the dict it puts on the queue (or an error),
    so each measurement's peak RSS belongs to it alone."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"error": f"timed out after {timeout:.0f}s"}
    return queue.get() if not queue.empty() else {"error": f"worker exited with code {proc.exitcode}"}


def save_results(out: Path, stem: str, results: dict, table: str, plot=None) -> None:  # noqa: ANN001
    """Write `stem`.json (the raw results), `stem`.md (the table) and, given a `plot(results, path)`, `stem`.png
    under `out`, and print the table."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    if plot is not None:
        plot(results, out / f"{stem}.png")
    print(table)
