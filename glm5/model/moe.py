"""GLM-5 Mixture of Experts: fp32 sigmoid router with bias-corrected top-k, fused 3-D experts, a shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5.config import GLM5Config
from glm5.kernels.grouped_mm import grouped_mm
from glm5.model.layers import MLP


@dataclass
class RouterStats:
    """What training needs from one MoE layer's router (docs/model.md § Router)."""

    scores: torch.Tensor
    """[N, E] fp32 sigmoid scores, with grad (for a sequence-wise balance loss)."""
    topk_idx: torch.Tensor
    """[N, K] chosen experts."""
    expert_load: torch.Tensor
    """[E] fp32 number of tokens routed to each expert (detached; drives the bias update)."""


class Router(nn.Module):
    """Sigmoid scores in fp32; `e_score_correction_bias` only changes which experts are chosen, never their weights."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # A buffer, not a parameter: it is moved by the balancing rule outside the gradient, in fp32 always
        # (bf16 would swallow the 1e-3 updates).
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
        )

    def _apply(self, fn, recurse=True):  # keep the bias fp32 through model.to(torch.bfloat16)
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] fp32, expert ids [N, K], sigmoid scores [N, E] fp32)."""
        scores = F.linear(x_ND.float(), self.weight.float()).sigmoid()
        weights, topk_idx = self.route(scores)
        return weights, topk_idx, scores

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores [N, E] fp32 -> (weights [N, K] fp32, expert ids [N, K]): bias-corrected (group-limited)
        top-k choice, weights from the uncorrected scores."""
        choice = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(-1, self.num_experts)
        topk_idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, topk_idx


class Experts(nn.Module):
    """All routed experts as two fused 3-D parameters (HF 5.x layout): gate_up [E, 2F, D] (gate first),
    down [E, D, F]."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(cfg.n_routed_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        )
        self.down_proj = nn.Parameter(
            torch.empty(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        )

    def forward(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A few tokens without grad (decode) run per (token, choice) pair; otherwise sorted by expert."""
        if topk_idx.numel() <= self.num_experts and not torch.is_grad_enabled():
            if x_ND.device.type == "cpu":
                return self.forward_few(x_ND, topk_idx, weights)
            return self.forward_gathered(x_ND, topk_idx, weights)
        return self.forward_sorted(x_ND, topk_idx, weights)

    def forward_few(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One GEMV per (token, choice) pair on views of the chosen experts (CPU decode).

        Reading the ids on the host is free on CPU and the views copy no weights, unlike `forward_gathered`;
        it also skips the sort, bincount and per-expert split/unbind of `forward_sorted`, which at one token
        cost more than the GEMVs themselves (measured: bench-tiny decode on a 2-core AVX2 CPU).
        """
        N, K = topk_idx.shape
        pairs = [(n, e) for n, row in enumerate(topk_idx.tolist()) for e in row]
        xs = x_ND.split(1) if N > 1 else (x_ND,)
        h = torch.cat([F.linear(xs[n], self.gate_up_proj[e]) for n, e in pairs])  # [N*K, 2F]
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = torch.cat([F.linear(a, self.down_proj[e]) for a, (_, e) in zip(act.split(1), pairs)])
        return (y.view(N, K, -1) * weights.to(y.dtype).unsqueeze(-1)).sum(1).to(x_ND.dtype)

    def forward_gathered(
        self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Gather the chosen experts' weights ([N*K, 2F, D]), run batched GEMVs: no host sync (GPU decode)."""
        N, K = topk_idx.shape
        flat = topk_idx.reshape(-1)
        x_rows = x_ND.repeat_interleave(K, dim=0).unsqueeze(-1)  # [N*K, D, 1]
        gate, up = torch.bmm(self.gate_up_proj.index_select(0, flat), x_rows).squeeze(-1).chunk(2, dim=-1)
        act = (F.silu(gate) * up).unsqueeze(-1)  # [N*K, F, 1]
        y = torch.bmm(self.down_proj.index_select(0, flat), act).view(N, K, -1)
        return (y * weights.to(y.dtype).unsqueeze(-1)).sum(1).to(x_ND.dtype)

    def forward_sorted(
        self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Sort the N*K (token, expert) pairs by expert, run each expert once on its rows, scatter-add back."""
        num_tokens, top_k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        x_sorted = x_ND.index_select(0, token_of)
        gate_up_w, down_w = self.gate_up_proj, self.down_proj
        device = x_ND.device.type
        if torch.is_autocast_enabled(device):
            # cast the rows and each 3-D weight once, not per expert call (slices of a cast tensor are the casts
            # of the slices: the same values and gradients, a few large casts instead of ~4 per expert)
            dtype = torch.get_autocast_dtype(device)
            x_sorted, gate_up_w, down_w = x_sorted.to(dtype), gate_up_w.to(dtype), down_w.to(dtype)
        gate, up = grouped_mm(x_sorted, gate_up_w, counts).chunk(2, dim=-1)
        y_sorted = grouped_mm(F.silu(gate) * up, down_w, counts)
        y_sorted = y_sorted * weights.reshape(-1)[order, None].to(y_sorted.dtype)
        # autocast may compute in bf16
        return torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted.to(x_ND.dtype))

    def forward_naive(
        self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Per-token, per-choice loop: the slow twin of every `forward_*` path, for tests."""
        out = torch.zeros_like(x_ND)
        for n in range(x_ND.shape[0]):
            for k in range(topk_idx.shape[1]):
                e = int(topk_idx[n, k])
                gate, up = (self.gate_up_proj[e] @ x_ND[n]).chunk(2)
                out[n] += weights[n, k].to(x_ND.dtype) * (self.down_proj[e] @ (F.silu(gate) * up))
        return out


class MoE(nn.Module):
    """y = sum_k g_k Expert_{i_k}(x) + SharedExpert(x) (the shared expert is neither gated nor scaled)."""

    def __init__(self, cfg: GLM5Config) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor, want_stats: bool = False) -> tuple[torch.Tensor, RouterStats | None]:
        x_ND = x.reshape(-1, x.shape[-1])
        weights, topk_idx, scores = self.gate(x_ND)
        y = self.experts(x_ND, topk_idx, weights).view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        stats = None
        if want_stats:
            load = torch.bincount(topk_idx.reshape(-1), minlength=self.experts.num_experts).float()
            stats = RouterStats(scores=scores, topk_idx=topk_idx, expert_load=load)
        return y, stats
