"""GLM-5 pre-training: LM + MTP + DSA indexer losses, the dense-warm-up / sparse stages, aux-loss-free MoE
balancing (+ an optional sequence-wise aux loss), AdamW with warm-up + cosine, clipping, accumulation, bf16
autocast, activation checkpointing, resumable checkpoints, and, at the end, evaluation and the HF export.

One process or many (`torchrun --nproc_per_node N -m glm5.cli train ...`: FSDP2 + expert parallel). Every
loss is normalised by a global count (target tokens, sequences) and gradients are summed across processes,
so N processes with B/N sequences each take the same steps as one process with B sequences.

    from glm5.train import Trainer, recipe_preset
    Trainer(recipe_preset("tiny").replace(steps=60), "runs/demo").run()
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console

from glm5.data.dataset import build_dataset, corpus_texts
from glm5.data.packing import IGNORE, Batch, BatchOrder, PackedSequences
from glm5.device import autocast, pick_device, train_dtype
from glm5.model import GLM5ForCausalLM, GLM5Output
from glm5.tokenizer import GLM5Tokenizer
from glm5.train import evaluate as ev
from glm5.train.metrics import (
    METRICS_FILE,
    MetricsLog,
    TrainProgress,
    plot_expert_load,
    plot_losses,
    read_metrics,
)
from glm5.train.optim import build_optimizer, clip_grad_norm, is_indexer_param, lr_factor, set_lr
from glm5.train.parallel import DistContext, all_reduce_sum, full_state_dict, parallelize
from glm5.train.recipe import Stage, TrainRecipe
from glm5.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

EXPORT_DIR = "model"
"""Subfolder of the output folder that holds the final HF-layout checkpoint and its tokenizer."""
PROBE_STEPS = 5
"""Steps timed before a run with a time limit fixes its length."""
REPLAN_EVERY = 10
"""A time-limited run re-fits its length to the recent step times this often (machines are shared)."""


CPU_MALLOC_KEEP_BYTES = 1 << 30
"""glibc malloc settings for CPU training (`tune_cpu_allocator`): freed memory up to this much stays with the
process, and blocks below it come from the heap rather than fresh mmaps."""


def tune_cpu_allocator() -> bool:
    """Let glibc malloc reuse freed memory instead of returning it to the OS after every large temporary.

    A CPU training step allocates and frees many tensors of a few to tens of MB (logits, attention scores,
    gradients); with glibc's defaults each such block is a fresh mmap whose pages fault in again on first use,
    which measured 15-25% of a bench-tiny step on a 2-core AVX-512 CPU (HF's step alike). Same effect as the
    environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_; the cost is that the process keeps
    its peak heap. Returns False where the C library is not glibc (nothing changed).
    """
    import ctypes  # lazy: platform-specific
    import ctypes.util  # lazy: platform-specific

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, CPU_MALLOC_KEEP_BYTES)) and bool(
        mallopt(m_mmap_threshold, CPU_MALLOC_KEEP_BYTES)
    )


def seq_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, summed over the `batch` sequences (not yet averaged):
    sum_i f_i * P_i per sequence, f_i = E/(K*T) * (tokens routed to i), P_i = mean_t of normalised scores."""
    N, E = scores.shape
    T = N // batch
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, T, E).mean(1)  # [B, E]
    counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
        1, topk_idx.view(batch, T * top_k), torch.ones(batch, T * top_k, device=scores.device)
    )
    return (counts * (E / (top_k * T)) * probs).sum()


def training_losses(
    out: GLM5Output, mb: Batch, counts: torch.Tensor, recipe: TrainRecipe, stage: Stage, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective to backpropagate, detached [lm, mtp, indexer, aux]) for one micro-batch.

    counts = [LM targets, MTP targets per depth..., sequences] over the whole step (every micro-batch and
    process), so summing the terms over micro-batches and processes gives the global means.
    """
    if out.logits is None:  # the forward fused the heads with their losses (model(..., targets=...))
        lm_sum, mtp_sums = out.lm_loss_sum, out.mtp_loss_sums
    else:
        dev = out.logits.device
        lm_sum = F.cross_entropy(
            out.logits.flatten(0, 1).float(),
            mb.targets.to(dev).flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        )
        mtp_sums = [
            F.cross_entropy(
                logits.flatten(0, 1).float(),
                mb.mtp_targets(d).to(dev).flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
            for d, logits in enumerate(out.mtp_logits)
        ]
    lm = lm_sum / counts[0]
    mtp = lm.new_zeros(())
    for d, ce in enumerate(mtp_sums):
        mtp = mtp + ce / (counts[1 + d] * len(mtp_sums))
    # the model's indexer loss is a mean over this micro-batch's queries
    share = mb.num_sequences / counts[-1]
    idx_losses = [s.indexer_loss for s in out.stats if s.indexer_loss is not None]
    indexer = torch.stack(idx_losses).mean() * share if idx_losses else lm.new_zeros(())
    aux = lm.new_zeros(())
    if recipe.seq_aux_weight > 0 and stage.train == "all":
        for s in out.stats:
            if s.router is not None:
                aux = (
                    aux
                    + seq_aux_loss(s.router.scores, s.router.topk_idx, mb.num_sequences, top_k) / counts[-1]
                )
    if stage.train == "indexer":
        objective = recipe.indexer_weight * indexer
    else:
        objective = (
            lm + recipe.mtp_weight * mtp + recipe.indexer_weight * indexer + recipe.seq_aux_weight * aux
        )
    return objective, torch.stack([lm, mtp, indexer, aux]).detach().double()


def step_counts(micro: list[Batch], mtp_depth: int) -> torch.Tensor:
    """[LM targets, MTP targets per depth..., sequences] of these micro-batches (float64)."""
    counts = torch.zeros(mtp_depth + 2, dtype=torch.float64)
    for mb in micro:
        counts[0] += (mb.targets != IGNORE).sum()
        for d in range(mtp_depth):
            counts[1 + d] += (mb.mtp_targets(d) != IGNORE).sum()
        counts[-1] += mb.num_sequences
    return counts


@torch.no_grad()
def update_router_bias(routers: list[torch.nn.Module], loads: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (outside the gradient): bias += rate * sign(mean load - load), per router."""
    for router, load in zip(routers, loads):
        bias = router.e_score_correction_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.dtype)


class Trainer:
    """A pre-training run writing into `out`: tokenizer, token files, checkpoints, metrics, plots, the export."""

    def __init__(
        self,
        recipe: TrainRecipe,
        out: str | Path,
        ctx: DistContext | None = None,
        quiet: bool = False,
        started: float | None = None,
    ) -> None:
        self.recipe, self.out, self.ctx, self.quiet = recipe, Path(out), ctx, quiet
        self.started = started if started is not None else time.time()
        self.rank, self.world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
        self.device = ctx.device if ctx else pick_device()
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.dtype, self.dtype_reason = self._train_dtype()
        if recipe.batch_size % (self.world * recipe.grad_accum):
            raise ValueError(
                f"batch_size {recipe.batch_size} must divide into {self.world} processes x "
                f"{recipe.grad_accum} micro-batches"
            )
        self.console = Console(quiet=quiet or self.rank != 0)
        self.console.print(f"compute dtype: {self.dtype_label} ({self.dtype_reason})", highlight=False)
        self.out.mkdir(parents=True, exist_ok=True)
        cached = (self.out / "tokenizer" / "tokenizer.json").is_file()
        with self.phase(
            "loading the tokenizer" if cached else f"training a {recipe.vocab_size}-id tokenizer"
        ):
            self.tok = self._tokenizer()
        with self.phase("preparing token files"):
            self.train_data, self.val_data, self.train_file = self._data()
        self.order = BatchOrder(len(self.train_data), recipe.batch_size, recipe.data.seed)
        self.model = self._model()
        self.optimizer = build_optimizer(self.model, recipe, distributed=ctx is not None)
        self.main_params = [p for n, p in self.model.named_parameters() if not is_indexer_param(n)]
        self.indexer_params = [p for n, p in self.model.named_parameters() if is_indexer_param(n)]
        self.routers = [m.mlp.gate for m in self._moe_layers()]
        self.step, self.total_steps, self.planned = 0, recipe.steps, recipe.time_limit_minutes is None
        self.skipped: list[int] = []
        self.stage_index = 0
        self.last_load = torch.zeros(len(self.routers), self.model.config.n_routed_experts)
        self.val_batches = ev.val_indices(self.val_data, recipe.eval_batches, recipe.batch_size)
        # the forward fuses the LM and MTP heads with their losses; False: it returns logits and the losses take
        # F.cross_entropy of them (the unfused twin, for tests)
        self.fused_loss = True

    # --- set-up ----------------------------------------------------------------------------------
    @contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Say what a long step outside the progress bar is doing (a spinner on a terminal, a line in a log),
        then how long it took; nothing when quiet or on other processes than rank 0."""
        start, console = time.perf_counter(), self.console
        if not console.is_terminal:  # a log: "what… 1.2 s" on one line, its start written before the wait
            console.print(f"{what}…", end=" ", highlight=False)
            try:
                yield
            except BaseException:
                console.print("failed", highlight=False)
                raise
            console.print(f"{time.perf_counter() - start:.1f} s", highlight=False)
            return
        with console.status(f"{what}…"):
            yield
        console.print(f"[green]✓[/green] {what} ({time.perf_counter() - start:.1f} s)", highlight=False)

    def _barrier(self) -> None:
        if self.ctx is not None:
            dist.barrier()

    def _tokenizer(self) -> GLM5Tokenizer:
        folder = self.out / "tokenizer"
        if self.rank == 0 and not (folder / "tokenizer.json").is_file():
            GLM5Tokenizer.train(corpus_texts(self.recipe.data), self.recipe.vocab_size).save_pretrained(
                folder
            )
        self._barrier()
        tok = GLM5Tokenizer.from_pretrained(folder)
        if tok.vocab_size != self.recipe.vocab_size:
            raise ValueError(
                f"{folder} holds a tokenizer of {tok.vocab_size} ids but the recipe asks for "
                f"{self.recipe.vocab_size}; use a new --out folder"
            )
        return tok

    def _data(self) -> tuple[PackedSequences, PackedSequences, Any]:
        if self.rank == 0:
            build_dataset(self.out / "data", self.tok, self.recipe.data)
        self._barrier()
        # cached: only opens the files
        train, val = build_dataset(self.out / "data", self.tok, self.recipe.data)
        return PackedSequences(train, self.recipe.seq_len), PackedSequences(val, self.recipe.seq_len), train

    def _model(self) -> GLM5ForCausalLM:
        cfg = self.recipe.model_config().replace(
            eos_token_id=self.tok.eos_token_ids, pad_token_id=self.tok.pad_token_id, torch_dtype="float32"
        )
        torch.manual_seed(self.recipe.seed)  # the same initial weights on every process
        model = GLM5ForCausalLM(cfg).to(self.device)
        return parallelize(model, self.ctx, self.recipe.activation_checkpointing).train()

    def _moe_layers(self) -> list[torch.nn.Module]:
        """MoE layers in stats order: main layers by index, then the MTP modules."""
        layers = [layer for layer in self.model.model.layers if hasattr(layer.mlp, "gate")]
        return layers + [m for m in self.model.mtp if hasattr(m.mlp, "gate")]

    def _router_index(self, stats) -> int:  # noqa: ANN001
        num_main = sum(1 for layer in self.model.model.layers if hasattr(layer.mlp, "gate"))
        if stats.mtp_depth is None:
            return stats.layer_idx - self.model.config.first_k_dense_replace
        return num_main + min(stats.mtp_depth, len(self.model.mtp) - 1)

    def _train_dtype(self) -> tuple[torch.dtype, str]:
        """The recipe's dtype ("auto": `glm5.device.train_dtype` -- bf16 autocast where a probe finds it faster);
        rank 0's choice holds for every process."""
        dtype, reason = train_dtype(self.device, self.recipe.dtype)
        if self.ctx is not None and self.recipe.dtype == "auto":
            flag = torch.tensor([float(dtype == torch.bfloat16)], device=self.device)
            dist.broadcast(flag, src=0)
            if (torch.bfloat16 if flag.item() else torch.float32) != dtype:
                dtype, reason = (torch.bfloat16 if flag.item() else torch.float32), "rank 0's choice"
        return dtype, reason

    @property
    def dtype_label(self) -> str:
        """ "float32" or "bfloat16 autocast" (weights and optimiser state stay fp32)."""
        return (
            "float32" if self.dtype == torch.float32 else f"{str(self.dtype).removeprefix('torch.')} autocast"
        )

    def autocast(self):  # noqa: ANN201
        """The forward's mixed-precision context: every training or evaluation forward runs inside it."""
        return autocast(self.device, self.dtype)

    # --- one step --------------------------------------------------------------------------------
    def _global_counts(self, micro: list[Batch]) -> torch.Tensor:
        """`step_counts` over every micro-batch of every process (at least 1 each)."""
        counts = step_counts(micro, self.recipe.mtp_depth)
        return all_reduce_sum(counts.to(self.device), self.ctx).clamp_min(1).cpu()

    def _targets(self, mb: Batch) -> dict[str, Any]:
        """The forward's fused-loss arguments: the LM head and each MTP depth compute their cross-entropy in
        chunks instead of returning [B, T, vocab] logits (glm5.model.loss)."""
        if not self.fused_loss:
            return {}
        dev, depth = self.device, self.recipe.mtp_depth
        return {
            "targets": mb.targets.to(dev),
            "mtp_targets": [mb.mtp_targets(d).to(dev) for d in range(depth)],
        }

    def _losses(
        self, out: GLM5Output, mb: Batch, counts: torch.Tensor, stage: Stage
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return training_losses(out, mb, counts, self.recipe, stage, self.model.config.num_experts_per_tok)

    def _router_loads(self, out: GLM5Output) -> torch.Tensor:
        loads = torch.zeros(len(self.routers), self.model.config.n_routed_experts, device=self.device)
        for s in out.stats:
            if s.router is not None:
                loads[self._router_index(s)] += s.router.expert_load
        return loads

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over the global batch; returns its metrics record."""
        r, t0 = self.recipe, time.perf_counter()
        # never back to an earlier stage (a time-limited run may stretch its plan)
        self.stage_index = max(self.stage_index, r.stage_index(self.step, self.total_steps))
        stage = r.stages[self.stage_index]
        self.model.configure_attention(dsa=stage.dsa)
        set_lr(self.optimizer, lr_factor(self.step, self.total_steps, r.warmup_steps, r.min_lr_ratio))
        batch = self.train_data.batch(self.order.next_indices())
        local = batch.split(self.world)[self.rank] if self.world > 1 else batch
        micro = local.split(r.grad_accum)
        counts = self._global_counts(micro)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        loads = torch.zeros_like(self.last_load, device=self.device)
        for i, mb in enumerate(micro):
            if self.ctx is not None:  # FSDP2: reduce-scatter gradients after the last micro-batch only
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            with self.autocast():
                out = self.model(
                    mb.input_ids.to(self.device),
                    mtp_depth=r.mtp_depth,
                    return_stats=True,
                    **self._targets(mb),
                )
            objective, parts = self._losses(out, mb, counts, stage)
            objective.backward()
            sums += parts
            loads += self._router_loads(out)
            del out, objective
        return self._finish_step(stage, sums, loads, batch.input_ids.numel(), t0)

    def _finish_step(
        self, stage: Stage, sums: torch.Tensor, loads: torch.Tensor, tokens: int, t0: float
    ) -> dict:
        """Reduce metrics, clip, skip on a non-finite loss or gradient, else step and move the router biases."""
        r = self.recipe
        group, dev = (self.ctx.group if self.ctx else None), self.device
        packed = all_reduce_sum(torch.cat([sums, loads.double().flatten()]), self.ctx).cpu()
        sums, loads = packed[:4], packed[4:].view_as(self.last_load).float()
        main_norm = clip_grad_norm(self.main_params, r.grad_clip, group, dev)
        idx_norm = clip_grad_norm(self.indexer_params, r.grad_clip, group, dev)
        lm, mtp, indexer, aux = sums.tolist()
        total = indexer * r.indexer_weight
        if stage.train == "all":
            total += lm + r.mtp_weight * mtp + r.seq_aux_weight * aux
        finite = all(math.isfinite(v) for v in (total, float(main_norm), float(idx_norm)))
        if finite:
            self.optimizer.step()
            if stage.train == "all" and r.bias_update_rate > 0:
                self._update_router_bias(loads)
        else:
            self.skipped.append(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_load = loads
        imbalance = (loads.max(1).values / loads.mean(1).clamp_min(1e-9)).tolist()
        record = {
            "kind": "train",
            "step": self.step,
            "stage": stage.name,
            "loss": total,
            "lm": lm,
            "mtp": mtp,
            "indexer": indexer,
            "seq_aux": aux,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(main_norm),
            "indexer_grad_norm": float(idx_norm),
            "expert_imbalance": sum(imbalance) / max(len(imbalance), 1),
            "imbalance_per_layer": imbalance,
            "tokens": tokens,
            "tokens_per_s": tokens / (time.perf_counter() - t0),
            "dtype": str(self.dtype).removeprefix("torch."),
            "elapsed_s": time.time() - self.started,
        }
        if not finite:
            record["skipped"] = "non-finite loss or gradient: no update"
        self.step += 1
        return record

    def _update_router_bias(self, loads: torch.Tensor) -> None:
        update_router_bias(self.routers, loads.to(self.device), self.recipe.bias_update_rate)

    # --- evaluation, checkpoints -----------------------------------------------------------------
    def validation_loss(self) -> float:
        """Mean next-token loss on the fixed validation batches (sparse attention as at the end of training)."""
        was_training = self.model.training
        self.model.eval()
        batches = (
            [b[self.rank :: self.world] for b in self.val_batches] if self.world > 1 else self.val_batches
        )
        sums = ev.lm_loss_sums(self.model, self.val_data, batches, self.device, self.autocast)
        sums = all_reduce_sum(sums, self.ctx).cpu()
        self.model.train(was_training)
        return float(sums[0] / sums[1].clamp_min(1))

    def trainer_state(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "planned": self.planned,
            "data": self.order.state_dict(),
            "stage_index": self.stage_index,
            "skipped": self.skipped,
            "recipe": self.recipe.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.out / "checkpoints",
            self.step,
            self.model,
            self.optimizer,
            self.trainer_state(),
            keep=self.recipe.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Continue from the newest checkpoint in `out`, if any (the recipe must be the same)."""
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return False
        state = load_checkpoint(path, self.model, self.optimizer)
        saved = type(self.recipe).from_dict({k: v for k, v in state["recipe"].items()})
        ignore = ("steps", "time_limit_minutes")
        if {k: v for k, v in saved.to_dict().items() if k not in ignore} != {
            k: v for k, v in self.recipe.to_dict().items() if k not in ignore
        }:
            raise ValueError(
                f"{self.out} holds a run with a different recipe; resume it with the same recipe "
                "or choose a new --out folder"
            )
        self.step, self.skipped, self.stage_index = (
            state["step"],
            list(state["skipped"]),
            state["stage_index"],
        )
        self.total_steps, self.planned = state["total_steps"], state["planned"]
        if self.recipe.time_limit_minutes is None or self.recipe.steps != saved.steps:
            self.total_steps, self.planned = max(self.recipe.steps, self.step), True
        self.order.load_state_dict(state["data"])
        saved_dtype = state.get("dtype")
        if self.recipe.dtype == "auto" and saved_dtype and getattr(torch, saved_dtype) != self.dtype:
            # an "auto" run keeps the dtype it started with (a probe on a busy machine may decide otherwise)
            self.dtype, self.dtype_reason = getattr(torch, saved_dtype), "the resumed run's"
            self.console.print(f"compute dtype: {self.dtype_label} (the resumed run's)", highlight=False)
        return True

    def _plan(self, probe_times: list[float]) -> None:
        """Fit the step count to the time limit from the measured step times (the same on every process;
        stages and the schedule stretch or shrink with it)."""
        left = self._deadline() - time.time()
        per_step = sorted(probe_times)[len(probe_times) // 2]
        steps = torch.tensor(
            [self.step + max(0, int(left / per_step))], dtype=torch.float64, device=self.device
        )
        if self.ctx is not None:
            dist.broadcast(steps, src=0)
        self.total_steps = max(self.step + 1, min(self.recipe.steps, int(steps.item())))
        self.planned = True

    # --- the run ---------------------------------------------------------------------------------
    def _deadline(self) -> float:
        """When training must stop so that the final evaluation, samples and export fit in the time limit."""
        if self.recipe.time_limit_minutes is None:
            return math.inf
        budget = self.recipe.time_limit_minutes * 60
        return self.started + budget - (30 + 0.08 * budget)

    def _out_of_time(self, deadline: float) -> bool:
        """Rank 0's clock decides for everyone (processes must stop at the same step)."""
        if deadline == math.inf:
            return False
        flag = torch.tensor([float(time.time() >= deadline)], device=self.device)
        if self.ctx is not None:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def fit(self) -> list[dict[str, Any]]:
        """Train to the planned step count (resuming when a checkpoint exists); returns the metric records."""
        r = self.recipe
        resumed = self.resume()
        log = (
            MetricsLog(self.out / METRICS_FILE).start(self.step if resumed else None)
            if self.rank == 0
            else None
        )
        records: list[dict[str, Any]] = []
        probe: list[float] = []
        deadline = self._deadline()
        with TrainProgress(self.total_steps, self.step, self.quiet or self.rank != 0) as bar:
            if resumed:
                bar.note(f"resumed from step {self.step} of {self.total_steps}")
            while self.step < self.total_steps and not self._out_of_time(deadline):
                record = self.train_step()
                if r.time_limit_minutes is not None:
                    probe.append(time.perf_counter())  # the first step (warm-up allocations) is not timed
                    if (
                        not self.planned
                        and len(probe) > PROBE_STEPS
                        or self.planned
                        and len(probe) > REPLAN_EVERY
                    ):
                        before = self.total_steps
                        self._plan([b - a for a, b in zip(probe, probe[1:])])
                        probe = probe[-1:]
                        if abs(self.total_steps - before) > 0.05 * before:
                            bar.note(f"time limit: {self.total_steps} steps fit")
                step = self.step
                if r.eval_every and step % r.eval_every == 0 and step < self.total_steps:
                    record["val_lm"] = self.validation_loss()
                if r.checkpoint_every and step % r.checkpoint_every == 0:
                    self.save()
                records.append(record)
                if log is not None and (
                    record["step"] % r.log_every == 0 or "skipped" in record or "val_lm" in record
                ):
                    log.write(record)
                bar.update(record, self.total_steps)
        with self.phase("saving the final checkpoint"):
            self.save()
        return records

    def finish(self) -> dict[str, Any]:
        """Validation loss vs the unigram baseline, samples, plots and the HF export (rank 0 writes)."""
        with self.phase(f"evaluating: validation loss on {sum(map(len, self.val_batches))} windows"):
            val = self.validation_loss()
        full = full_state_dict(self.model, self.ctx)
        summary: dict[str, Any] = {}
        if self.rank == 0:
            model = GLM5ForCausalLM(self.model.config)
            model.load_state_dict(full)
            model.configure_attention(dsa=self.recipe.stages[-1].dsa)
            model.eval()
            tasks = sum(self.recipe.eval_tasks.values())
            with self.phase(f"evaluating: unigram baseline, samples and {tasks} held-out chat tasks"):
                baseline = ev.unigram_baseline(
                    self.train_file, self.val_data, self.val_batches, self.tok.vocab_size
                )
                samples = ev.evaluate_samples(
                    model, self.tok, self.recipe.sample_tokens, self.recipe.eval_tasks
                )
            with self.phase(f"exporting the model to {self.out / EXPORT_DIR}, plots and summary.json"):
                ev.export_hf(model, self.tok, self.out / EXPORT_DIR)
                summary = {
                    "step": self.step,
                    "val_lm": val,
                    "unigram_baseline": baseline,
                    "val_perplexity": ev.perplexity(val),
                    "skipped_steps": self.skipped,
                    "expert_load": self.last_load.tolist(),
                    "dtype": str(self.dtype).removeprefix("torch."),
                    **samples,
                }
                MetricsLog(self.out / METRICS_FILE).write(
                    {
                        "kind": "eval",
                        "step": self.step,
                        "val_lm": val,
                        "baseline": baseline,
                        "dtype": str(self.dtype).removeprefix("torch."),
                    }
                )
                self._plots(baseline)
                (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self._barrier()
        return summary

    def _plots(self, baseline: float) -> None:
        records = read_metrics(self.out / METRICS_FILE)
        plot_losses(records, self.out / "loss.png", baseline)
        names = [
            f"layer {m.layer_idx}" if m.layer_idx < self.model.config.num_hidden_layers else "MTP"
            for m in self._moe_layers()
        ]
        plot_expert_load(records, self.last_load.tolist(), self.out / "expert_load.png", names)

    def run(self) -> dict[str, Any]:
        self.fit()
        return self.finish()
