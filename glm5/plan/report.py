"""Formatting of `glm5 info` and `glm5 plan`: human-readable counts and bytes, and the rich tables."""

from __future__ import annotations

import math

from rich.table import Table

from glm5.config import GLM5Config
from glm5.plan.accounting import COMPONENTS, ParamTable
from glm5.plan.planner import Plan
from glm5.plan.units import human_bytes, human_count


def summarize_config(cfg: GLM5Config) -> str:
    """One line: layers, experts, widths, context."""
    layers = cfg.num_hidden_layers
    dense = min(cfg.first_k_dense_replace, layers)
    shared = f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
    experts = f"{cfg.n_routed_experts} experts (top-{cfg.num_experts_per_tok}{shared})"
    return (
        f"{layers} layers ({dense} dense, {layers - dense} MoE), {experts}, hidden {cfg.hidden_size:,}, "
        f"vocab {cfg.vocab_size:,}, context {cfg.max_position_embeddings:,}"
    )


def format_table(table: ParamTable, title: str | None = None) -> Table:
    """A rich Table: parameters by component, totals, active parameters, weight memory and KV cache."""
    cfg, main = table.config, table.total_main
    out = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    out.add_column("", no_wrap=True)
    out.add_column("exact", justify="right", no_wrap=True)
    out.add_column("approx", justify="right", no_wrap=True)
    out.add_column("share / GiB", justify="right", no_wrap=True)
    components = sorted(COMPONENTS, key=lambda c: -table.component_params(c))
    for comp in components:
        n = table.component_params(comp)
        if n:
            out.add_row(COMPONENTS[comp], f"{n:,}", human_count(n), f"{100 * n / main:.2f}%")
    out.add_section()
    k, num_experts, num_mtp = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.num_nextn_predict_layers
    mtp = f"MTP ({num_mtp} module{'' if num_mtp == 1 else 's'}, unique)"
    rows = [("total (main model)", main), (mtp, table.mtp_params), ("total incl. MTP", table.total_with_mtp)]
    rows = rows if num_mtp else rows[:1]  # without MTP modules the MTP rows would repeat the main model
    rows += [
        (f"active/token, no embed ({k}/{num_experts})", table.active_no_embed),
        ("active/token + lm_head", table.active_with_head),
    ]
    if num_mtp:
        rows.append(("active per MTP draft step", table.mtp_active))
    for label, n in rows:
        out.add_row(label, f"{n:,}", human_count(n), "")
    out.add_section()
    memory = [("BF16 weights (main)", table.bf16_bytes()), ("FP8 weights (main)", table.fp8_bytes())]
    if num_mtp:
        memory.insert(1, ("BF16 weights incl. MTP", table.bf16_bytes(include_mtp=True)))
        memory.append(("FP8 weights incl. MTP", table.fp8_bytes(include_mtp=True)))
    for label, n in memory:
        out.add_row(label, f"{n:,} B", human_bytes(n), human_bytes(n, binary=True))
    out.add_section()
    seq = cfg.max_position_embeddings
    layers, indexers = cfg.num_hidden_layers, table.num_indexer_layers
    for label, fp8 in (
        (f"KV/token ({layers} MLA + {indexers} idx)", False),
        ("KV/token, FP8 indexer keys", True),
    ):
        n = table.kv_bytes_per_token(fp8_indexer=fp8)
        out.add_row(label, f"{n:,} B", human_bytes(n), human_bytes(n, binary=True))
        n = table.kv_bytes(fp8_indexer=fp8)
        out.add_row(f"  x {seq:,} tokens", f"{n:,} B", human_bytes(n), human_bytes(n, binary=True))
    biases = table.num_router_bias
    out.caption = (
        f"+ {biases:,} fp32 router-bias buffer entries, counted in the bytes\nGB = 1e9 B, GiB = 2^30 B"
    )
    out.caption_justify = "left"
    return out


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


def _seconds(x: float) -> str:
    return f"{x * 1e3:,.2f} ms" if x < 1 else f"{x:,.2f} s"


Row = tuple[str, str, str]
"""(label, value, note): one row of the `glm5 plan` table."""


def _plan_title(p: Plan) -> str:
    s, hw = p.settings, p.hardware
    approx = " (approximate figures)" if hw.approximate else ""
    mtp = f", MTP {s.mtp_steps} steps accepting {s.mtp_accept:g}" if s.mtp_steps else ""
    title = (
        f"{p.preset} on {p.devices} x {hw.name}{approx}: {s.dtype} weights, {s.context:,}-token context x "
        f"{s.concurrency} sequences{mtp}"
    )
    if p.parameters:  # what is planned: the model's size and what a token uses
        extra = f" (+ {human_count(p.mtp_parameters)} MTP)" if p.mtp_parameters else ""
        title = (
            f"{p.preset}: {human_count(p.parameters)} parameters{extra}, {human_count(p.active_parameters)} "
            f"active per token\n{title}"
        )
    return title


def _size_rows(p: Plan) -> list[Row]:
    s, w = p.settings, p.weights
    weights_all = w.total + (w.mtp_total if s.mtp_steps else 0)
    return [
        (
            f"weights ({s.dtype}{' incl. MTP' if s.mtp_steps else ''})",
            human_bytes(weights_all),
            f"{weights_all:,} B",
        ),
        (
            "KV cache per token",
            f"{p.kv_bytes_per_token:,} B",
            f"{s.kv_dtype} MLA latent + fp8 indexer keys (+ fp32 scale)",
        ),
    ]


def _memory_rows(p: Plan) -> list[Row]:
    s, hw, m = p.settings, p.hardware, p.memory
    cap = m.capacity
    rows = [
        (f"  per device: {label}", human_bytes(round(value)), f"{value / cap:.1%} of {hw.memory_gb:g} GB")
        for label, value in (
            ("weights", m.weights),
            ("KV latent cache", m.kv_latent),
            ("indexer key cache", m.kv_indexer),
            (f"activation margin ({s.margin:.0%})", m.margin),
        )
    ]
    verdict = "fits" if m.fits else "DOES NOT FIT"
    return [*rows, ("  per device: total", human_bytes(round(m.total)), f"{m.total / cap:.1%}, {verdict}")]


def _layout_rows(p: Plan) -> list[Row]:
    hw = p.hardware
    dp = p.devices // p.attn_tp
    domains = math.ceil(p.devices / hw.scale_up)
    return [
        ("minimum devices (perfect sharding)", f"{p.min_devices:,}", "weights + all caches / usable memory"),
        (
            "suggested devices",
            f"{p.devices:,}",
            f"{domains} scale-up domain{'s' if domains > 1 else ''} of {hw.scale_up}",
        ),
        (
            "layout",
            f"TP{p.attn_tp} x DP{dp} attn, EP{p.devices}",
            "experts sharded over all devices; MLA/dense/shared/embed TP within a DP group",
        ),
    ]


def _decode_rows(p: Plan) -> list[Row]:
    s, hw, d = p.settings, p.hardware, p.decode
    rows = [
        (f"  decode step reads: {kind}", human_bytes(round(nbytes)), "")
        for kind, nbytes in d.step_bytes.items()
    ]
    total_bytes = sum(d.step_bytes.values())
    return rows + [
        (
            "decode step at 100% peak",
            _seconds(max(d.memory_seconds, d.compute_seconds)),
            f"{human_bytes(round(total_bytes))} / {p.devices} x {hw.bandwidth_tbs:g} TB/s; {d.bound}-bound "
            f"(compute {_seconds(d.compute_seconds)})",
        ),
        ("decode roofline per user", f"{_rate(d.per_user(1.0))} tok/s", "100% of peak bandwidth"),
        (
            "decode per user",
            f"{_rate(p.decode_per_user)} tok/s",
            f"at {s.bandwidth_efficiency:.0%} efficiency"
            + (f", x{s.mtp_accept:g} accepted" if s.mtp_steps else ""),
        ),
        ("decode aggregate", f"{_rate(p.decode_aggregate)} tok/s", f"{s.concurrency} sequences"),
    ]


def _prefill_rows(p: Plan) -> list[Row]:
    s, hw = p.settings, p.hardware
    return [
        (
            "prefill FLOPs per token",
            f"{p.prefill_flops_per_token / 1e9:,.1f} GFLOP",
            f"avg over a {s.context:,}-token prompt (2 x active + MLA + indexer)",
        ),
        (
            "prefill throughput",
            f"{_rate(p.prefill_tokens_per_s)} tok/s",
            f"{p.devices} x {hw.flops(s.dtype) / 1e12:,.0f} TFLOP/s ({s.dtype}) x MFU {s.mfu:.0%}",
        ),
        (
            "prefill of one full context",
            _seconds(s.context / p.prefill_tokens_per_s),
            "whole cluster on one prompt",
        ),
    ]


def _cost_rows(p: Plan) -> list[Row]:
    """Cost per million tokens (none without --price-per-hour)."""
    s = p.settings
    if s.price_per_hour is None:
        return []
    return [
        (
            "cost per 1M output tokens",
            f"{p.cost_per_million(p.decode_aggregate):,.3f}",
            f"{s.price_per_hour:g}/device-hour x {p.devices}, at the decode aggregate",
        ),
        (
            "cost per 1M input tokens",
            f"{p.cost_per_million(p.prefill_tokens_per_s):,.3f}",
            "at the prefill rate",
        ),
    ]


def _implied_rows(p: Plan) -> list[Row]:
    rows = []
    for row in p.implied:
        if "implied_efficiency" in row:
            extra = ""
            if "implied_efficiency_range" in row:
                lo, hi = row["implied_efficiency_range"]
                extra = f" ({lo:.1%}-{hi:.1%} for 17-19 tok/s)"
            rows.append(
                (
                    f"implied: {row['what']}",
                    f"{row['implied_efficiency']:.1%}",
                    f"{_rate(row['measured_per_user'])} tok/s/user vs roofline "
                    f"{_rate(row['roofline_per_user'])}{extra}",
                )
            )
        else:
            limit = "memory" if row["memory_limit"] < row["bandwidth_limit"] else "bandwidth"
            rows.append(
                (
                    f"implied: {row['what']}",
                    f"{row['max_concurrency']:,} users",
                    f"{_rate(row['aggregate'])} tok/s in total; {limit}-limited (bandwidth allows "
                    f"{row['bandwidth_limit']:,}, memory {row['memory_limit']:,} at this context)",
                )
            )
    return rows


def format_plan(p: Plan) -> Table:
    """The plan as one rich Table with sections: sizes, memory per device, layout, decode, prefill, cost (with
    a price), implied."""
    out = Table(title=_plan_title(p), title_justify="left", show_edge=False, pad_edge=False)
    # Narrow consoles wrap the label and note cells rather than cut them (`glm5 plan` prints piped output at
    # the table's full width, so nothing wraps there).
    out.add_column("", overflow="fold", min_width=20)
    out.add_column("value", justify="right", no_wrap=True)
    out.add_column("note", overflow="fold", min_width=20)
    sections = (
        _size_rows,
        _memory_rows,
        _layout_rows,
        _decode_rows,
        _prefill_rows,
        _cost_rows,
        _implied_rows,
    )
    for i, rows in enumerate(rows for rows in (section(p) for section in sections) if rows):
        if i:
            out.add_section()
        for row in rows:
            out.add_row(*row)
    out.caption = (
        f"hardware: {p.hardware.source}. GB = 1e9 B. Decode roofline = bytes read per step / aggregate HBM "
        "bandwidth (or FLOPs / peak when larger); efficiency and MFU are assumptions (--bandwidth-efficiency, --mfu)."
    )
    out.caption_justify = "left"
    return out
