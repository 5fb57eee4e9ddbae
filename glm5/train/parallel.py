"""Parallelism applied from outside to the single-device model (torchtitan order): expert parallel, then
activation checkpointing, then FSDP2 (`fully_shard`). Runs under `torchrun` on CPU (gloo) and GPU (nccl).

Device mesh (dp_mod_ep, ep) over all processes:
- expert parallel: each MoE layer's fused experts [E, ...] are sharded along dim 0 over "ep" (a DTensor
  with Shard(0)); tokens travel to their experts' process and back with two all_to_alls per layer;
- FSDP2: every other parameter is sharded over all processes; the experts additionally over "dp_mod_ep"
  when it is larger than 1.
Gradients are summed, not averaged (the losses are normalised by the global token count, see pretrain.py),
so N processes with B/N sequences each reproduce one process with B sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

from glm5.kernels.grouped_mm import grouped_mm
from glm5.model.model import DecoderLayer, GLM5ForCausalLM
from glm5.model.moe import Experts


@dataclass
class DistContext:
    """Where this process sits in a multi-process run."""

    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh
    """1-D mesh "dp" over every process (FSDP of the dense parameters, metric reductions)."""
    ep_mesh: DeviceMesh
    """2-D mesh ("dp_mod_ep", "ep")."""

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(ep: int | None = None) -> DistContext | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...); None when run as one process.

    ep: expert-parallel degree (default: every process); it must divide the world size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    ep = world if ep is None else ep
    if ep < 1 or world % ep:
        raise ValueError(f"expert-parallel degree {ep} must divide the number of processes {world}")
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))
    return DistContext(rank, world, device, mesh, ep_mesh)


def shutdown(ctx: DistContext | None) -> None:
    """Wait for every process, then leave the process group."""
    if ctx is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ExpertParallelExperts(Experts):
    """`Experts` with dim 0 sharded over an expert-parallel group: dispatch -> local grouped GEMMs -> combine.

    Same arithmetic as `Experts.forward`: every (token, expert) pair is computed once by the process that
    owns the expert, in the order of the global batch, and added back to its token.
    """

    def __init__(self, experts: Experts, mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)
        self.num_experts = experts.num_experts
        self.ep_size = mesh.size()
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"{self.num_experts} experts cannot be split over {self.ep_size} expert-parallel ranks"
            )
        self.num_local = self.num_experts // self.ep_size
        self.mesh = mesh
        self.gate_up_proj = nn.Parameter(distribute_tensor(experts.gate_up_proj.detach(), mesh, [Shard(0)]))
        self.down_proj = nn.Parameter(distribute_tensor(experts.down_proj.detach(), mesh, [Shard(0)]))

    def forward(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        group, ep, local = self.mesh.get_group(), self.ep_size, self.num_local
        top_k = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts)  # pairs per global expert (rank-major)
        recv_counts = torch.empty_like(counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, counts, group=group)
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_counts.view(ep, local).sum(1).tolist()  # one host sync, as in grouped_mm
        x_recv = _all_to_all(x_ND.index_select(0, token_of), recv_splits, send_splits, group)
        # received rows are grouped [source][expert]; the grouped GEMM wants [expert][source]
        expert_of_row = torch.arange(local, device=x_ND.device).repeat(ep).repeat_interleave(recv_counts)
        perm = expert_of_row.argsort(stable=True)
        local_counts = recv_counts.view(ep, local).sum(0)
        gate, up = grouped_mm(x_recv[perm], self.gate_up_proj.to_local(), local_counts).chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, self.down_proj.to_local(), local_counts)
        y_recv = torch.empty_like(y).index_copy(0, perm, y)  # back to [source][expert]
        y_sorted = _all_to_all(y_recv, send_splits, recv_splits, group)
        y_sorted = y_sorted * weights.reshape(-1)[order, None].to(y_sorted.dtype)
        # bf16 GEMMs under autocast
        return torch.zeros_like(x_ND).index_add_(0, token_of, y_sorted.to(x_ND.dtype))


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:  # noqa: ANN001
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)


def _moe_layers(model: GLM5ForCausalLM) -> list[DecoderLayer]:
    return [
        m
        for m in model.modules()
        if isinstance(m, DecoderLayer) and isinstance(getattr(m.mlp, "experts", None), Experts)
    ]


def apply_expert_parallel(model: GLM5ForCausalLM, mesh: DeviceMesh) -> None:
    """Replace every MoE layer's experts by an expert-parallel shard over the 1-D mesh `mesh`."""
    for layer in _moe_layers(model):
        layer.mlp.experts = ExpertParallelExperts(layer.mlp.experts, mesh)


def apply_activation_checkpointing(model: GLM5ForCausalLM) -> None:
    """Recompute every decoder layer (MTP included) in the backward pass instead of keeping its activations.

    The instance's `forward` is wrapped (not the module), so parameter names and checkpoints are unchanged.
    """
    for layer in model.modules():
        if isinstance(layer, DecoderLayer) and not getattr(layer, "_glm5_checkpointed", False):
            inner = layer.forward
            layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
            layer._glm5_checkpointed = True


def apply_fsdp(model: GLM5ForCausalLM, ctx: DistContext) -> None:
    """FSDP2 per main decoder layer, then the root: embedding, final norm, LM head and the MTP module (the
    model calls the MTP module's `shared_head.norm` outside its forward, so it must stay with the root, which
    keeps its parameters unsharded from forward to backward)."""
    dp_mod_ep = ctx.ep_mesh["dp_mod_ep"]
    ignored: set[nn.Parameter] = set()
    for layer in _moe_layers(model):
        experts = layer.mlp.experts
        if isinstance(experts, ExpertParallelExperts):
            if dp_mod_ep.size() > 1:
                fully_shard(experts, mesh=dp_mod_ep)
            else:  # each expert lives on one process already; its gradient arrives complete via all_to_all
                ignored |= set(experts.parameters())
    for layer in model.model.layers:
        fully_shard(layer, mesh=ctx.mesh, ignored_params=ignored & set(layer.parameters()) or None)
    fully_shard(model, mesh=ctx.mesh, ignored_params=ignored & set(model.mtp.parameters()) or None)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum: the loss is already divided by the global count
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def parallelize(
    model: GLM5ForCausalLM, ctx: DistContext | None, activation_checkpointing: bool
) -> GLM5ForCausalLM:
    """Expert parallel -> activation checkpointing -> FSDP2 (each only where it applies)."""
    if ctx is not None and ctx.ep_mesh["ep"].size() > 1:
        apply_expert_parallel(model, ctx.ep_mesh["ep"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if ctx is not None:
        apply_fsdp(model, ctx)
    return model


def full_state_dict(model: nn.Module, ctx: DistContext | None) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU: on rank 0 (empty elsewhere) in a multi-process run."""
    if ctx is None:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def all_reduce_sum(t: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """Sum over processes (in place; identity in one process)."""
    if ctx is not None:
        dist.all_reduce(t, group=ctx.group)
    return t
