"""The capacity planner of `glm5 plan`: weight bytes by kind, memory per device, layout, decode/prefill
rooflines, MTP and cost of one deployment on the hardware catalog (glm5/hardware.py).

Assumptions, all explicit:
- Layout: experts are sharded by expert parallelism over all N devices (EP = N); everything else (MLA,
  indexers, dense MLPs, shared experts, embedding, lm_head) is split by attention tensor parallelism TP and
  replicated over N / TP data-parallel attention groups ("DP attention"), except what the engine keeps whole on
  every rank of a TP group (glm5/engine/sharding.py): q_a/kv_a projections and their norms, the indexers, the
  routers and the norms (`WeightBytes.replicated`). `launch_commands` prints the `glm5 serve` (and `torchrun`)
  lines that run this layout. Each sequence lives in one DP
  group; MLA's latent has a single head, so a TP group holds its sequences' cache on every member.
- KV cache: the MLA latent (kv_lora_rank + qk_rope_head_dim values per token per layer) in BF16 (or the
  656-B "fp8_ds_mla" layout with --kv-dtype fp8); the DSA indexer key (index_head_dim per token per layer
  with its own indexer) always in FP8 + one fp32 scale, as DeepSeek's reference, vLLM and SGLang store it.
  The MTP layer's one-layer cache is ignored (1/78 of the latent).
- Decode roofline: one step reads the non-expert weights once per busy DP group, each distinct routed
  expert the batch touches once (uniform routing: E * (1 - (1 - k/E)^tokens) per MoE layer), the top-k
  latents every query token gathers and every indexer key of the context. Step time = bytes / (N x HBM
  bandwidth x efficiency), or the compute time when that is longer.
- Prefill roofline: (2 x active params + MLA (MQA mode) and indexer FLOPs) per prompt token / (N x peak x
  MFU). The "fp8" dtype uses the 8-bit peak for every matmul (INT8 on chips without FP8 units).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from glm5.config import GLM5Config
from glm5.hardware import HARDWARE, Hardware
from glm5.plan.accounting import ParamTable, TensorEntry, parameter_table
from glm5.plan.units import human_bytes

DEFAULT_BANDWIDTH_EFFICIENCY = 0.6
"""Share of peak HBM bandwidth decode reaches. Tuned MoE decode kernels stream weights at ~60-80% of peak;
with all-to-all, launch gaps and imbalance, 0.6 is a middle estimate. See the "implied" figures."""
DEFAULT_MFU = 0.4
"""Model-FLOPs utilisation of prefill (large-batch MoE prefill typically reaches 35-50%)."""
DEFAULT_MARGIN = 0.10
"""Share of each device's memory kept for activations, CUDA graphs / workspaces and fragmentation."""


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes of a config in one stored dtype, split the way the layout and the decode roofline need."""

    dtype: str
    total: int
    """Main model (embedding, layers, norm, lm_head; router biases included)."""
    routed: int
    """All routed experts of the main model (sharded by EP)."""
    per_expert: int
    """One routed expert of one MoE layer."""
    embed: int
    lm_head: int
    num_moe_layers: int
    mtp_total: int
    """Unique MTP-module bytes (it shares the embedding and lm_head)."""
    mtp_routed: int
    replicated: int = 0
    """Main-model bytes every rank of a TP group keeps whole: q_a/kv_a projections and their norms, indexers,
    routers, norms."""
    mtp_replicated: int = 0
    """The same in the MTP modules (plus their eh_proj)."""

    @property
    def dense_read(self) -> int:
        """Non-expert bytes a decode step reads in full: everything but routed experts and the embedding."""
        return self.total - self.routed - self.embed


def weight_bytes(table: ParamTable, dtype: str) -> WeightBytes:
    """Split `table`'s weights in `dtype` ("bf16" = the BF16 checkpoint, "fp8" = the block-FP8 one)."""
    if dtype not in ("bf16", "fp8"):
        raise ValueError(f"unknown weight dtype {dtype!r}; choose bf16 or fp8")
    attr = f"{dtype}_bytes"

    def total(mtp: bool, component: str | None = None) -> int:
        return sum(
            getattr(e, attr)
            for e in table.entries
            if e.in_mtp == mtp and (component is None or e.component == component)
        )

    moe_layers = {
        e.name.split(".")[2] for e in table.entries if e.component == "routed_experts" and not e.in_mtp
    }
    routed = total(False, "routed_experts")
    num_experts = table.config.n_routed_experts

    def replicated(mtp: bool) -> int:
        return sum(getattr(e, attr) for e in table.entries if e.in_mtp == mtp and tp_replicated(e))

    return WeightBytes(
        dtype,
        total(False),
        routed,
        routed // max(len(moe_layers) * num_experts, 1),
        total(False, "embed_tokens"),
        total(False, "lm_head"),
        len(moe_layers),
        total(True),
        total(True, "routed_experts"),
        replicated(False),
        replicated(True),
    )


TP_REPLICATED_ATTENTION = ("q_a_proj", "kv_a_proj_with_mqa", "q_a_layernorm", "kv_a_layernorm")


def tp_replicated(entry: TensorEntry) -> bool:
    """Whether the engine keeps this tensor whole on every rank of a TP group (glm5/engine/sharding.py)."""
    if entry.component in ("routers", "indexers", "norms", "mtp_glue"):
        return True
    return entry.component == "attention" and any(f".{k}." in entry.name for k in TP_REPLICATED_ATTENTION)


def kv_bytes_per_token_layer(cfg: GLM5Config, kv_dtype: str = "bf16") -> tuple[int, int]:
    """(MLA latent bytes, indexer key bytes) per token per layer. Latent: BF16 (kv_lora_rank + rope dims) x 2,
    or "fp8_ds_mla" (e4m3 latent + an fp32 scale per 128 values + the BF16 rope key). Indexer key: FP8 + fp32 scale."""
    if kv_dtype == "bf16":
        latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    elif kv_dtype == "fp8":
        latent = cfg.kv_lora_rank + 4 * math.ceil(cfg.kv_lora_rank / 128) + 2 * cfg.qk_rope_head_dim
    else:
        raise ValueError(f"unknown KV-cache dtype {kv_dtype!r}; choose bf16 or fp8")
    return latent, cfg.index_head_dim + 4


@dataclass(frozen=True)
class PlanSettings:
    """What `glm5 plan` is asked (one field per command-line option)."""

    dtype: str = "fp8"
    """Stored weight dtype: bf16 or fp8 (block FP8 with fp32 scales)."""
    context: int = 200_000
    """Tokens per sequence (prompt + output so far) the cache must hold and decode reads at."""
    concurrency: int = 32
    """Sequences decoded at once."""
    devices: int | None = None
    """Use this many devices (None: the smallest power of two that fits)."""
    attn_tp: int | None = None
    """Attention tensor-parallel degree (None: the power of two that minimises memory per device)."""
    kv_dtype: str = "bf16"
    """MLA latent cache dtype: bf16 or fp8 (fp8_ds_mla)."""
    mtp_steps: int = 0
    """MTP draft tokens per step (0 = no speculative decoding)."""
    mtp_accept: float = 1.0
    """Expected tokens accepted per verification step, incl. the bonus token (1 .. mtp_steps + 1)."""
    bandwidth_efficiency: float = DEFAULT_BANDWIDTH_EFFICIENCY
    mfu: float = DEFAULT_MFU
    margin: float = DEFAULT_MARGIN
    price_per_hour: float | None = None
    """Price of one device-hour (any currency), for the cost per million tokens."""
    max_devices: int = 4096

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} = {getattr(self, name)!r} is invalid: {rule}")

        if self.dtype not in ("bf16", "fp8"):
            raise bad("dtype", "choose bf16 or fp8")
        if self.kv_dtype not in ("bf16", "fp8"):
            raise bad("kv_dtype", "choose bf16 or fp8")
        for name in ("context", "concurrency", "max_devices"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("devices", "attn_tp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, "must be >= 1")
        if self.mtp_steps < 0:
            raise bad("mtp_steps", "must be >= 0")
        if not 1.0 <= self.mtp_accept <= self.mtp_steps + 1:
            raise bad("mtp_accept", f"must be between 1 and mtp_steps + 1 = {self.mtp_steps + 1}")
        for name in ("bandwidth_efficiency", "mfu"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise bad(name, "must be in (0, 1]")
        if not 0.0 <= self.margin < 1.0:
            raise bad("margin", "must be in [0, 1)")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise bad("price_per_hour", "must be >= 0")


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on the busiest device."""

    weights: float
    kv_latent: float
    kv_indexer: float
    margin: float
    capacity: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_latent + self.kv_indexer + self.margin

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def device_memory(
    table: ParamTable, hw: Hardware, s: PlanSettings, devices: int, attn_tp: int
) -> DeviceMemory:
    """Memory of the busiest device with `devices` devices and attention TP `attn_tp` (see the module notes)."""
    cfg, w = table.config, weight_bytes(table, s.dtype)
    experts_per_device = math.ceil(cfg.n_routed_experts / devices)
    weights = (
        (w.total - w.routed - w.replicated) / attn_tp
        + w.replicated
        + w.num_moe_layers * experts_per_device * w.per_expert
    )
    if s.mtp_steps:
        weights += (
            (w.mtp_total - w.mtp_routed - w.mtp_replicated) / attn_tp
            + w.mtp_replicated
            + w.mtp_routed * experts_per_device / cfg.n_routed_experts
        )
    dp = devices // attn_tp
    tokens = math.ceil(s.concurrency / dp) * s.context  # the sequences of the busiest DP group
    latent, key = kv_bytes_per_token_layer(cfg, s.kv_dtype)
    return DeviceMemory(
        weights,
        tokens * latent * cfg.num_hidden_layers,
        tokens * key * table.num_indexer_layers,
        s.margin * hw.memory,
        hw.memory,
    )


def min_devices_bound(table: ParamTable, hw: Hardware, s: PlanSettings) -> int:
    """Fewest devices whose usable memory holds the weights and every sequence's cache with nothing replicated."""
    cfg, w = table.config, weight_bytes(table, s.dtype)
    latent, key = kv_bytes_per_token_layer(cfg, s.kv_dtype)
    kv = s.concurrency * s.context * (latent * cfg.num_hidden_layers + key * table.num_indexer_layers)
    need = w.total + (w.mtp_total if s.mtp_steps else 0) + kv
    return max(1, math.ceil(need / (hw.memory * (1 - s.margin))))


def choose_layout(table: ParamTable, hw: Hardware, s: PlanSettings) -> tuple[int, int, DeviceMemory]:
    """(devices, attention TP, memory): the given ones, else the smallest power of two that fits, with the
    attention TP (a power of two within one scale-up domain, at most the head count) that needs least memory."""

    def tps(n: int) -> list[int]:
        if s.attn_tp is not None:
            if n % s.attn_tp:
                raise ValueError(f"attn_tp {s.attn_tp} does not divide {n} devices; pick a divisor")
            return [s.attn_tp]
        limit = min(n, hw.scale_up, table.config.num_attention_heads)
        return [t for t in (2**i for i in range(13)) if t <= limit and n % t == 0]

    def best(n: int) -> tuple[int, DeviceMemory]:
        options = [(device_memory(table, hw, s, n, t), t) for t in tps(n)]
        fitting = [o for o in options if o[0].fits] or options
        memory, tp = min(fitting, key=lambda o: (o[0].total, o[1]))
        return tp, memory

    if s.devices is not None:
        return (s.devices, *best(s.devices))
    n = 1
    while n <= s.max_devices:
        tp, memory = best(n)
        if memory.fits:
            return n, tp, memory
        n *= 2
    raise ValueError(
        f"{s.concurrency} x {s.context:,}-token sequences do not fit on {s.max_devices:,} {hw.name} "
        "devices; lower --context or --concurrency, or use --dtype fp8 / --kv-dtype fp8"
    )


def expected_distinct_experts(num_experts: int, k: int, tokens: float) -> float:
    """Distinct experts `tokens` tokens touch in one MoE layer when each picks k of E uniformly:
    E * (1 - (1 - k/E)^tokens)."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def attention_flops_per_token(
    cfg: GLM5Config, num_indexer_layers: int, keys: float, indexer_keys: float
) -> float:
    """MLA (absorbed / MQA mode: q.k over kv_lora_rank + rope dims, p.v over kv_lora_rank) over `keys` keys
    in every layer, plus the indexer (heads x dim multiply-adds) over `indexer_keys` keys per indexer layer."""
    mla = cfg.num_hidden_layers * cfg.num_attention_heads * 2 * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    indexer = num_indexer_layers * cfg.index_n_heads * cfg.index_head_dim * 2
    return mla * keys + indexer * indexer_keys


@dataclass(frozen=True)
class Decode:
    """Decode roofline of one step (every sequence advances by one verification)."""

    step_bytes: dict[str, float]
    """What one step reads, by kind (all devices together)."""
    step_flops: float
    memory_seconds: float
    """Step time at 100% of peak bandwidth."""
    compute_seconds: float
    """Step time at 100% of peak FLOPs."""
    efficiency: float
    tokens_per_step: float
    """Tokens each sequence gains per step (the MTP acceptance length, else 1)."""

    @property
    def bound(self) -> str:
        return "bandwidth" if self.memory_seconds >= self.compute_seconds else "compute"

    def per_user(self, efficiency: float | None = None) -> float:
        """Tokens/s one sequence sees at `efficiency` (default: the planned one) of the binding roofline."""
        eff = self.efficiency if efficiency is None else efficiency
        return self.tokens_per_step * eff / max(self.memory_seconds, self.compute_seconds)


def decode_roofline(table: ParamTable, hw: Hardware, s: PlanSettings, devices: int, attn_tp: int) -> Decode:
    """Bytes and FLOPs of one decode step of `s.concurrency` sequences at `s.context` (see the module notes)."""
    cfg, w = table.config, weight_bytes(table, s.dtype)
    batch, ctx, steps = s.concurrency, s.context, s.mtp_steps
    latent, key = kv_bytes_per_token_layer(cfg, s.kv_dtype)
    keys = min(cfg.index_topk, ctx)
    indexer_keys = ctx if ctx > cfg.index_topk else 0  # below top-k DSA is dense attention: no indexer needed
    busy_groups = min(devices // attn_tp, batch)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    queries = batch * (1 + steps)  # the verification step scores the drafts too
    kv_latent = queries * keys * latent * cfg.num_hidden_layers
    parts = {
        "non-expert weights": float(w.dense_read * busy_groups),
        "routed experts touched": w.num_moe_layers * w.per_expert * expected_distinct_experts(E, k, queries),
        "KV latents gathered (top-k)": float(kv_latent),
        "indexer keys scanned": float(batch * indexer_keys * key * table.num_indexer_layers),
    }
    active = table.active_with_head
    flops = queries * (
        2 * active + attention_flops_per_token(cfg, table.num_indexer_layers, keys, indexer_keys)
    )
    if steps:
        mtp_expert = w.mtp_routed / max(E * max(cfg.num_nextn_predict_layers, 1), 1)
        draft = (
            (w.mtp_total - w.mtp_routed + w.lm_head) * busy_groups
            + mtp_expert * expected_distinct_experts(E, k, batch)
            + batch * (keys * latent + indexer_keys * key)
        )
        parts["MTP draft steps"] = steps * draft
        draft_active = table.mtp_active + table.component_params("lm_head")
        flops += (
            steps
            * batch
            * (
                2 * draft_active
                + attention_flops_per_token(cfg, 1, keys, indexer_keys) / cfg.num_hidden_layers
            )
        )
    memory_s = sum(parts.values()) / (devices * hw.bandwidth)
    compute_s = flops / (devices * hw.flops(s.dtype))
    return Decode(parts, flops, memory_s, compute_s, s.bandwidth_efficiency, s.mtp_accept if steps else 1.0)


def prefill_flops_per_token(table: ParamTable, prompt_tokens: int) -> float:
    """Average FLOPs per token of a causal prefill of `prompt_tokens` tokens: 2 x active params (one lm_head
    row per prompt) + MLA over min(top-k, position) keys + the indexer over every earlier key (above top-k)."""
    cfg, n = table.config, prompt_tokens
    k = cfg.index_topk
    mla_keys = n * (n + 1) / 2 if n <= k else k * (k + 1) / 2 + (n - k) * k  # sum over positions of min(k, t)
    indexer_keys = n * (n + 1) / 2 if n > k else 0.0
    matmul = 2 * table.active_no_embed + 2 * table.component_params("lm_head") / n
    return matmul + attention_flops_per_token(cfg, table.num_indexer_layers, mla_keys / n, indexer_keys / n)


@dataclass(frozen=True)
class Plan:
    """Everything `glm5 plan` reports."""

    preset: str
    hardware: Hardware
    settings: PlanSettings
    weights: WeightBytes
    kv_bytes_per_token: int
    min_devices: int
    devices: int
    attn_tp: int
    memory: DeviceMemory
    decode: Decode
    prefill_flops_per_token: float
    prefill_tokens_per_s: float
    implied: list[dict]
    parameters: int = 0
    """Main-model parameters (without the MTP modules)."""
    mtp_parameters: int = 0
    """Unique parameters of the MTP modules (they share the embedding and head)."""
    active_parameters: int = 0
    """Main-model parameters one token uses, without embed_tokens and lm_head."""
    config: GLM5Config | None = None
    """The planned model's config."""

    @property
    def decode_per_user(self) -> float:
        return self.decode.per_user()

    @property
    def decode_aggregate(self) -> float:
        return self.decode_per_user * self.settings.concurrency

    def cost_per_million(self, tokens_per_s: float) -> float | None:
        price = self.settings.price_per_hour
        return None if price is None else price * self.devices / 3600 / tokens_per_s * 1e6

    def to_dict(self) -> dict:
        """JSON-ready figures (`glm5 plan --json`)."""
        d = self.decode
        return {
            "preset": self.preset,
            "hardware": dataclasses.asdict(self.hardware),
            "settings": dataclasses.asdict(self.settings),
            "weights": {**dataclasses.asdict(self.weights), "dense_read": self.weights.dense_read},
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "min_devices": self.min_devices,
            "devices": self.devices,
            "attn_tp": self.attn_tp,
            "attn_dp": self.devices // self.attn_tp,
            "memory_per_device": {
                **dataclasses.asdict(self.memory),
                "total": self.memory.total,
                "fits": self.memory.fits,
            },
            "decode": {
                "step_bytes": d.step_bytes,
                "step_flops": d.step_flops,
                "memory_seconds": d.memory_seconds,
                "compute_seconds": d.compute_seconds,
                "bound": d.bound,
                "tokens_per_step": d.tokens_per_step,
                "roofline_per_user": d.per_user(1.0),
                "per_user": self.decode_per_user,
                "aggregate": self.decode_aggregate,
            },
            "prefill": {
                "flops_per_token": self.prefill_flops_per_token,
                "tokens_per_s": self.prefill_tokens_per_s,
            },
            "cost_per_million": {
                "output": self.cost_per_million(self.decode_aggregate),
                "input": self.cost_per_million(self.prefill_tokens_per_s),
            },
            "implied": self.implied,
            "parameters": {
                "main": self.parameters,
                "mtp": self.mtp_parameters,
                "active": self.active_parameters,
            },
            "launch": launch_commands(self),
        }


def launch_commands(p: Plan, model: str = "/path/to/checkpoint") -> list[str]:
    """The plan's layout as `glm5 serve` flags: one command on one node, or the `torchrun` line each node runs
    (nodes of `hardware.scale_up` devices), preceded by a comment with the per-rank memory the plan predicts.

    TP t x DP d attention with experts over all N = t x d ranks is `-tp t` when d = 1 (the engine then divides
    the experts over the t ranks), else `-tp t -dp d -ep N` (data-parallel attention, glm5/engine/dp.py), with
    `--max-num-seqs` the sequences of one DP rank."""
    s, hw, cfg = p.settings, p.hardware, p.config
    t, n = p.attn_tp, p.devices
    d = n // t
    flags = ["--model", model]
    if s.dtype == "fp8":
        flags += ["--fp8", "keep"]
    if t > 1:
        flags += ["-tp", str(t)]
    if d > 1:
        flags += ["-dp", str(d), "-ep", str(n)]
    if s.mtp_steps:
        flags += ["--speculative-tokens", str(s.mtp_steps)]
    flags += ["--max-num-seqs", str(math.ceil(s.concurrency / d))]
    if cfg is not None and s.context < cfg.max_position_embeddings:
        flags += ["--max-model-len", str(s.context)]

    m, w = p.memory, p.weights
    mtp = ""
    if not s.mtp_steps and w.mtp_total:
        per_rank = (w.mtp_total - w.mtp_routed - w.mtp_replicated) / t + w.mtp_replicated + w.mtp_routed / n
        mtp = f" (+ {human_bytes(round(per_rank))}: the MTP layer, loaded without --speculative-tokens too)"
    lines = [
        f"# per rank (predicted): weights {human_bytes(round(m.weights))}{mtp}, KV cache "
        f"{human_bytes(round(m.kv_latent + m.kv_indexer))}, total with the margin {human_bytes(round(m.total))} "
        f"of {human_bytes(round(m.capacity))}"
    ]
    per_node = max(k for k in range(1, min(n, hw.scale_up) + 1) if n % k == 0)
    nodes = n // per_node
    if nodes == 1:
        return [*lines, " ".join(["glm5", "serve", *flags])]
    launcher = [
        "torchrun",
        *("--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--node-rank", "$NODE_RANK"),
        *("--master-addr", "$HEAD_ADDR", "--master-port", "29500"),
    ]
    lines.append(f"# on each of the {nodes} nodes (NODE_RANK 0 .. {nodes - 1}; the HTTP port is on node 0):")
    return [*lines, " ".join([*launcher, "-m", "glm5.cli", "serve", *flags, "--host", "0.0.0.0"])]


REPORTED_ZAI = (17.0, 19.0)
"""Z.ai API tokens/s per user at launch (docs/performance.md § Published serving speeds; hardware, load unknown)."""
REPORTED_SGLANG = {
    "hardware": "h200",
    "devices": 8,
    "attn_tp": 8,
    "dtype": "fp8",
    "mtp_steps": 3,
    "mtp_accept": 3.5,
    "context": 2048,
    "per_user_c1": 120.0,
    "total_c100": 1215.0,
}
"""SGLang on 8xH200 FP8 with MTP (3 steps, acceptance ~3.5): ~118-133 tok/s per user at concurrency 1, 1,215
tok/s in total at concurrency 100 (docs/performance.md). TP8 as in its recipe; the context (benchmark prompts of
~1-2K tokens) is our assumption."""


def implied_figures(
    table: ParamTable, plan_settings: PlanSettings, hw: Hardware, devices: int, attn_tp: int
) -> list[dict]:
    """What the reported speeds mean against this roofline: the bandwidth efficiency each one implies, and the
    concurrency at which the planned layout still gives a Z.ai launch user 17 tok/s."""
    out = []
    ref = REPORTED_SGLANG
    for concurrency, measured, label in (
        (1, ref["per_user_c1"], "SGLang 8xH200 FP8+MTP, 1 user"),
        (100, ref["total_c100"] / 100, "SGLang 8xH200 FP8+MTP, 100 users"),
    ):
        s = PlanSettings(
            dtype="fp8",
            context=ref["context"],
            concurrency=concurrency,
            mtp_steps=ref["mtp_steps"],
            mtp_accept=ref["mtp_accept"],
        )
        roof = decode_roofline(table, HARDWARE["h200"], s, ref["devices"], ref["attn_tp"]).per_user(1.0)
        out.append(
            {
                "what": label,
                "measured_per_user": measured,
                "roofline_per_user": roof,
                "implied_efficiency": measured / roof,
            }
        )
    roof = decode_roofline(table, hw, plan_settings, devices, attn_tp).per_user(1.0)
    lo, hi = REPORTED_ZAI
    out.append(
        {
            "what": f"Z.ai launch on this plan ({devices} x {hw.name}, {plan_settings.concurrency} users)",
            "measured_per_user": (lo + hi) / 2,
            "roofline_per_user": roof,
            "implied_efficiency": (lo + hi) / 2 / roof,
            "implied_efficiency_range": [lo / roof, hi / roof],
        }
    )

    # The largest batch that still gives 17 tok/s per user at the planned efficiency (doubling, then bisection).
    def rate(b: int) -> float:
        return decode_roofline(
            table, hw, dataclasses.replace(plan_settings, concurrency=b), devices, attn_tp
        ).per_user()

    if rate(1) >= lo:
        good, bad = 1, 2
        while bad <= 1 << 20 and rate(bad) >= lo:
            good, bad = bad, bad * 2
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if rate(mid) >= lo else (good, mid)
        # ... and the most sequences of this context the layout's memory holds (DP groups x sequences per group)
        probe = device_memory(table, hw, dataclasses.replace(plan_settings, concurrency=1), devices, attn_tp)
        free = probe.capacity - probe.weights - probe.margin
        per_sequence = probe.kv_latent + probe.kv_indexer
        by_memory = max(0, int(free // per_sequence)) * (devices // attn_tp)
        users = min(good, by_memory)
        out.append(
            {
                "what": f"users at {lo:g} tok/s each on this plan (efficiency {plan_settings.bandwidth_efficiency:g})",
                "max_concurrency": users,
                "bandwidth_limit": good,
                "memory_limit": by_memory,
                "aggregate": users * rate(max(users, 1)),
            }
        )
    return out


def plan(cfg: GLM5Config, hw: Hardware, settings: PlanSettings, preset: str = "") -> Plan:
    """Devices, layout, memory per device, decode/prefill rooflines and implied efficiencies for one deployment."""
    table = parameter_table(cfg)
    devices, attn_tp, memory = choose_layout(table, hw, settings)
    latent, key = kv_bytes_per_token_layer(cfg, settings.kv_dtype)
    prefill = prefill_flops_per_token(table, settings.context)
    prefill_rate = devices * hw.flops(settings.dtype) * settings.mfu / prefill
    return Plan(
        preset or "config",
        hw,
        settings,
        weight_bytes(table, settings.dtype),
        latent * cfg.num_hidden_layers + key * table.num_indexer_layers,
        min_devices_bound(table, hw, settings),
        devices,
        attn_tp,
        memory,
        decode_roofline(table, hw, settings, devices, attn_tp),
        prefill,
        prefill_rate,
        implied_figures(table, settings, hw, devices, attn_tp),
        table.total_main,
        table.mtp_params,
        table.active_no_embed,
        cfg,
    )
