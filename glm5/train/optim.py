"""Optimisers for pre-training: AdamW (or Muon + AdamW) parameter groups, warm-up + cosine schedule, and a
gradient-norm clip that works on plain, FSDP-sharded and expert-parallel parameters alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_indexer_param(name: str) -> bool:
    """DSA indexer parameters learn only from the indexer KL loss, with their own learning rate."""
    return ".indexer." in name


def param_groups(
    model: nn.Module, lr: float, indexer_lr: float, weight_decay: float, muon: bool
) -> list[dict]:
    """Groups: main matrices (decayed; Muon when asked, except the embedding and the LM head), main vectors
    (norms: no decay), and the same two for the indexers. Each group keeps its peak lr in `base_lr`."""
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        indexer = is_indexer_param(name)
        matrix = p.ndim >= 2
        use_muon = muon and matrix and not indexer and "embed_tokens" not in name and "lm_head" not in name
        groups.setdefault((indexer, matrix, use_muon), []).append(p)
    out = []
    for (indexer, matrix, use_muon), params in sorted(groups.items()):
        peak = indexer_lr if indexer else lr
        out.append(
            {
                "params": params,
                "lr": peak,
                "base_lr": peak,
                "weight_decay": weight_decay if matrix else 0.0,
                "use_muon": use_muon,
                "indexer": indexer,
            }
        )
    return out


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then a cosine from 1 down to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of g (batched over experts): Muon's quintic iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.transpose(-2, -1)
        x = a * x + (b * s + c * s @ s) @ x
    return (x.transpose(-2, -1) if transposed else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on groups with `use_muon` (momentum, Newton-Schulz orthogonalised update, scaled by
    0.2 * sqrt(max(rows, cols)) so that AdamW's learning rate carries over), AdamW on the others.

    torch.optim.Muon handles only 2-D parameters; the fused experts are 3-D [E, out, in] and are
    orthogonalised per expert here. One optimizer (not two) keeps the checkpoint a single state dict.
    """

    def __init__(
        self, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float = 0.95
    ) -> None:
        super().__init__(
            groups, dict(lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, momentum=momentum, use_muon=False)
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g, state = _local(p), _local(p.grad), self.state[p]
                w.mul_(1 - lr * wd)
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.lerp_(g, 1 - group["momentum"])
                    update = _newton_schulz(g.lerp(buf, group["momentum"]))  # Nesterov
                    w.add_(update, alpha=-lr * 0.2 * math.sqrt(max(g.shape[-2:])))
                    continue
                beta1, beta2 = group["betas"]
                if not state:
                    state["step"] = torch.zeros(())
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                w.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def build_optimizer(model: nn.Module, recipe, distributed: bool) -> torch.optim.Optimizer:  # noqa: ANN001
    """AdamW (torch's, foreach) or MuonAdamW over `param_groups`."""
    muon = recipe.optimizer == "muon"
    if muon and distributed:
        raise ValueError(
            "optimizer 'muon' needs whole matrices; it is not supported with FSDP yet: use 'adamw'"
        )
    groups = param_groups(model, recipe.lr, recipe.indexer_lr, recipe.weight_decay, muon)
    if muon:
        return MuonAdamW(groups, lr=recipe.lr, betas=recipe.betas)
    for g in groups:
        g.pop("use_muon")
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=1e-8, foreach=True)


def clip_grad_norm(
    params: Iterable[nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Clip the global gradient norm of `params` in place; returns the norm before clipping (fp32 scalar).

    Every element of every parameter must live on exactly one process (plain parameters in one process; FSDP
    or expert-parallel shards across processes), so the global norm is the all-reduced sum of local squares.
    torch's clip_grad_norm_ cannot mix DTensors of different meshes (FSDP and EP), hence this version.
    A non-finite norm is returned as is and nothing is scaled (the caller skips the step). `device` is where
    the norm is reduced (the process group's device).
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        total = total + torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().to(device)
    if group is not None:
        dist.all_reduce(total, group=group)
    norm = total.sqrt()
    if max_norm > 0 and grads and torch.isfinite(norm):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return norm
