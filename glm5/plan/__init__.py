"""Capacity planning: parameter, memory and KV-cache accounting of a config (`glm5 info`) and the deployment
planner on a hardware catalog (`glm5 plan`).

- glm5.plan.accounting: the model's parameters sorted into components, weight bytes (BF16 / block FP8), KV cache.
- glm5.plan.planner: weight bytes by kind, memory per device, layout, decode/prefill rooflines, MTP, cost.
- glm5.plan.report: human-readable counts and bytes, and the rich tables both commands print.

Torch is imported only when a parameter table is built (the CLI's start-up stays torch-free).
"""

from glm5.plan.accounting import COMPONENTS, ParamTable, TensorEntry, parameter_table
from glm5.plan.planner import (
    DEFAULT_BANDWIDTH_EFFICIENCY,
    DEFAULT_MARGIN,
    DEFAULT_MFU,
    REPORTED_SGLANG,
    REPORTED_ZAI,
    Decode,
    DeviceMemory,
    Plan,
    PlanSettings,
    WeightBytes,
    attention_flops_per_token,
    choose_layout,
    decode_roofline,
    device_memory,
    expected_distinct_experts,
    implied_figures,
    kv_bytes_per_token_layer,
    launch_commands,
    min_devices_bound,
    plan,
    prefill_flops_per_token,
    tp_replicated,
    weight_bytes,
)
from glm5.plan.report import format_plan, format_table, summarize_config
from glm5.plan.units import human_bytes, human_count

__all__ = [
    "COMPONENTS",
    "DEFAULT_BANDWIDTH_EFFICIENCY",
    "DEFAULT_MARGIN",
    "DEFAULT_MFU",
    "REPORTED_SGLANG",
    "REPORTED_ZAI",
    "Decode",
    "DeviceMemory",
    "ParamTable",
    "Plan",
    "PlanSettings",
    "TensorEntry",
    "WeightBytes",
    "attention_flops_per_token",
    "choose_layout",
    "decode_roofline",
    "device_memory",
    "expected_distinct_experts",
    "format_plan",
    "format_table",
    "human_bytes",
    "human_count",
    "implied_figures",
    "kv_bytes_per_token_layer",
    "launch_commands",
    "min_devices_bound",
    "parameter_table",
    "plan",
    "prefill_flops_per_token",
    "summarize_config",
    "tp_replicated",
    "weight_bytes",
]
