"""CLI subcommand `glm5 rl`; ``register(subparsers)`` adds it to the `glm5` parser (no torch/ray at import).

    glm5 rl --recipe math-async --init runs/tiny --out runs/rl-math      # from a `glm5 train` checkpoint
    glm5 rl --recipe digits-sync --out runs/rl-digits                   # a toy a random tiny model learns
    glm5 rl --recipe math-sync --ray --out runs/rl-ray                  # the same loop over Ray actors
    glm5 rl --recipe digits-sync --rollout-ep 2 --trainer-procs 2       # sharded engine + FSDP2 trainer

An --out folder holding a checkpoint is resumed (same recipe). The folder ends with metrics.jsonl, rl.png,
summary.json, checkpoints/ and model/ (HF layout + tokenizer, loadable by `glm5 generate` / LLM).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from glm5.argtypes import existing_dir, output_path, positive_int

RECIPES = ("math-sync", "math-async", "math-abstain", "tool-use", "digits-sync", "digits-async")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rl",
        help="RL post-training (GRPO/PPO, sync or fully async, partial rollouts, staleness control)",
        description="Asynchronous RL post-training on the glm5 engine. Shows reward, accuracy, abstention rate, "
        "staleness and samples/s live; writes metrics.jsonl, rl.png, summary.json and a final HF-layout checkpoint "
        "in DIR/model.",
    )
    p.add_argument("--recipe", required=True, choices=RECIPES, help="named RL recipe")
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        type=existing_dir,
        help="a `glm5 train` output folder (HF layout + tokenizer); "
        "without it a tiny model is built and warm-started on the spot",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=output_path,
        help="output folder (default runs/rl-RECIPE); resumed if it has a checkpoint",
    )
    p.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps (default: the recipe's)")
    p.add_argument("--ray", action="store_true", help="run buffer, rollout worker and trainer as Ray actors")
    p.add_argument(
        "--ray-placement",
        default="PACK",
        choices=("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"),
        help="with --ray: the placement group strategy of the rollout worker and trainer bundles (default PACK)",
    )
    for flag, key, what in (
        ("--rollout-tp", "tensor_parallel_size", "tensor-parallel ranks"),
        ("--rollout-ep", "expert_parallel_size", "expert-parallel size (with --rollout-dp: dp x tp)"),
        ("--rollout-dp", "data_parallel_size", "data-parallel attention ranks"),
    ):
        p.add_argument(
            flag,
            type=positive_int,
            metavar="N",
            dest=f"rollout_{key}",
            help=f"the rollout engine's {what} (a multi-process engine; default: the recipe's, 1)",
        )
    p.add_argument(
        "--trainer-procs",
        type=positive_int,
        metavar="N",
        help="trainer processes holding the policy under FSDP2 (+ expert parallel); default: the recipe's, 1",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_rl_command)


def run_rl_command(args: argparse.Namespace) -> int:
    from glm5.rl.recipes import recipe_preset  # lazy: torch-free CLI start-up

    recipe = recipe_preset(args.recipe)
    if args.steps is not None:
        recipe = recipe.replace(steps=args.steps)
    layout = {
        k: getattr(args, f"rollout_{k}")
        for k in ("tensor_parallel_size", "expert_parallel_size", "data_parallel_size")
        if getattr(args, f"rollout_{k}", None) is not None
    }
    if layout:
        if args.ray:
            raise ValueError(
                "--rollout-tp/-ep/-dp: a multi-process rollout engine runs in-process, not with --ray"
            )
        recipe = recipe.replace(rollout_parallel={**recipe.rollout_parallel, **layout})
    if args.trainer_procs is not None:
        recipe = recipe.replace(trainer_procs=args.trainer_procs)
    if args.init is not None:
        check_init(args.init, recipe)
    out = Path(args.out or f"runs/rl-{args.recipe}")
    summary = run_rl(
        recipe, out, init=args.init, quiet=args.quiet, use_ray=args.ray, placement=args.ray_placement
    )
    _print_summary(summary, out)
    return 0


def check_init(init: str, recipe: Any) -> None:
    """--init must be a `glm5 train` output (or its model/ folder) and the recipe must take one: checked before
    anything loads or --out is made."""
    folder = Path(init)
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    missing = [f for f in ("config.json", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"--init {init}: no {' or '.join(missing)} there; pass a `glm5 train` output folder (or "
            "its model/ subfolder)"
        )
    if recipe.task == "digits":
        raise ValueError(
            f"--init: recipe {recipe.name} uses its own 16-symbol vocabulary; run it without --init"
        )


def _console(quiet: bool) -> Any:
    from rich.console import Console  # lazy: torch-free CLI start-up

    return Console(quiet=quiet)


LAYOUT_KEYS = ("steps", "rollout_parallel", "trainer_procs")  # may change between runs (DCP reshards)


def _build_system(
    recipe: Any, task: dict[str, Any], out: Path, use_ray: bool, placement: str
) -> dict[str, Any]:
    """The buffer, rollout engines, trainer and transport, in this process or as Ray actors."""
    from glm5.rl.controller import build_local  # lazy: torch-free CLI start-up
    from glm5.rl.posttrain import attach_reference  # lazy: torch-free CLI start-up

    # over Ray the trainer (group) is built as actors by build_ray; the local system only serves the evaluation
    system = build_local(recipe.replace(trainer_procs=1) if use_ray else recipe, task, str(out))
    if recipe.trainer_procs == 1 or use_ray:  # a trainer group's ranks hold their own KL reference already
        # a loss with a KL term is anchored to the initial policy
        attach_reference(system["trainer"], task["model"])
    if use_ray:
        from glm5.rl.actors import build_ray  # lazy: torch-free CLI start-up

        system = build_ray(recipe, task, system, placement=placement)
    return system


def _resume(
    system: dict[str, Any], recipe: Any, out: Path, console: Any
) -> tuple[dict[str, Any] | None, int]:
    """The checkpoint in out/checkpoints, if any, loaded into the trainer and buffer: (its state, its step)."""
    state = system["trainer"].load(str(out / "checkpoints"))
    if state is None:
        return None, 0
    saved = {k: v for k, v in (state.get("recipe") or {}).items() if k not in LAYOUT_KEYS}
    if saved != {k: v for k, v in recipe.to_dict().items() if k not in LAYOUT_KEYS}:
        raise ValueError(f"{out} holds a run of a different recipe; use a new --out folder")
    system["buffer"].load_state_dict(state["buffer"])
    start = int(state["version"])
    console.print(f"resumed from step {start} of {recipe.steps}")
    return state, start


def _bring_home(trainer: Any, model: Any, use_ray: bool) -> str:
    """A trainer group's final weights, loaded into the driver's model for the export; their hash."""
    from glm5.rl.weight_sync import state_hash  # lazy: torch-free CLI start-up

    final = trainer.weights()
    if use_ray:  # RayTrainerGroup: an object-store reference
        import ray  # lazy: optional dependency

        final = ray.get(final)
    model.load_state_dict(final)
    trainer.shutdown()
    return state_hash(final)


def run_rl(
    recipe: Any,
    out: str | Path,
    init: str | None = None,
    quiet: bool = False,
    use_ray: bool = False,
    placement: str = "PACK",
) -> dict[str, Any]:
    """Build, evaluate, train (with live progress), evaluate again, export. Returns the summary."""
    import torch  # lazy: torch-free CLI start-up

    from glm5.rl.controller import run_loop  # lazy: torch-free CLI start-up
    from glm5.rl.recipes import build_task  # lazy: torch-free CLI start-up
    from glm5.rl.rollout import evaluate_policy  # lazy: torch-free CLI start-up
    from glm5.train.metrics import MetricsLog  # lazy: torch-free CLI start-up

    out = Path(out)
    console = _console(quiet)
    torch.manual_seed(recipe.seed)
    task = build_task(recipe, init, log=console.print)  # loads --init: a failure here leaves no --out folder
    out.mkdir(parents=True, exist_ok=True)
    system = _build_system(recipe, task, out, use_ray, placement)
    buffer, rollout, trainer, transport = (system[k] for k in ("buffer", "rollout", "trainer", "transport"))
    state, start = _resume(system, recipe, out, console)
    eval_kw = dict(
        max_new_tokens=recipe.configs()[1].max_new_tokens,
        tokenizer=task["tokenizer"],
        reply_fn=task["reply_fn"],
        env=task["env"],
    )

    def evaluate(engine: Any) -> dict[str, Any] | None:
        return (
            evaluate_policy(engine, task["eval"], task["reward_fn"], **eval_kw)
            if engine is not None
            else None
        )

    engine = system["engine"]
    transport.publish(trainer.weights(), start)  # the engine starts from the (possibly resumed) policy
    rollout.sync_weights(transport, start)
    before = evaluate(engine)
    log = MetricsLog(out / "metrics.jsonl").start(start if state is not None else None)

    def checkpoint(version: int) -> None:
        trainer.save(str(out / "checkpoints"), buffer.state_dict(), {"recipe": recipe.to_dict()})

    t0 = time.time()
    with _Progress(recipe.steps, start, quiet) as bar:

        def on_step(record: dict[str, Any], batch: Any) -> None:
            log.write({k: v for k, v in record.items() if not isinstance(v, (list, tuple))})
            bar.update(record)

        run_loop(
            buffer,
            rollout,
            trainer,
            transport,
            steps=recipe.steps,
            overlap=recipe.overlap or use_ray,
            start_version=start,
            update_every=recipe.update_every,
            on_step=on_step,
            checkpoint=checkpoint,
            checkpoint_every=recipe.checkpoint_every,
        )
    if use_ray:  # the held-out evaluation and the export run on the driver's copy of the final weights
        rollout.sync_local(system["local_rollout"], transport, recipe.steps)
        rollout = system["local_rollout"]
    checkpoint(recipe.steps)
    # a trainer group's weights live in its processes: bring them home for the export
    final_hash = _bring_home(trainer, task["model"], use_ray) if recipe.trainer_procs > 1 else None
    engine = rollout.engine if engine is not None else None  # a dead rank's engine was replaced
    after = evaluate(engine)
    # a multi-rank engine's model is rank 0's shard: export the driver's full model instead
    sharded = engine is not None and getattr(engine.executor, "world_size", 1) > 1
    export = _export(task["model"] if sharded else engine.model, task["tokenizer"], out / "model")
    if sharded:
        engine.shutdown()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plot_rl(records, out / "rl.png", recipe.name)
    summary = {
        "recipe": recipe.name,
        "steps": recipe.steps,
        "wall_s": time.time() - t0,
        "eval_before": before,
        "eval_after": after,
        "buffer": buffer.counts(),
        "export": str(export) if export else None,
        "mode": "ray" if use_ray else "in-process",
        "trainer_procs": recipe.trainer_procs,
    }
    if final_hash is not None:
        summary["trainer_final_hash"] = final_hash
    if sharded:  # every weight sync's per-rank hashes, and any engine replaced after a rank died
        summary["rollout_engine"] = {
            "ranks": engine.executor.world_size,
            "syncs": rollout.sync_log,
            "replaced": rollout.replaced,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if use_ray:
        system["shutdown"]()
    return summary


def _export(model: Any, tokenizer: Any, folder: Path) -> Path | None:
    model.save_pretrained(str(folder))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    return folder


class _Progress:
    """rich progress: step, reward, accuracy, abstention, staleness histogram, samples/s, ETA."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        from rich.progress import (  # lazy: torch-free CLI start-up
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]rl"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=quiet,
        )
        self.task = self.progress.add_task("rl", total=total, completed=done, info="")

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, r: dict[str, Any]) -> None:
        stale = " ".join(f"{k}:{v}" for k, v in r["staleness"].items())
        info = (
            f"reward {r.get('rollout_reward', r['reward']):+.2f} acc {r['accuracy']:.0%} "
            f"abstain {r['abstention_rate']:.0%} stale[{stale}] {r['samples_per_s']:.1f} samples/s "
            f"kl {r.get('ppo_kl', 0):.1e}"
        )
        self.progress.update(self.task, completed=r["step"] + 1, info=info)


def plot_rl(records: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Reward (rollout and trained), accuracy / abstention, staleness, throughput and off-policy metrics."""
    import matplotlib  # lazy: optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional dependency

    rl = [r for r in records if r.get("kind") == "rl"]
    steps = [r["step"] for r in rl]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    panels = [
        (("rollout_reward", "reward"), "reward (all rollouts / trained batch)"),
        (("accuracy", "abstention_rate"), "accuracy, abstention rate"),
        (("staleness_mean", "staleness_max"), "staleness (versions)"),
        (("samples_per_s",), "samples / s"),
        (("ppo_kl", "is_weight_mean", "clipfrac"), "ppo_kl, IS weight mean, clipfrac"),
        (("grad_norm",), "grad norm"),
    ]
    for ax, (keys, name) in zip(axes.flat, panels):
        for key in keys:
            pts = [(s, r[key]) for s, r in zip(steps, rl) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=key)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"glm5 rl: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_summary(s: dict[str, Any], out: Path) -> None:
    from rich.console import Console  # lazy: torch-free CLI start-up
    from rich.table import Table  # lazy: torch-free CLI start-up

    table = Table(title=f"glm5 rl {s['recipe']}", show_header=False)

    def ev(e: dict | None) -> str:
        if not e:
            return "-"
        h = e.get("hallucination_rate")
        return (
            f"reward {e['reward']:+.3f}, accuracy {e['accuracy']:.0%}, abstention {e['abstention_rate']:.0%}"
            + (f", hallucination {h:.0%}" if h is not None else "")
        )

    for k, v in (
        ("steps", str(s["steps"])),
        ("mode", s["mode"]),
        ("held-out before", ev(s["eval_before"])),
        ("held-out after", ev(s["eval_after"])),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("work accounting", ", ".join(f"{k} {v}" for k, v in s["buffer"].items())),
        ("checkpoint (HF layout)", f"{out}/model"),
        ("metrics / plot", f"{out}/metrics.jsonl, {out}/rl.png"),
    ):
        table.add_row(k, v)
    Console().print(table)
