"""The decode step in far fewer, larger operations: one new token per sequence, weights read as the model holds them.

At decode a GLM-5 layer multiplies a handful of vectors by small matrices, so on a CPU the time goes into
operator dispatch (~600 eager ops per step of the 4-layer bench model) and into streaming the weights, not
arithmetic. `FusedDecoder` runs the same step as `GLM5ForCausalLM.forward` with a cache and T = 1:

- with the native kernel (glm5/kernels/decode_layer.c, built and loaded by glm5.kernels.native; the default on a
  CPU with a C compiler) a decode step -- every decoder layer, the final norm and lm_head; or an MTP layer -- is
  one C call (`glm5_decode_step`; each layer `glm5_decode_layer` inside it) that reads every weight matrix in
  the format it is stored in (fp32, bf16, block FP8 e4m3 with its 128x128 scales, int8 with group scales; see
  glm5.kernels.formats), widens it in registers and accumulates in fp32; it writes the layer's paged-cache
  entries itself, runs the indexer over the context and attends over the selected latents. lm_head and the MTP
  eh_proj are kernel products too. A row may bring several new tokens (speculative verification: row-major,
  each attends up to itself; every weight row is widened once for all of them), the MTP layer drafts through
  it (`mtp_forward`, `mtp_draft`), and several greedy steps run back to back in one call (`decode_greedy`);
- without the kernel the step runs as torch ops on the same modules (each widens its own weights): RoPE of
  each row as one small rotation matrix shared by every layer, the weight-absorbed MLA over the top-k latent
  entries (the arithmetic of `sparse_latent_attention`), no masks when every row sees all of its keys.

Nothing is copied: the kernel points at the model's own tensors, so in-place updates (`update_weights`,
optimizer steps on a shared model, writes through `.data`) reach it as they are made; it notices a tensor that
moved to other memory (`load_state_dict(assign=True)`, `p.data = t`, `share_memory()`) and rebuilds its
arguments, and it holds the storages it points at, so it never reads freed memory. Replaced modules need
`invalidate()`. Supported: float32 activations (weights in any of the formats above),
the "sparse" attention implementation, DSA on or off; `FusedDecoder.unsupported(model)` says why not otherwise
and the engine then uses the model's own forward. A block-FP8 weight whose scale grid does not match its
128x128 blocks is refused (FP8LayoutError naming the tensor).

THE CONTRACT with decode_layer.c (its twin; the same section heads that file): `native.LayerArgs` / `native.Mat`
mirror the C structs field for field, and the loader refuses a library whose sizeof differs.
- Mat: w (the stored matrix [rows, cols], contiguous), scale (FP8: weight_scale_inv [ceil(rows/128),
  ceil(cols/128)] fp32, the stacked experts' gate and up halves quantised apart, `split` = the first up row;
  int8: [rows, ceil(cols/32)] fp32; else NULL), bias (fp32 [rows] or NULL), fmt (native.FORMATS), out_scale
  (a constant folded into the outputs: the indexer's head-weight scales). Owned by the model; `_storages` keeps
  their memory alive while the kernel may read it.
- LayerArgs, set once per build by `_native_args`: sizes and eps; `in_` = [q_a, kv_a (, indexer wk, indexer
  weights_proj)] (read by the input-normed row), `q` = [q_b (, indexer wq_b)] (by the normed query latent),
  `kv_b` (absorbed: its rows per head are W_UK then W_UV), `o`, `ffn` = [router (, shared gate, shared up)] or
  [gate, up], `down`, the expert banks `gate_up` / `down_e` (expert 0 of [E, rows, cols]); fp32 norm vectors;
  routing constants.
- LayerArgs, set per call (by glm5_decode_step, from the one `native.StepArgs` that `_run_kernel` fills per
  call; with the head it also runs the final norm and lm_head): B rows, `h` [B, D] fp32 (the residual stream,
  updated in place; the caller's), cos / sin [rows or 1, R/2] fp32, the cache's contiguous fp32 stores and its
  write / gather / length tables (the cache's), `topk_idx` / `topk_count` (scratch kept between calls, shared by
  the layers of one call so IndexCache layers reuse the last selection; the kernel zeroes the counts). Scratch
  buffers are the kernel's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5.checkpoint.fp8 import scale_shape
from glm5.kernels import native
from glm5.kernels.formats import WeightOnlyExperts, WeightOnlyLinear
from glm5.model.attention import MLAttention
from glm5.model.fp8 import FP8Experts, FP8Linear
from glm5.model.moe import MoE


def rotation_matrices(
    cos: torch.Tensor, sin: torch.Tensor, interleave: bool, width: int | None = None
) -> torch.Tensor:
    """cos, sin [P, R/2] -> M [P, W, W] with x @ M[p] == apply_rope(x[..., :R]) (then x[..., R:] unchanged).

    Rows of M are source dims, columns output dims: output i < R/2 is x1_i cos_i - x2_i sin_i and output
    R/2 + i is x2_i cos_i + x1_i sin_i, where (x1, x2) are the even/odd dims (interleave, GLM-5's layout) or
    the two halves. W defaults to R; dims R..W-1 pass through (the indexer ropes only its first R dims).
    """
    P, half = cos.shape
    R = 2 * half
    W = R if width is None else width
    i = torch.arange(half, device=cos.device)
    x1, x2 = (2 * i, 2 * i + 1) if interleave else (i, half + i)
    M = cos.new_zeros(P, W, W)
    M[:, x1, i] = cos
    M[:, x2, i] = -sin
    M[:, x2, half + i] = cos
    M[:, x1, half + i] = sin
    if W > R:
        rest = torch.arange(R, W, device=cos.device)
        M[:, rest, rest] = 1.0
    return M


_DATA_PTR = torch.Tensor.data_ptr
KERNEL_LIMITS = {"n_routed_experts": 256, "num_experts_per_tok": 256, "n_group": 64}
"""Sizes the C kernel's fixed buffers allow; a model beyond them runs the torch back end."""


def _rms_factor(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim (the part of RMSNorm that is not the weight)."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))


class FP8LayoutError(ValueError):
    """A block-FP8 weight whose `weight_scale_inv` does not match its 128x128 blocks (named in the message)."""


_FORMAT_MODULES = (nn.Linear, FP8Linear, WeightOnlyLinear)


def check_fp8_layout(model: nn.Module) -> None:
    """Every block-FP8 weight's `weight_scale_inv` has one entry per 128x128 block (the stacked experts' gate and
    up halves quantised separately, as GLM-5-FP8 stores them); raises FP8LayoutError naming the first that has
    not (a scale grid for other blocks would be applied to the wrong weights)."""
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            checks = [("weight_scale_inv", m._buffers["weight"].shape, m.weight_scale_inv, 1)]
        elif isinstance(m, FP8Experts):
            checks = [
                ("gate_up_proj_scale_inv", m.gate_up_proj.shape, m.gate_up_proj_scale_inv, 2),
                ("down_proj_scale_inv", m.down_proj.shape, m.down_proj_scale_inv, 1),
            ]
        else:
            continue
        for scale_name, shape, scale, parts in checks:
            *lead, rows, cols = shape
            if rows % parts:
                raise FP8LayoutError(f"{name}: {tuple(shape)} does not split into {parts} quantised parts")
            so, si = scale_shape((rows // parts, cols))
            expected = (*lead, parts * so, si)
            if tuple(scale.shape) != expected:
                raise FP8LayoutError(
                    f"{name}.{scale_name} has shape {tuple(scale.shape)}; the {tuple(shape)} e4m3 weight in "
                    f"128x128 blocks{' (gate and up quantised separately)' if parts == 2 else ''} needs {expected}: "
                    "re-export the checkpoint with glm5's FP8 converter"
                )


def matrix_view(m: nn.Module, name: str = "", out_scale: float = 1.0) -> native.Mat:
    """The kernel's view of one matrix module (nn.Linear fp32 / bf16, FP8Linear, WeightOnlyLinear), pointing at its
    stored tensors (no copy); `out_scale` multiplies its outputs."""
    name, scale = name or type(m).__name__, None
    if isinstance(m, FP8Linear):
        w, fmt, scale = m._buffers["weight"], "fp8", m.weight_scale_inv
    elif isinstance(m, WeightOnlyLinear):
        w, fmt, scale = m.stored, m.fmt, m.weight_scale
    elif type(m) is nn.Linear:
        w = m.weight
        fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(w.dtype)
        if fmt is None:
            raise ValueError(f"{name}.weight is {w.dtype}: the kernel reads float32 or bfloat16 nn.Linear")
    else:
        raise ValueError(f"{name} is a {type(m).__name__}, not a matrix module the kernel reads")
    rows, cols = w.shape[-2:]
    return _mat_of(name, w, scale, fmt, rows, cols, rows, m.bias, out_scale)


def _mat_of(name, w, scale, fmt, rows, cols, split, bias, out_scale) -> native.Mat:  # noqa: ANN001
    if not w.is_contiguous():
        raise ValueError(f"{name} ({tuple(w.shape)}) is not contiguous")
    if scale is not None and (not scale.is_contiguous() or scale.dtype != torch.float32):
        raise ValueError(f"{name}'s scales are not contiguous float32")
    if bias is not None and (not bias.is_contiguous() or bias.dtype != torch.float32):
        raise ValueError(f"{name}.bias is not contiguous float32")
    return native.Mat(
        w=w.data_ptr(),
        scale=None if scale is None else scale.data_ptr(),
        bias=None if bias is None else bias.data_ptr(),
        fmt=native.FORMATS[fmt],
        rows=rows,
        cols=cols,
        split=split,
        out_scale=out_scale,
    )


def _table_pointers(*tables: torch.Tensor) -> dict[str, int]:
    """The step-major tables (write slots, gathers, lengths, cos, sin) as the kernel structs' pointer fields."""
    return {name: t.data_ptr() for name, t in zip(("write_slot", "gather", "lengths", "cos", "sin"), tables)}


@dataclass
class _Layer:
    """One decoder layer (main or MTP): its modules, used in place by both back ends."""

    layer: nn.Module
    attn: MLAttention
    idx_scale: (
        float  # the indexer's head-weight and score scales (ReLU is homogeneous): on weights_proj's output
    )
    moe: MoE | None
    down: nn.Module | None  # shared expert's or dense MLP's down_proj
    args: native.LayerArgs | None = None  # the native kernel's arguments (pointers into the model's tensors)


class FusedDecoder:
    """A decode step (one new token per row) of a GLM5ForCausalLM over a PagedLatentCache; see the module doc."""

    def __init__(self, model: nn.Module, native_kernel: bool | None = None) -> None:
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"the fused decode step does not support this model: {reason}")
        self.model = model
        self.lib = None
        if native_kernel is not False and model.model.embed_tokens.weight.device.type == "cpu":
            self.lib = native.load()
        if native_kernel and self.lib is None:
            raise RuntimeError(f"the native decode kernel is unavailable: {native.load_error()}")
        cfg = model.config
        self.cfg = cfg
        self.H, self.nope, self.R, self.v = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.rank, self.Hi, self.Di = cfg.kv_lora_rank, cfg.index_n_heads, cfg.index_head_dim
        self.layers: list[_Layer] = []
        self.mtp_layers: list[_Layer] = []
        self.lm_head: native.Mat | None = None
        self.eh_proj: list[native.Mat] = []
        self._storages: list[object] = []  # of the tensors the kernel points at, kept alive (see _fresh)
        self._ptrs: list[int] = []  # the tensors' addresses at the last build
        # per list of layers (their indices): its one-call step arguments
        self._steps: dict[tuple[int, ...], native.StepArgs] = {}
        self._stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its store pointers
        self._topk_idx = self._topk_count = torch.empty(0, dtype=torch.long)
        self._trusted = False  # inside `step()`: the packs were checked at its start
        self._slots: list[tuple[dict, str]] = []
        self._names = {id(m): n for n, m in model.named_modules()}
        self.num_builds = 0
        check_fp8_layout(model)

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why the fused step cannot run this model (None: it can)."""
        dtype = model.model.embed_tokens.weight.dtype
        if dtype != torch.float32:
            return (
                f"a model computing in {dtype} (the fused step computes in float32; keep low-precision weights "
                "with float32 activations through weights='bf16' / 'fp8' / 'int8')"
            )
        if model.attention.impl != "sparse":
            return f"attention impl {model.attention.impl!r} (the fused step is the sparse one)"
        for layer in (*model.model.layers, *getattr(model, "mtp", ())):
            attn = layer.self_attn
            linears = [attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj]
            if attn.indexer is not None:
                linears += [attn.indexer.wq_b, attn.indexer.wk, attn.indexer.weights_proj]
            if not all(type(m) in _FORMAT_MODULES for m in linears):
                return "projections that are not nn.Linear, FP8Linear or WeightOnlyLinear"
            for m in linears:
                if type(m) is nn.Linear and m.weight.dtype not in (torch.float32, torch.bfloat16):
                    return f"a {m.weight.dtype} nn.Linear weight"
        return None

    # --- the model's tensors ---------------------------------------------------------------------
    def _sources(self) -> list[torch.Tensor]:
        """Every tensor the kernel points at, looked up afresh in their modules' dicts
        (load_state_dict(assign=True) replaces them)."""
        if not self._slots:  # (owner dict, name) of every parameter and buffer of the layers, found once
            owners = (*self.model.model.layers, *getattr(self.model, "mtp", ()), self.model.lm_head)
            for layer in owners:
                for m in layer.modules():
                    self._slots += [(m._parameters, n) for n, t in m._parameters.items() if t is not None]
                    self._slots += [(m._buffers, n) for n, t in m._buffers.items() if t is not None]
        return [d[n] for d, n in self._slots]

    def _fresh(self) -> bool:
        """Every tensor the kernel points at is where it was at the last build. The build holds the storages
        of those tensors, so none of their addresses can be taken by new memory: a tensor at its recorded
        address is still the one the kernel was given (or a view of the same memory), and a replaced tensor
        (`load_state_dict(assign=True)`) or a swapped storage (`p.data = t`, `share_memory()`) shows up as a
        new address. In-place updates need nothing: the kernel reads the same memory (nothing is derived from
        the weights at build time). One C-level pass over a few hundred tensors; replaced modules are not
        seen: call `invalidate()` after them."""
        if not self._ptrs:
            return False
        return list(map(_DATA_PTR, itertools.starmap(dict.__getitem__, self._slots))) == self._ptrs

    def invalidate(self) -> None:
        """Rebuild the kernel's arguments before the next step (after a change the check cannot see: a module
        replaced by a new one)."""
        self._ptrs, self._storages, self._slots, self.layers = [], [], [], []
        self._names = {id(m): n for n, m in self.model.named_modules()}

    def _ensure_fresh(self) -> None:
        if not (self._trusted and self.layers) and not self._fresh():
            self._build()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Check the packs once for several calls that the weights cannot change between (an engine step
        holds its lock; speculative decoding makes several kernel calls per step): the check walks every
        parameter's address, ~0.2 ms for the 190 tensors of the 8-layer `small` preset between decode steps
        (their objects fall out of the CPU caches while the weights stream through)."""
        self._ensure_fresh()
        self._trusted = True
        try:
            yield
        finally:
            self._trusted = False

    @torch.no_grad()
    def _build(self) -> None:
        self.layers = [self._pack(layer) for layer in self.model.model.layers]
        self.mtp_layers = [self._pack(layer) for layer in getattr(self.model, "mtp", ())]
        if self.lib is not None:
            try:
                for L in self.layers + self.mtp_layers:
                    L.args = self._native_args(L)
                self.lm_head = self._mat(self.model.lm_head)
                self.eh_proj = [self._mat(m.eh_proj) for m in getattr(self.model, "mtp", ())]
            except ValueError as e:  # e.g. a non-contiguous parameter: the torch ops handle any layout
                if isinstance(e, FP8LayoutError):
                    raise
                warnings.warn(f"native decode kernel disabled: {e}", stacklevel=2)
                self.lib = None
        sources = self._sources()
        self._storages = [t.untyped_storage() for t in sources]
        self._ptrs = list(map(_DATA_PTR, sources))
        self._steps = {}
        self.num_builds += 1

    def _pack(self, layer: nn.Module) -> _Layer:
        """One decoder layer (main or MTP): its modules (nothing is copied: both back ends read the model's
        own tensors)."""
        attn, idx, mlp = layer.self_attn, layer.self_attn.indexer, layer.mlp
        idx_scale = 1.0 if idx is None else self.Hi**-0.5 * idx.scale
        if isinstance(mlp, MoE):
            shared = mlp.shared_experts
            down, moe = (None if shared is None else shared.down_proj), mlp
        else:
            down, moe = mlp.down_proj, None
        return _Layer(layer=layer, attn=attn, idx_scale=idx_scale, moe=moe, down=down)

    def _name(self, m: nn.Module) -> str:
        return self._names.get(id(m), type(m).__name__)

    def _mat(self, m: nn.Module, out_scale: float = 1.0) -> native.Mat:
        return matrix_view(m, self._name(m), out_scale)

    def _bank(self, experts: nn.Module, which: str) -> native.Mat:
        """Expert 0 of a routed-expert bank ([E, rows, cols]), in the bank's format."""
        name = f"{self._name(experts)}.{which}"
        if isinstance(experts, FP8Experts):
            w, scale, fmt = getattr(experts, which), getattr(experts, f"{which}_scale_inv"), "fp8"
        elif isinstance(experts, WeightOnlyExperts):
            w, scale, fmt = (
                getattr(experts, f"{which}_stored"),
                getattr(experts, f"{which}_scale"),
                experts.fmt,
            )
        else:
            w, scale = getattr(experts, which), None
            fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(w.dtype)
            if fmt is None:
                raise ValueError(f"{name} is {w.dtype}: the kernel reads float32 or bfloat16 experts")
        rows, cols = w.shape[-2:]
        split = rows // 2 if which == "gate_up_proj" else rows  # gate and up: separately quantised halves
        return _mat_of(name, w, scale, fmt, rows, cols, split, None, 1.0)

    def _native_args(self, L: _Layer) -> native.LayerArgs:
        """The C kernel's arguments for one layer: sizes, flags and weight views (per-step fields set later)."""
        cfg, attn, idx, layer = self.cfg, L.attn, L.attn.indexer, L.layer

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            if not t.is_contiguous() or t.dtype != torch.float32:
                raise ValueError(f"a {tuple(t.shape)} {t.dtype} tensor is not contiguous float32")
            return t.data_ptr()

        ins = [attn.q_a_proj, attn.kv_a_proj_with_mqa] + ([] if idx is None else [idx.wk])
        in_mats = [self._mat(m) for m in ins]
        q_mats = [self._mat(attn.q_b_proj)] + ([] if idx is None else [self._mat(idx.wq_b)])
        if idx is not None:
            in_mats.append(self._mat(idx.weights_proj, L.idx_scale))
        mlp = layer.mlp
        if L.moe is not None:
            w = mlp.gate.weight
            fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(w.dtype)
            if fmt is None:
                raise ValueError(
                    f"{self._name(mlp.gate)}.weight is {w.dtype}: the kernel reads fp32 or bf16 routers"
                )
            router = _mat_of(f"{self._name(mlp.gate)}.weight", w, None, fmt, *w.shape, w.shape[0], None, 1.0)
            shared = mlp.shared_experts
            ffn_mats = [router] + (
                [] if shared is None else [self._mat(shared.gate_proj), self._mat(shared.up_proj)]
            )
        else:
            ffn_mats = [self._mat(mlp.gate_proj), self._mat(mlp.up_proj)]
        a = native.LayerArgs(
            D=cfg.hidden_size,
            q_lora=in_mats[0].rows,
            rank=self.rank,
            R=self.R,
            H=self.H,
            nope=self.nope,
            v=self.v,
            Hi=self.Hi,
            Di=self.Di,
            topk=attn.topk,
            n_in=sum(m.rows for m in in_mats),
            n_q=sum(m.rows for m in q_mats),
            has_indexer=idx is not None,
            rope_interleave=cfg.rope_interleave,
            idx_rope_interleave=cfg.indexer_rope_interleave,
            in_eps=layer.input_layernorm.eps,
            q_eps=attn.q_a_layernorm.eps,
            kv_eps=attn.kv_a_layernorm.eps,
            ffn_eps=layer.post_attention_layernorm.eps,
            softmax_scale=attn.scale,
            kv_b=self._mat(attn.kv_b_proj),
            o=self._mat(attn.o_proj),
            n_in_mats=len(in_mats),
            n_q_mats=len(q_mats),
            in_norm_w=ptr(layer.input_layernorm.weight),
            q_norm_w=ptr(attn.q_a_layernorm.weight),
            kv_norm_w=ptr(attn.kv_a_layernorm.weight),
            n_ffn_mats=len(ffn_mats),
            post_norm_w=ptr(layer.post_attention_layernorm.weight),
            ffn_inter=0 if L.down is None else L.down.weight.shape[1],
            is_moe=L.moe is not None,
        )
        for i, m in enumerate(in_mats):
            a.in_[i] = m
        for i, m in enumerate(q_mats):
            a.q[i] = m
        for i, m in enumerate(ffn_mats):
            a.ffn[i] = m
        if L.down is not None:
            a.down = self._mat(L.down)
        if idx is not None:
            a.idx_ln_eps, a.idx_ln_w, a.idx_ln_b = (
                idx.k_norm.eps,
                ptr(idx.k_norm.weight),
                ptr(idx.k_norm.bias),
            )
        over = {k: getattr(cfg, k) for k, most in KERNEL_LIMITS.items() if getattr(cfg, k) > most}
        if over:
            raise ValueError(f"{over} is beyond the kernel's limits {KERNEL_LIMITS}")
        if L.moe is not None:
            gate, experts = L.moe.gate, L.moe.experts
            a.E, a.top_k, a.n_group, a.topk_group = (
                gate.num_experts,
                gate.top_k,
                gate.n_group,
                gate.topk_group,
            )
            a.gate_up, a.down_e = self._bank(experts, "gate_up_proj"), self._bank(experts, "down_proj")
            a.Fe, a.norm_topk, a.route_scale = (
                a.gate_up.rows // 2,
                gate.norm_topk_prob,
                gate.routed_scaling_factor,
            )
            a.e_bias = ptr(gate.e_score_correction_bias)
        return a

    # --- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """input_ids [B] (one new token per row, the rows `cache.prepare` set) -> (logits [B, vocab], final-norm
        hidden states [B, D]); the cache advances by one. With the native kernel also [B, T] (a few tokens per
        row, e.g. speculative drafts) -> [B, T, vocab], [B, T, D]."""
        self._ensure_fresh()
        if self.lib is not None and hasattr(cache, "decode_tables"):
            return self._native_step(input_ids, cache)
        if input_ids.dim() != 1:
            raise ValueError("the torch fused step takes one token per row; several need the native kernel")
        model, cfg = self.model, self.cfg
        pos, _ = cache.begin(1)
        q_pos = pos.q_pos[:, 0]  # [P]: P = 1 when every row sits at the same position
        ragged = q_pos.shape[0] > 1
        h = model.model.embed_tokens(input_ids)  # [B, D]
        cos, sin = model.rotary(q_pos, h.dtype)
        rot = rotation_matrices(cos, sin, cfg.rope_interleave)  # [P, R, R]
        rot_q = rot * cfg.softmax_scale  # the query's rope part carries the softmax scale
        rot_idx = rotation_matrices(cos, sin, cfg.indexer_rope_interleave, self.Di)
        topk = None
        for layer in self.layers:
            h, topk = self._layer(layer, h, cache, q_pos, ragged, rot, rot_q, rot_idx, topk)
        hidden = model.model.norm(h)
        logits = model.lm_head(hidden)
        cache.advance(1)
        return logits, hidden

    def _native_step(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """Through the C kernel. input_ids [B] or [B, T]: T > 1 new tokens of a row (speculative verification)
        become T kernel rows in order, each writing its entry and then attending up to it, so the causal order
        inside the row holds; -> logits and hidden states of every new token, [B, (T,) ...]."""
        model = self.model
        T = 1 if input_ids.dim() == 1 else input_ids.shape[1]
        h = model.model.embed_tokens(input_ids.reshape(-1)).contiguous()  # fresh: the kernel updates it
        _, hidden, logits = self._run_kernel(h, self.layers, cache, T, model.model.norm)
        if input_ids.dim() == 2:
            hidden, logits = hidden.view(*input_ids.shape, -1), logits.view(*input_ids.shape, -1)
        return logits, hidden

    @torch.no_grad()
    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        cache,
        depth: int = 0,  # noqa: ANN001
        head: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`GLM5ForCausalLM.mtp_forward` with the MTP decoder layer in the native kernel: hidden [B, T, D],
        next_ids [B, T] (every row T new tokens) -> (MTP output [B, T, D], logits [B, T, vocab], or None with
        head=False: only the cache entries are wanted); the MTP cache advances by T. None when the kernel is not
        loaded (the caller runs the model's own)."""
        if self.lib is None or not hasattr(cache, "decode_tables") or self.model.attention.impl != "sparse":
            return None
        self._ensure_fresh()
        model = self.model
        index = min(depth, len(model.mtp) - 1)  # one module, applied recursively
        module = model.mtp[index]
        emb = model.model.embed_tokens(next_ids)
        u = self._linear(
            self.eh_proj[index],
            torch.cat([self._rms_norm(emb, module.enorm), self._rms_norm(hidden, module.hnorm)], -1),
        )
        h, _, logits = self._run_kernel(
            u.reshape(-1, u.shape[-1]).contiguous(),
            [self.mtp_layers[index]],
            cache,
            next_ids.shape[1],
            module.shared_head.norm if head else None,
        )
        return h.view_as(u), None if logits is None else logits.view(*u.shape[:-1], -1)

    def drafts_in_kernel(self, cache) -> bool:  # noqa: ANN001
        """Greedy drafting runs in one kernel call (`mtp_draft`): where `greedy_in_kernel`, with one MTP module
        (applied recursively)."""
        return self.greedy_in_kernel(cache) and len(getattr(self.model, "mtp", ())) == 1

    @torch.no_grad()
    def mtp_draft(self, hidden: torch.Tensor, prev_ids: torch.Tensor, cache, steps: int) -> torch.Tensor:  # noqa: ANN001
        """`steps` greedy drafts per row in one kernel call: each step runs `mtp_forward` on the previous MTP output
        and token (first: the given ones), then takes the argmax of its logits -- the same arithmetic as `steps`
        calls of `mtp_forward` + argmax, without Python between them. hidden [B, T0, D] and prev_ids [B, T0]: the
        first step feeds T0 positions per row (the catch-up, in order; its draft comes from the last). Writes the
        cache entries of every position it feeds (the caller prepared T0 + steps - 1 tokens per row: the real
        ones, then placeholders it rolls back); -> drafts [B, steps]. Only where `drafts_in_kernel(cache)`."""
        model = self.model
        self._ensure_fresh()
        B, T0, D = hidden.shape
        T = T0 + steps - 1
        module, L = model.mtp[0], self.mtp_layers[0]
        embed = model.model.embed_tokens.weight
        write, gather, lengths, cos, sin = self._step_major_tables(cache, B, T0, T)
        kv, idx = cache.stores(L.attn.layer_idx)
        if kv.dtype != torch.float32 or not kv.is_contiguous():
            raise ValueError(f"the native kernel needs a contiguous float32 cache, got {kv.dtype}")
        first_h = hidden.reshape(B * T0, D).contiguous()
        first_ids = prev_ids.reshape(B * T0).contiguous()
        h = torch.empty(B, D)
        ids = torch.empty(steps, B, dtype=torch.long)
        topk_idx, topk_count = self._topk_scratch(B * T0)
        a = L.args
        a.kv_store, a.idx_store = kv.data_ptr(), None if idx is None else idx.data_ptr()
        a.gather_stride, a.topk_idx, a.topk_count = (
            gather.shape[-1],
            topk_idx.data_ptr(),
            topk_count.data_ptr(),
        )
        a.dsa = model.attention.dsa
        d = native.DraftArgs(
            steps=steps,
            B=B,
            D=D,
            V=self.lm_head.rows,
            embed=embed.data_ptr(),
            enorm_w=module.enorm.weight.data_ptr(),
            hnorm_w=module.hnorm.weight.data_ptr(),
            head_norm_w=module.shared_head.norm.weight.data_ptr(),
            enorm_eps=module.enorm.eps,
            hnorm_eps=module.hnorm.eps,
            head_norm_eps=module.shared_head.norm.eps,
            eh_proj=self.eh_proj[0],
            lm_head=self.lm_head,
            h=h.data_ptr(),
            ids=ids.data_ptr(),
            **_table_pointers(write, gather, lengths, cos, sin),
            T0=T0,
            first_h=first_h.data_ptr(),
            first_ids=first_ids.data_ptr(),
        )
        rc = self.lib.glm5_mtp_draft(ctypes.byref(a), ctypes.byref(d))
        if rc:
            raise RuntimeError(f"native MTP drafting failed: {native.ERRORS[rc]}")
        cache.advance(T)
        return ids.t()

    def _step_major_tables(self, cache, B: int, T0: int, T: int) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        """The prepared batch's tables for T new tokens per row (write slots, gathers, lengths, cos, sin), in the
        order of a kernel call that runs them step by step: step 0's rows [b][t < T0], then step i's rows [b]."""
        pos, _ = cache.begin(T)
        write, gather, lengths = cache.decode_tables(T)  # rows [b][t]
        cos, sin = (
            t.expand(B, T, -1).reshape(B * T, -1) for t in self.model.rotary(pos.q_pos, torch.float32)
        )
        tables = (write, gather, lengths, cos, sin)
        if B > 1:
            order = torch.arange(B * T).view(B, T)
            order = torch.cat([order[:, :T0].reshape(-1), order[:, T0:].t().reshape(-1)])
            tables = tuple(t.index_select(0, order) for t in tables)
        return tuple(t.contiguous() for t in tables)

    def greedy_in_kernel(self, cache) -> bool:  # noqa: ANN001
        """Several greedy decode steps run in one kernel call (`decode_greedy`): the kernel is loaded, attention
        is the sparse implementation and the embedding is a contiguous float32 table."""
        embed = self.model.model.embed_tokens.weight
        return (
            self.lib is not None
            and hasattr(cache, "decode_tables")
            and self.model.attention.impl == "sparse"
            and embed.dtype == torch.float32
            and embed.is_contiguous()
        )

    @torch.no_grad()
    def decode_greedy(self, input_ids: torch.Tensor, cache, steps: int) -> torch.Tensor:  # noqa: ANN001
        """`steps` greedy decode steps per row in one kernel call: input_ids [B] (the rows' last tokens) -> the
        next `steps` tokens [B, steps], each the argmax of the step before -- the arithmetic of `steps` calls of
        this decoder + argmax, without Python between them. The caller prepared `steps` tokens per row (the fed
        token and placeholders for the ones the call makes; every entry written is exact). Only where
        `greedy_in_kernel(cache)`."""
        self._ensure_fresh()
        B = input_ids.shape[0]
        write, gather, lengths, cos, sin = self._step_major_tables(cache, B, 1, steps)
        s = self._call_args(self._step_args(self.layers, cache), B, gather, self.model.model.norm)
        first = input_ids.contiguous()
        ids = torch.empty(steps, B, dtype=torch.long)
        g = native.GreedyArgs(
            steps=steps,
            B=B,
            embed=self.model.model.embed_tokens.weight.data_ptr(),
            first_ids=first.data_ptr(),
            ids=ids.data_ptr(),
            **_table_pointers(write, gather, lengths, cos, sin),
        )
        self._check(self.lib.glm5_decode_greedy(ctypes.byref(s), ctypes.byref(g)), s, self.layers)
        cache.advance(steps)
        return ids.t()

    def _call_args(
        self, s: native.StepArgs, rows: int, gather: torch.Tensor, norm: nn.Module | None
    ) -> native.StepArgs:
        """Fill the fields every step of one call shares: the top-k scratch for `rows` rows, the gather stride,
        DSA, the final norm (None: no head)."""
        topk_idx, topk_count = self._topk_scratch(rows)
        s.topk_idx, s.topk_count = topk_idx.data_ptr(), topk_count.data_ptr()
        s.gather_stride, s.dsa = gather.shape[1], self.model.attention.dsa
        if norm is not None:
            s.norm_w, s.norm_eps = norm.weight.data_ptr(), norm.eps
        return s

    def _topk_scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's top-k scratch for `rows` rows, kept between calls (every kernel call zeroes the counts)."""
        if self._topk_idx.shape[0] < rows:
            self._topk_idx = torch.empty(rows, self.cfg.index_topk, dtype=torch.long)
            self._topk_count = torch.empty(rows, dtype=torch.long)
        return self._topk_idx, self._topk_count

    @staticmethod
    def _check(rc: int, s: native.StepArgs, layers: list[_Layer]) -> None:
        if rc:
            layer = layers[s.failed_layer].attn.layer_idx
            raise RuntimeError(f"native decode kernel failed in layer {layer}: {native.ERRORS[rc]}")

    def _linear(self, mat: native.Mat, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] W^T (+ b) in the kernel library, W read as stored (lm_head, eh_proj)."""
        x = x.contiguous()
        out = x.new_empty(*x.shape[:-1], mat.rows)
        self.lib.glm5_linear(ctypes.byref(mat), x.data_ptr(), x.numel() // mat.cols, out.data_ptr())
        return out

    def _rms_norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """RMSNorm `norm` of x in the kernel library (one call instead of F.rms_norm's eight ops)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        D = x.shape[-1]
        self.lib.glm5_rms_norm(
            x.data_ptr(), norm.weight.data_ptr(), x.numel() // D, D, norm.eps, out.data_ptr()
        )
        return out

    def _run_kernel(
        self,
        h: torch.Tensor,
        layers: list[_Layer],
        cache,  # noqa: ANN001
        T: int,
        norm: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The residual stream h [B*T, D] (row-major over the batch's T new tokens per row) through `layers`,
        in place, in one kernel call; writes their cache entries and advances the cache by T. With `norm` the
        call also applies it and lm_head: -> (h, norm(h), logits [B*T, vocab]); else (h, None, None)."""
        pos, _ = cache.begin(T)
        write, gather, lengths = cache.decode_tables(T)
        rows, B = h.shape[0], h.shape[0] // T
        cos, sin = self.model.rotary(pos.q_pos, h.dtype)  # [P, T, R/2]
        shared = pos.q_pos.shape[0] == 1 and T == 1  # one position for every row
        if not shared:
            cos, sin = (t.expand(B, T, -1).reshape(rows, -1).contiguous() for t in (cos, sin))
        s = self._call_args(self._step_args(layers, cache), rows, gather, norm)
        s.B, s.h, s.cos, s.sin = rows, h.data_ptr(), cos.data_ptr(), sin.data_ptr()
        s.rope_stride = 0 if shared else self.R // 2
        s.write_slot, s.gather, s.lengths = write.data_ptr(), gather.data_ptr(), lengths.data_ptr()
        hidden = logits = None
        if norm is not None:
            hidden, logits = torch.empty_like(h), h.new_empty(rows, self.lm_head.rows)
        s.hidden = None if hidden is None else hidden.data_ptr()
        s.logits = None if logits is None else logits.data_ptr()
        self._check(self.lib.glm5_decode_step(ctypes.byref(s)), s, layers)
        cache.advance(T)
        return h, hidden, logits

    def _step_args(self, layers: list[_Layer], cache) -> native.StepArgs:  # noqa: ANN001
        """The one-call step arguments of `layers` over `cache` (made once per build and cache)."""
        key = tuple(L.attn.layer_idx for L in layers)
        s = self._steps.get(key)
        if s is None:
            s = native.StepArgs(n_layers=len(layers), lm_head=self.lm_head)
            s._arrays = (ctypes.POINTER(native.LayerArgs) * len(layers))(
                *[ctypes.pointer(L.args) for L in layers]
            )
            s.layers = ctypes.cast(s._arrays, ctypes.c_void_p)
            s._cache = lambda: None  # a weak reference to the cache its store pointers are for
            self._steps[key] = s
        if s._cache() is not cache:
            stores = self._stores.setdefault(cache, {})
            if key not in stores:
                kv, idx = zip(*(cache.stores(i) for i in key))
                for t in kv:
                    if t.dtype != torch.float32 or not t.is_contiguous():
                        raise ValueError(f"the native kernel needs a contiguous float32 cache, got {t.dtype}")
                stores[key] = (
                    (ctypes.c_void_p * len(key))(*[t.data_ptr() for t in kv]),
                    (ctypes.c_void_p * len(key))(*[None if t is None else t.data_ptr() for t in idx]),
                )
            kv_ptrs, idx_ptrs = stores[key]
            s.kv_stores, s.idx_stores = ctypes.addressof(kv_ptrs), ctypes.addressof(idx_ptrs)
            s._cache = weakref.ref(cache)
        return s

    def _layer(self, L: _Layer, h, cache, q_pos, ragged, rot, rot_q, rot_idx, prev_topk):  # noqa: ANN001
        """One layer as torch ops on the model's modules (each reads its weights in its own format)."""
        B = h.shape[0]
        H, nope, R, rank, Hi, Di = self.H, self.nope, self.R, self.rank, self.Hi, self.Di
        attn, layer, ix = L.attn, L.layer, L.attn.indexer

        # --- projections of the normed layer input and of the normed query latent
        x = layer.input_layernorm(h)
        c_q = attn.q_a_layernorm(attn.q_a_proj(x))
        kv = attn.kv_a_proj_with_mqa(x)
        q = attn.q_b_proj(c_q).view(B, H, nope + R)
        w_uk, w_uv = attn.absorbed_kv_b()
        # [B, H, r+R]
        q_lat = torch.cat(
            [
                torch.bmm(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1) * attn.scale,  # absorbed
                torch.matmul(q[..., nope:], rot_q),
            ],
            dim=-1,
        )
        c_kv = attn.kv_a_layernorm(kv[:, :rank])
        k_pe = torch.matmul(kv[:, None, rank:], rot)[:, 0]
        idx_k = None
        if ix is not None:
            # [B,1,Di]
            idx_k = torch.matmul(
                F.layer_norm(ix.wk(x)[:, None], (Di,), ix.k_norm.weight, ix.k_norm.bias, ix.k_norm.eps),
                rot_idx,
            )
        kv_all, idx_all = cache.update_latent(attn.layer_idx, torch.cat([c_kv, k_pe], -1)[:, None], idx_k)
        S = kv_all.shape[1]

        # --- key selection (DSA) and absorbed attention over the selected latents
        K = min(attn.topk, S)
        topk = None
        if self.model.attention.dsa and S > attn.topk:
            if ix is not None:
                idx_q = torch.matmul(ix.wq_b(c_q).view(B, Hi, Di), rot_idx)  # [B, Hi, Di]
                idx_w = (ix.weights_proj(x) * L.idx_scale)[:, None]  # [B, 1, Hi], both scales
                per_head = torch.bmm(idx_q, idx_all.transpose(1, 2)).relu_()  # [B, Hi, S]
                scores = torch.bmm(idx_w, per_head)  # [B, 1, S]
                if ragged:  # shorter rows: their padding keys are never chosen
                    future = torch.arange(S, device=h.device) > q_pos[:, None]
                    scores = scores.masked_fill(future[:, None], float("-inf"))
                topk = scores.topk(K, dim=-1).indices[:, 0]  # [B, K]
            else:
                topk = prev_topk
            if B == 1:
                keys = kv_all[0].index_select(0, topk[0])[None]
            else:
                flat = topk + (torch.arange(B, device=h.device) * S)[:, None]
                keys = kv_all.reshape(B * S, -1).index_select(0, flat.reshape(-1)).view(B, K, -1)
            hidden_keys = (topk > q_pos[:, None]) if ragged else None  # rows with fewer than K visible keys
        else:
            keys = kv_all
            hidden_keys = (torch.arange(S, device=h.device) > q_pos[:, None]) if ragged else None
        scores = torch.bmm(q_lat, keys.transpose(1, 2))  # [B, H, K or S], softmax scale folded into q_lat
        if hidden_keys is not None:
            scores = scores.masked_fill(hidden_keys[:, None], float("-inf"))
        o_lat = torch.bmm(torch.softmax(scores, dim=-1), keys[..., :rank])  # [B, H, r]
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1).reshape(B, H * self.v)
        h = h + attn.o_proj(o)

        # --- feed-forward on the normed stream
        x = layer.post_attention_layernorm(h)
        if L.moe is not None:
            weights, expert_idx, _ = L.moe.gate(x)
            y = L.moe.experts(x, expert_idx, weights)
            if L.moe.shared_experts is not None:
                y = y + L.moe.shared_experts(x)
        else:
            y = layer.mlp(x)
        return h + y, topk
