"""Tensor- and expert-parallel inference of GLM5ForCausalLM, applied after building the one-device model.

`shard_model` (gpt-fast / torchtitan style) swaps each module of a built model for its local part, in place,
on a materialised model (the slices are copied out) or on the meta device (shapes only; `load_sharded` then
fills the local tensors from the checkpoint's byte ranges, glm5.checkpoint.sharded). The model code stays
single-device: attention reads its local head count, the experts their local count.

Layout: t = tp_size, e = ep_size, W = t x e processes, global rank = ep_rank * t + tp_rank (a TP group is t
consecutive ranks, e.g. one node). Every process runs every token (same inputs, same cache positions):

| part | split | collective per call |
|---|---|---|
| embed_tokens | vocabulary rows over the TP group (ceil(V/t) each, zero padding) | masked lookup, all-reduce (TP) |
| q_a_proj, kv_a_proj_with_mqa, their norms, the indexer | replicated | - |
| q_b_proj, kv_b_proj | by heads over the TP group (H/t heads each) | - |
| o_proj | row-parallel (its H/t heads' input columns) | all-reduce (TP) |
| latent + indexer-key cache | replicated: every rank computes the same latent | - |
| dense MLP | column (gate, up) / row (down) over the TP group | all-reduce (TP) |
| router (fp32) + e_score_correction_bias | replicated | - |
| routed experts | E/W consecutive experts per rank, over all W ranks | one all-reduce (all W ranks) for |
| shared expert | column / row over all W ranks | routed + shared partial sums together |
| lm_head | vocabulary rows over the TP group | all-gather of the logits (TP), padding cut |
| MTP layer | like a decoder layer; embedding and head are the main model's | as above |

So with t x e ranks attention is split t ways and replicated e ways, while the MoE layers (97% of GLM-5's
weights) are split over all W ranks, as DeepSeek-V3's reference (experts over the whole world, shared
expert split like a TP MLP) and vLLM's `--enable-expert-parallel` (EP = all ranks) divide them. Because
every rank holds every token, the experts need no all-to-all: each rank runs the tokens routed to its own
experts and one all-reduce sums them (DeepSeek's reference does the same).

Data-parallel attention (`data_parallel=True`: the e TP groups are d = e data-parallel ranks, each serving its
own requests with its own cache): the weights are split as above except the shared expert, which is split over
the TP group only (like a dense MLP: every DP rank runs it on its own tokens, + all-reduce over TP). The routed
experts stay divided over all W ranks, and the tokens travel to them through `MoEDispatcher`: "alltoall" (the
default) sends each (token, expert) pair only to the rank that owns the expert, and the results back to every rank
of the DP rank that sent it (one rank per DP rank sends, so its TP peers get the same bits); "allgather" all-gathers
every DP rank's tokens with their routing, each rank runs its experts on all of them, and the partial outputs go
back with one all-to-all, summed at the destination in rank order (a reduce-scatter whose sum order is fixed, so
the t TP ranks of a DP rank get the same bits). All-to-all moves a token to at most top-k ranks, all-gather to all
W (measured on gloo in docs/engine.md: all-to-all faster in most cases on 4 ranks, all-gather a little on 2).
Every call starts with a small all-gather of (tokens, layer, active) from every rank, so a rank computes each
peer's tokens with the experts of the layer that peer is in; a rank whose step has no more forwards keeps answering
calls with zero tokens (`finish_step`, the dummy step) until every rank is done: the collectives stay in lockstep.

Rules (`check_layout`, enforced before anything is read; `LayoutError` names the rule):
heads % t == 0 (so t <= heads); n_routed_experts % W == 0; intermediate_size % t == 0 (dense layers);
moe_intermediate_size * n_shared_experts % W == 0; attention_bias needs t == 1 (a row-parallel bias would be
added t times); with FP8 weights kept in e4m3, every split must fall on 128-element block boundaries
(heads/t * qk_head_dim, heads/t * (qk_nope + v), heads/t * v_head_dim, intermediate/t, shared/W all
multiples of 128 when split) - otherwise load with fp8="dequantize" (a split of dequantised weights can
fall anywhere). A vocabulary that t does not divide is padded (zero rows, cut from the gathered logits).
GLM-5 (64 heads, 256 experts, shared expert 2048 wide, dense 12288, vocab 154880) takes any t | 64 with
W | 256 in BF16; with FP8 kept, W <= 16 (the shared expert's 2048 columns are 16 blocks; t = 32 would also
split them into 64) and t in {1, 2, 4, 8, 16}.

Determinism: the replicated modules (router, indexer, norms) must compute bit-identical results on every
rank, or ranks would route a token to different experts / attend to different keys. They do when their
inputs are identical and their kernels deterministic: the residual stream is identical on every rank
because every collective that produces it hands all ranks the same bits (gloo's and NCCL's ring and tree
all-reduces reduce each element once and broadcast the result; the tests check it on gloo, bit for bit).
`topk_sync="check"` verifies the indexer's top-k and the router's choice against rank 0 at every call;
`"broadcast"` adopts rank 0's (DeepSeek V3.2's reference broadcasts and asserts).

Collectives per forward (what a multi-process executor drives; every rank must call forward with the same
input_ids and cache state): 1 all-reduce (TP) for the embedding, per decoder layer 1 all-reduce (TP) after
o_proj plus 1 all-reduce (TP) for a dense MLP or 1 all-reduce (all W ranks) for an MoE layer, and 1
all-gather (TP) per lm_head call (the main head and each MTP step). Sizes > 1 only; GLM-5 at TP8:
1 + 78 x 2 + 1 = 158 collectives per forward, each of [tokens, 6144] activations except the [tokens, 154880]
logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint.pretrained import _routers_to_fp32
from glm5.checkpoint.sharded import ShardSlice, check_block_aligned, load_pretrained_sharded
from glm5.config import GLM5Config
from glm5.model.attention import MLAttention
from glm5.model.fp8 import FP8Experts, FP8Linear, quantize_model
from glm5.model.layers import MLP
from glm5.model.model import DecoderLayer, GLM5ForCausalLM
from glm5.model.moe import MoE, RouterStats

TOPK_SYNC = ("off", "check", "broadcast")
DISPATCH = ("alltoall", "allgather")
"""MoE token dispatch under data-parallel attention (module docstring); the first is the default."""
FP8_BLOCK = 128


class LayoutError(ValueError):
    """A parallel layout the model cannot take; the message names the rule."""


@dataclass(frozen=True)
class ShardLayout:
    """Where one process sits: tensor-parallel rank within its TP group, and which TP group (ep_rank)."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.ep_size < 1:
            raise LayoutError(f"tp_size={self.tp_size} and ep_size={self.ep_size} must both be at least 1")
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.ep_rank < self.ep_size):
            raise LayoutError(
                f"tp_rank={self.tp_rank} / ep_rank={self.ep_rank} out of range for tp_size="
                f"{self.tp_size} / ep_size={self.ep_size}"
            )

    @property
    def world_size(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def rank(self) -> int:
        """Global rank: TP groups are consecutive ranks."""
        return self.ep_rank * self.tp_size + self.tp_rank

    @classmethod
    def from_rank(cls, rank: int, tp_size: int, ep_size: int = 1) -> ShardLayout:
        return cls(rank % tp_size, tp_size, rank // tp_size, ep_size)


@dataclass
class ParallelGroups:
    """Process groups of one rank: its TP group (attention, dense MLP, vocabulary) and the MoE group (all
    t x e ranks: experts, shared expert, top-k agreement). None where the size is 1."""

    tp: dist.ProcessGroup | None = None
    moe: dist.ProcessGroup | None = None


def init_groups(tp_size: int, ep_size: int = 1) -> ParallelGroups:
    """Create the groups of the layout in the initialised default group (a collective: every rank calls it).
    The default group must have exactly tp_size * ep_size ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp_size * ep_size:
        raise LayoutError(f"the process group has {world} ranks; tp_size x ep_size = {tp_size * ep_size}")
    tp = None
    if tp_size > 1:
        if ep_size == 1:
            tp = dist.group.WORLD
        else:
            for e in range(ep_size):  # every rank creates every group, in the same order
                ranks = list(range(e * tp_size, (e + 1) * tp_size))
                group = dist.new_group(ranks)
                if rank in ranks:
                    tp = group
    return ParallelGroups(tp=tp, moe=dist.group.WORLD if world > 1 else None)


# --- layout rules ---------------------------------------------------------------------------------
def check_layout(
    cfg: GLM5Config, layout: ShardLayout, fp8: bool = False, data_parallel: bool = False
) -> None:
    """Refuse a layout the model cannot take (LayoutError naming the rule). fp8: weights stay e4m3.
    data_parallel: the ep_size TP groups are data-parallel ranks (the shared expert is then split over TP only)."""
    t, W = layout.tp_size, layout.world_size
    S = t if data_parallel else W  # the ranks the shared expert is split over
    H, E = cfg.num_attention_heads, cfg.n_routed_experts
    if t > H:
        raise LayoutError(
            f"tp_size={t} is more tensor-parallel ranks than num_attention_heads={H}: attention is "
            "split by heads and every rank needs at least one (rule: tp_size <= heads)"
        )
    if H % t:
        raise LayoutError(
            f"tp_size={t} does not divide num_attention_heads={H}: attention is split by heads "
            "(rule: heads % tp_size == 0)"
        )
    if E % W:
        raise LayoutError(
            f"tp_size x ep_size = {W} does not divide n_routed_experts={E}: the routed experts are "
            "divided over all ranks (rule: n_routed_experts % (tp_size x ep_size) == 0)"
        )
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if dense and cfg.intermediate_size % t:
        raise LayoutError(
            f"tp_size={t} does not divide intermediate_size={cfg.intermediate_size}: the dense MLP is "
            "split column/row over the TP group (rule: intermediate_size % tp_size == 0)"
        )
    shared = cfg.moe_intermediate_size * cfg.n_shared_experts
    if shared % S:
        over = "tp_size" if data_parallel else "tp_size x ep_size"
        raise LayoutError(
            f"{over} = {S} does not divide the shared expert's width {shared} (moe_"
            f"intermediate_size x n_shared_experts): it is split over those ranks (rule: shared % "
            f"({over}) == 0)"
        )
    if cfg.attention_bias and t > 1:
        raise LayoutError(
            "attention_bias=True with tp_size > 1: o_proj is row-parallel, its bias would be added "
            "once per rank (rule: attention_bias needs tp_size == 1; GLM-5 has none)"
        )
    if fp8:
        h = H // t
        splits = [
            (t, "q_b_proj rows (heads/tp x qk_head_dim)", h * cfg.qk_head_dim),
            (
                t,
                "kv_b_proj rows (heads/tp x (qk_nope_head_dim + v_head_dim))",
                h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            ),
            (t, "o_proj columns (heads/tp x v_head_dim)", h * cfg.v_head_dim),
            (S, "shared expert width / its ranks", shared // S),
        ]
        if dense:
            splits.append((t, "dense MLP intermediate_size / tp_size", cfg.intermediate_size // t))
        for parts, what, chunk in splits:
            if parts > 1 and chunk % FP8_BLOCK:
                raise LayoutError(
                    f"fp8='keep' with tp_size={t}, ep_size={layout.ep_size}: {what} = {chunk} per rank "
                    f"is not a multiple of the {FP8_BLOCK}-element FP8 block, so the weight_scale_inv "
                    "blocks cannot be split with the weights (rule: FP8-kept splits fall on 128-blocks); "
                    "load with fp8='dequantize' or use fewer ranks"
                )


# --- collectives ----------------------------------------------------------------------------------
class _Comm:
    """One process group and its size; every collective is a no-op at size 1."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, what: str) -> None:
        self.group, self.size, self.what = group, size, what
        self.checks = 0

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError(
                f"this sharded model has no {self.what} process group: pass `groups` to shard_model "
                "(or initialise torch.distributed before sharding)"
            )
        return self.group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self._group())
        return x

    def all_gather_last(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        """Concatenate every rank's x along the last dim, cut to `keep` columns."""
        if self.size == 1:
            return x[..., :keep]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self._group())
        return torch.cat(parts, dim=-1)[..., :keep]

    def agree(self, x: torch.Tensor, mode: str, what: str) -> torch.Tensor:
        """topk_sync: "check" raises on every rank if any rank's x differs from rank 0's; "broadcast" returns
        rank 0's."""
        if self.size == 1 or mode == "off":
            return x
        group = self._group()
        src = dist.get_global_rank(group, 0)
        x = x.contiguous()
        if mode == "broadcast":
            dist.broadcast(x, src=src, group=group)
            return x
        ref = x.clone()
        dist.broadcast(ref, src=src, group=group)
        bad = torch.tensor([0 if torch.equal(ref, x) else 1], dtype=torch.int32, device=x.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        self.checks += 1
        if bad.item():
            raise RuntimeError(
                f"{what} differs between ranks (first seen on rank {dist.get_rank()} vs rank {src}): "
                "the replicated computation is not deterministic here; use topk_sync='broadcast'"
            )
        return x


# --- local modules --------------------------------------------------------------------------------
def _take(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """A new tensor holding t[start:stop] along dim (rows past t's end are zero); shape only on meta."""
    shape = list(t.shape)
    shape[dim] = stop - start
    if t.device.type == "meta":
        return torch.empty(shape, dtype=t.dtype, device="meta")
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    real = max(0, min(stop, t.shape[dim]) - start)
    if real:
        out.narrow(dim, 0, real).copy_(t.narrow(dim, start, real))
    return out


def _param(old: nn.Parameter, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new, requires_grad=old.requires_grad)


def _slice_linear(
    name: str, lin: nn.Module, dim: int, start: int, stop: int, slices: dict[str, ShardSlice]
) -> None:
    """Keep rows (dim 0, column-parallel) or input columns (dim 1, row-parallel) [start, stop) of a Linear
    (or of an FP8Linear together with its scale blocks)."""
    spec = ShardSlice(dim, start, stop)
    if isinstance(lin, FP8Linear):
        q = lin._buffers["weight"]
        problem = check_block_aligned(f"{name}.weight", spec, q.shape[dim])
        if problem:
            raise LayoutError(f"fp8='keep': {problem}; dequantise that weight first")
        blocks = spec.blocks(q.shape[dim])
        lin._buffers["weight"] = _take(q, dim, start, stop)
        lin._buffers["weight_scale_inv"] = _take(lin.weight_scale_inv, dim, blocks.start, blocks.stop)
        slices[f"{name}.weight_scale_inv"] = blocks
    else:
        lin.weight = _param(lin.weight, _take(lin.weight, dim, start, stop))
    if lin.bias is not None:
        if dim != 0:
            raise LayoutError(f"{name} has a bias and is row-parallel: its bias would be added once per rank")
        lin.bias = _param(lin.bias, _take(lin.bias, 0, start, stop))
        slices[f"{name}.bias"] = ShardSlice(0, start, stop)
    if dim == 0:
        lin.out_features = stop - start
    else:
        lin.in_features = stop - start
    slices[f"{name}.weight"] = spec


def _shard_mlp(name: str, mlp: MLP, parts: int, index: int, slices: dict[str, ShardSlice]) -> None:
    """SwiGLU MLP: gate/up rows and down columns [index*w, (index+1)*w), w = width / parts."""
    w = mlp.gate_proj.out_features // parts
    a, b = index * w, (index + 1) * w
    _slice_linear(f"{name}.gate_proj", mlp.gate_proj, 0, a, b, slices)
    _slice_linear(f"{name}.up_proj", mlp.up_proj, 0, a, b, slices)
    _slice_linear(f"{name}.down_proj", mlp.down_proj, 1, a, b, slices)


def _reduce_output(comm: _Comm):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(out)

    return hook


class ShardedMoE(MoE):
    """An MoE layer holding experts [expert_start, expert_start + E/W) and 1/W of the shared expert's width.

    Every rank routes every token (replicated fp32 router), runs the (token, choice) pairs that chose its
    own experts, adds its part of the shared expert, and one all-reduce over the MoE group sums the parts.
    """

    def __init__(self, moe: MoE, expert_start: int, comm: _Comm, topk_sync: str) -> None:
        nn.Module.__init__(self)
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.expert_start = expert_start
        self._comm, self._topk_sync = comm, topk_sync

    def _routed(self, x_ND: torch.Tensor, topk_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        K = topk_idx.shape[1]
        local = topk_idx - self.expert_start
        mine = ((local >= 0) & (local < self.experts.num_experts)).reshape(-1).nonzero().squeeze(1)
        if mine.numel() == 0:
            return torch.zeros_like(x_ND)
        token_of = mine // K
        ids = local.reshape(-1)[mine].unsqueeze(1)
        w = weights.reshape(-1)[mine].unsqueeze(1)
        y = self.experts(x_ND.index_select(0, token_of), ids, w)  # one choice per row: [M, D], weighted
        return torch.zeros_like(x_ND).index_add_(0, token_of, y.to(x_ND.dtype))

    def forward(self, x: torch.Tensor, want_stats: bool = False):
        x_ND = x.reshape(-1, x.shape[-1])
        weights, topk_idx, scores = self.gate(x_ND)
        if self._topk_sync != "off":
            topk_idx = self._comm.agree(topk_idx, self._topk_sync, "the router's expert choice")
            weights = self._comm.agree(weights, self._topk_sync, "the router's weights")
        y = self._routed(x_ND, topk_idx, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_ND)
        y = self._comm.all_reduce(y).view_as(x)
        stats = None
        if want_stats:
            load = torch.bincount(topk_idx.reshape(-1), minlength=self.gate.num_experts).float()
            stats = RouterStats(scores=scores, topk_idx=topk_idx, expert_load=load)
        return y, stats


class MoEDispatcher:
    """The token exchange of the MoE layers under data-parallel attention (see the module docstring).

    One per rank, shared by every `DPShardedMoE` of the model (each registers under a layer id). Every call is
    a collective over all W ranks and starts with an all-gather of (tokens, layer id, active) per rank: each
    rank then runs its local experts for each peer's tokens with the experts of that peer's layer. A rank
    whose step is over calls `finish_step`, which keeps answering calls with zero tokens until every rank is
    done. Counters: `calls` (real calls), `dummy_calls` (calls answered with no tokens of its own) and
    `idle_steps` (steps in which this rank ran no forward but answered its peers)."""

    def __init__(
        self, group: dist.ProcessGroup | None, layout: ShardLayout, mode: str, model: nn.Module
    ) -> None:
        if mode not in DISPATCH:
            raise ValueError(f"dispatch={mode!r}: choose one of {DISPATCH}")
        self.group, self.layout, self.mode = group, layout, mode
        self.W, self.t, self.rank = layout.world_size, layout.tp_size, layout.rank
        self.layers: list[ShardedMoE] = []
        self._model = model
        self.calls = self.dummy_calls = self.idle_steps = 0
        self._step_calls = 0

    def register(self, moe: ShardedMoE) -> int:
        self.layers.append(moe)
        return len(self.layers) - 1

    # --- the protocol ------------------------------------------------------------------------------
    def _meta(self, n: int, layer: int, active: int, device: torch.device) -> list[list[int]]:
        mine = torch.tensor([n, layer, active], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(self.W)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.stack(parts).tolist()

    def _a2a(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    def _template(self) -> tuple[int, int, torch.dtype, torch.device]:
        emb = self._model.model.embed_tokens.weight
        return self._model.config.hidden_size, self._model.config.num_experts_per_tok, emb.dtype, emb.device

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        D, K, dtype, device = self._template()
        return (
            torch.empty(0, D, dtype=dtype, device=device),
            torch.empty(0, K, dtype=torch.int64, device=device),
            torch.empty(0, K, dtype=torch.float32, device=device),
        )

    def exchange(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for this rank's tokens x [N, D] (idx, w: [N, K] global expert ids and
        weights), from every rank's experts."""
        self.calls += 1
        self._step_calls += 1
        meta = self._meta(x.shape[0], layer, 1, x.device)
        return self._run(meta, x, idx, w)

    def finish_step(self) -> None:
        """The dummy step: answer the peers' calls with no tokens until every rank has finished its step."""
        x, idx, w = self._empty()
        answered = 0
        while True:
            meta = self._meta(0, -1, 0, x.device)
            if not any(m[2] for m in meta):
                break
            answered += 1
            self._run(meta, x, idx, w)
        self.dummy_calls += answered
        if answered and not self._step_calls:
            self.idle_steps += 1
        self._step_calls = 0

    def _run(
        self, meta: list[list[int]], x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        if self.mode == "allgather":
            return self._allgather(meta, x, idx, w)
        return self._alltoall(meta, x, idx, w)

    def _allgather(
        self, meta: list[list[int]], x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        W, t, K = self.W, self.t, idx.shape[1]
        N = max(m[0] for m in meta)
        pad = N - x.shape[0]
        route = torch.cat([idx.double(), w.double()], 1)
        xs = [torch.empty(N, x.shape[1], dtype=x.dtype, device=x.device) for _ in range(W)]
        rs = [torch.empty(N, 2 * K, dtype=torch.float64, device=x.device) for _ in range(W)]
        dist.all_gather(xs, F.pad(x, (0, 0, 0, pad)), group=self.group)
        dist.all_gather(rs, F.pad(route, (0, 0, 0, pad)), group=self.group)
        out: dict[int, torch.Tensor] = {}
        for g in range(W // t):  # the t ranks of a DP rank hold the same tokens: compute them once
            s = g * t
            n, layer = meta[s][0], meta[s][1]
            if n:
                r = rs[s][:n]
                out[g] = self.layers[layer]._routed(xs[s][:n], r[:, :K].long(), r[:, K:].float())
        send = torch.cat([out[d // t] if meta[d][0] else x.new_empty(0, x.shape[1]) for d in range(W)])
        recv = self._a2a(send, [m[0] for m in meta], [x.shape[0]] * W)
        return recv.view(W, x.shape[0], x.shape[1]).sum(0) if x.shape[0] else x.clone()

    def _alltoall(
        self, meta: list[list[int]], x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        W, t, K = self.W, self.t, idx.shape[1]
        per_rank = self.layers[0].experts.num_experts
        owner = (idx // per_rank).reshape(-1)
        order = torch.sort(owner, stable=True).indices
        counts = torch.bincount(owner, minlength=W).tolist()
        token_of = torch.div(order, K, rounding_mode="floor")
        lead = self.rank % t == 0  # one rank per DP rank sends its pairs; its TP peers get the results too
        send_counts = counts if lead else [0] * W
        recv_counts = self._a2a(
            torch.tensor(send_counts, dtype=torch.int64, device=x.device), [1] * W, [1] * W
        )
        recv_counts = recv_counts.tolist()
        if lead:
            local = (idx.reshape(-1) - owner * per_rank)[order]
            send_x = x.index_select(0, token_of)
            send_r = torch.stack([local.double(), w.reshape(-1)[order].double()], 1)
        else:
            send_x, send_r = (
                x.new_empty(0, x.shape[1]),
                torch.empty(0, 2, dtype=torch.float64, device=x.device),
            )
        recv_x = self._a2a(send_x, send_counts, recv_counts)
        recv_r = self._a2a(send_r, send_counts, recv_counts)
        ys, off = [], 0
        for s in range(W):
            c = recv_counts[s]
            if c:
                r = recv_r[off : off + c]
                experts = self.layers[meta[s][1]].experts
                ys.append(experts(recv_x[off : off + c], r[:, :1].long(), r[:, 1:].float()).to(x.dtype))
            else:
                ys.append(x.new_empty(0, x.shape[1]))
            off += c
        lead_of = [d - d % t for d in range(W)]
        send_back = torch.cat([ys[lead_of[d]] for d in range(W)])
        back = self._a2a(send_back, [recv_counts[lead_of[d]] for d in range(W)], counts)
        return torch.zeros_like(x).index_add_(0, token_of, back)


class DPShardedMoE(ShardedMoE):
    """An MoE layer under data-parallel attention: this rank's tokens are routed here (router replicated within
    the TP group), dispatched to the experts' ranks by the `MoEDispatcher`, and the shared expert (split over
    the TP group) is added, with one all-reduce over the TP group."""

    def __init__(
        self, moe: MoE, expert_start: int, dispatcher: MoEDispatcher, tp: _Comm, topk_sync: str
    ) -> None:
        super().__init__(moe, expert_start, tp, topk_sync)
        self._dispatcher = dispatcher
        self.layer_id = dispatcher.register(self)

    def forward(self, x: torch.Tensor, want_stats: bool = False):
        x_ND = x.reshape(-1, x.shape[-1])
        weights, topk_idx, scores = self.gate(x_ND)
        if self._topk_sync != "off":
            topk_idx = self._comm.agree(topk_idx, self._topk_sync, "the router's expert choice")
            weights = self._comm.agree(weights, self._topk_sync, "the router's weights")
        y = self._dispatcher.exchange(self.layer_id, x_ND, topk_idx, weights)
        if self.shared_experts is not None:
            y = y + self._comm.all_reduce(self.shared_experts(x_ND))
        y = y.view_as(x)
        stats = None
        if want_stats:
            load = torch.bincount(topk_idx.reshape(-1), minlength=self.gate.num_experts).float()
            stats = RouterStats(scores=scores, topk_idx=topk_idx, expert_load=load)
        return y, stats


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + local rows) of the embedding: ids outside look up zeros, then an
    all-reduce over the TP group adds the one rank's row to zeros (exact)."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, num_embeddings: int, comm: _Comm) -> None:
        super().__init__()
        self.weight = weight
        self.vocab_start, self.num_embeddings, self.embedding_dim = (
            vocab_start,
            num_embeddings,
            weight.shape[1],
        )
        self.real_rows = max(0, min(num_embeddings - vocab_start, weight.shape[0]))
        self._comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.real_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self._comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))

    def extra_repr(self) -> str:
        return (
            f"rows [{self.vocab_start}, {self.vocab_start + self.weight.shape[0]}) of {self.num_embeddings}"
        )


class VocabParallelHead(nn.Module):
    """Rows of lm_head: local logits, all-gathered over the TP group and cut to the vocabulary."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, out_features: int, comm: _Comm) -> None:
        super().__init__()
        self.weight = weight
        self.vocab_start, self.in_features, self.out_features = vocab_start, weight.shape[1], out_features
        self._comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._comm.all_gather_last(F.linear(x, self.weight), self.out_features)

    def extra_repr(self) -> str:
        return f"rows [{self.vocab_start}, {self.vocab_start + self.weight.shape[0]}) of {self.out_features}"


@dataclass
class ShardPlan:
    """What `shard_model` did: the layout, and the slice of the global tensor each sharded tensor holds
    (internal state-dict names; tensors absent here are replicated whole)."""

    layout: ShardLayout
    slices: dict[str, ShardSlice] = field(default_factory=dict)
    groups: ParallelGroups = field(default_factory=ParallelGroups)
    comms: dict[str, _Comm] = field(default_factory=dict)
    data_parallel: bool = False
    """The TP groups are data-parallel ranks (each its own tokens): the MoE layers exchange tokens."""
    dispatcher: MoEDispatcher | None = None
    """The MoE token exchange (data-parallel attention only)."""

    @property
    def topk_checks(self) -> int:
        """How many top-k / routing agreements topk_sync='check' has verified so far."""
        return self.comms["moe"].checks if "moe" in self.comms else 0


def _span(n: int, parts: int, index: int) -> tuple[int, int]:
    w = n // parts
    return index * w, (index + 1) * w


def _wrap_select(indexer: nn.Module, comm: _Comm, mode: str, what: str) -> None:
    select = indexer.select

    def agreed_select(*args, **kwargs):
        return comm.agree(select(*args, **kwargs), mode, what)

    indexer.select = agreed_select


def shard_model(
    model: GLM5ForCausalLM,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    *,
    groups: ParallelGroups | None = None,
    topk_sync: str = "off",
    data_parallel: bool = False,
    dispatch: str = DISPATCH[0],
) -> ShardPlan:
    """Turn a built GLM5ForCausalLM into this rank's shard, in place (see the module docstring for the
    layout); returns the plan, also stored as `model.shard_plan`.

    Works on a materialised model (BF16/FP32, or FP8-kept via glm5.model.fp8: splits must then be block-aligned)
    and on the meta device (shapes only, for `load_sharded` and memory planning). groups: the process groups
    (default: `init_groups` when torch.distributed is initialised, else none: fine on the meta device, a
    forward then raises). topk_sync: "off" | "check" | "broadcast" (module docstring, Determinism).
    data_parallel: the ep_size TP groups are data-parallel ranks, each with its own tokens (data-parallel
    attention; the MoE layers exchange tokens by `dispatch`, "allgather" or "alltoall").
    Raises LayoutError before changing anything when the layout breaks a rule.
    """
    if topk_sync not in TOPK_SYNC:
        raise ValueError(f"topk_sync={topk_sync!r}: choose one of {TOPK_SYNC}")
    if getattr(model, "shard_plan", None) is not None:
        raise ValueError("this model is already sharded")
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch={dispatch!r}: choose one of {DISPATCH}")
    layout = ShardLayout(tp_rank, tp_size, ep_rank, ep_size)
    fp8 = any(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())
    cfg = model.config
    dp = data_parallel and ep_size > 1
    check_layout(cfg, layout, fp8=fp8, data_parallel=dp)
    if groups is None:
        groups = (
            init_groups(tp_size, ep_size)
            if layout.world_size > 1 and dist.is_initialized()
            else ParallelGroups()
        )
    t, W = tp_size, layout.world_size
    tp, moe = _Comm(groups.tp, t, "tensor-parallel"), _Comm(groups.moe, W, "MoE (all ranks)")
    plan = ShardPlan(layout, groups=groups, comms={"tp": tp, "moe": moe}, data_parallel=dp)
    if dp:  # each TP group has its own tokens: agreements stay within it, the MoE layers exchange tokens
        plan.dispatcher = MoEDispatcher(groups.moe, layout, dispatch, model)
        plan.comms["moe"] = tp
    if W == 1:
        model.shard_plan = plan
        return plan
    slices = plan.slices

    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, DecoderLayer)]:
        attn: MLAttention = layer.self_attn
        a = f"{name}.self_attn"
        if attn.indexer is not None and topk_sync != "off":
            _wrap_select(attn.indexer, tp if dp else moe, topk_sync, f"{a}.indexer top-k")
        if t > 1:
            h = attn.num_heads // t
            h0 = tp_rank * h
            qk, kv = attn.nope_dim + attn.rope_dim, attn.nope_dim + attn.v_dim
            _slice_linear(f"{a}.q_b_proj", attn.q_b_proj, 0, h0 * qk, (h0 + h) * qk, slices)
            _slice_linear(f"{a}.kv_b_proj", attn.kv_b_proj, 0, h0 * kv, (h0 + h) * kv, slices)
            _slice_linear(f"{a}.o_proj", attn.o_proj, 1, h0 * attn.v_dim, (h0 + h) * attn.v_dim, slices)
            attn.num_heads = h
            attn.o_proj.register_forward_hook(_reduce_output(tp))
        if isinstance(layer.mlp, MoE):
            experts = layer.mlp.experts
            e0, e1 = _span(experts.num_experts, W, layout.rank)
            names = ["gate_up_proj", "down_proj"]
            if isinstance(experts, FP8Experts):
                names += ["gate_up_proj_scale_inv", "down_proj_scale_inv"]
            for key in names:
                old = getattr(experts, key)
                new = _take(old, 0, e0, e1)
                if isinstance(old, nn.Parameter):
                    setattr(experts, key, _param(old, new))
                else:
                    experts._buffers[key] = new
                slices[f"{name}.mlp.experts.{key}"] = ShardSlice(0, e0, e1)
            experts.num_experts = e1 - e0
            shared = layer.mlp.shared_experts
            if dp:
                if shared is not None and t > 1:
                    _shard_mlp(f"{name}.mlp.shared_experts", shared, t, tp_rank, slices)
                layer.mlp = DPShardedMoE(layer.mlp, e0, plan.dispatcher, tp, topk_sync)
                continue
            if shared is not None:
                _shard_mlp(f"{name}.mlp.shared_experts", shared, W, layout.rank, slices)
            layer.mlp = ShardedMoE(layer.mlp, e0, moe, topk_sync)
        elif t > 1:
            _shard_mlp(f"{name}.mlp", layer.mlp, t, tp_rank, slices)
            layer.mlp.register_forward_hook(_reduce_output(tp))

    if t > 1:
        V = cfg.vocab_size
        rows = math.ceil(V / t)
        v0 = tp_rank * rows
        emb = model.model.embed_tokens
        tied = model.lm_head.weight is emb.weight
        emb_w = _param(emb.weight, _take(emb.weight, 0, v0, v0 + rows))
        model.model.embed_tokens = VocabParallelEmbedding(emb_w, v0, V, tp)
        slices["model.embed_tokens.weight"] = ShardSlice(0, v0, v0 + rows)
        head_w = (
            emb_w if tied else _param(model.lm_head.weight, _take(model.lm_head.weight, 0, v0, v0 + rows))
        )
        model.lm_head = VocabParallelHead(head_w, v0, V, tp)
        slices["lm_head.weight"] = ShardSlice(0, v0, v0 + rows)
    model.shard_plan = plan
    return plan


# --- loading and memory -----------------------------------------------------------------------------
def load_sharded(
    path: str,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    *,
    groups: ParallelGroups | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    fp8: str = "dequantize",
    topk_sync: str = "off",
    data_parallel: bool = False,
    dispatch: str = DISPATCH[0],
) -> GLM5ForCausalLM:
    """This rank's shard of the checkpoint folder at `path` (HF layout, BF16/FP32 or block FP8).

    The layout is checked against config.json first (LayoutError, nothing read); the model is built and
    sharded on the meta device; then only the local shapes are allocated and filled from the byte ranges of
    this rank's slices (glm5.checkpoint.sharded). fp8: "dequantize" (any split) or "keep" (e4m3 weights and
    their scale blocks, splits on 128-blocks). Every rank of the layout must call it (it creates the process
    groups when `groups` is None and torch.distributed is initialised). data_parallel / dispatch: see
    `shard_model`.
    """
    layout = ShardLayout(tp_rank, tp_size, ep_rank, ep_size)

    def shard(model: nn.Module) -> dict[str, ShardSlice]:
        return shard_model(
            model,
            tp_rank,
            tp_size,
            ep_rank,
            ep_size,
            groups=groups,
            topk_sync=topk_sync,
            data_parallel=data_parallel,
            dispatch=dispatch,
        ).slices

    return load_pretrained_sharded(
        path,
        GLM5ForCausalLM,
        shard,
        check=lambda cfg: check_layout(cfg, layout, fp8 == "keep", data_parallel and ep_size > 1),
        dtype=dtype,
        device=device,
        fp8=fp8,
        prepare=quantize_model if fp8 == "keep" else None,
    )


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers, FP8 scales included; a tied
    weight once), meta tensors included."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def rank_weight_bytes(
    cfg: GLM5Config,
    tp_size: int = 1,
    ep_size: int = 1,
    *,
    rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    data_parallel: bool = False,
) -> int:
    """Weight bytes one rank keeps under a layout, computed on the meta device (nothing allocated): the model
    in `dtype` (routers fp32, as loaded), FP8-kept split when fp8. data_parallel: the ep_size TP groups are
    data-parallel ranks (the shared expert split over TP only)."""
    layout = ShardLayout.from_rank(rank, tp_size, ep_size)
    dp = data_parallel and ep_size > 1
    check_layout(cfg, layout, fp8=fp8, data_parallel=dp)
    with torch.device("meta"):
        model = GLM5ForCausalLM(cfg)
    model.to(dtype)
    _routers_to_fp32(model)
    if fp8:
        quantize_model(model)
    shard_model(
        model, layout.tp_rank, tp_size, layout.ep_rank, ep_size, groups=ParallelGroups(), data_parallel=dp
    )
    return state_bytes(model)
