"""The accelerator catalog of `glm5 plan`: per-device memory, bandwidth, matmul peaks and scale-up domain, with
where each figure comes from, and user-defined devices from JSON (`--hardware-file`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One accelerator (per-device, dense figures: no 2:4 sparsity) and the scale-up domain it sits in."""

    name: str
    memory_gb: float
    """HBM per device, GB (1e9 B)."""
    bandwidth_tbs: float
    """Peak HBM bandwidth per device, TB/s."""
    bf16_tflops: float
    """Dense BF16 matmul peak per device, TFLOP/s."""
    fp8_tflops: float
    """Dense 8-bit matmul peak per device, TFLOP/s: FP8, or INT8 where the chip has no FP8 units."""
    interconnect_gbs: float
    """Scale-up bandwidth per device, GB/s, one direction (NVLink, HCCS, UB)."""
    scale_up: int
    """Devices in one scale-up domain (a node, or a supernode)."""
    source: str
    """Where the figures come from."""
    approximate: bool = False
    """From public reporting rather than a vendor datasheet."""

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for the weight dtype ("bf16" or "fp8")."""
        return (self.fp8_tflops if dtype == "fp8" else self.bf16_tflops) * 1e12

    @property
    def memory(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_tbs * 1e12


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        # vendor spec: NVIDIA H100 Tensor Core GPU datasheet (SXM5; sparse FLOPs halved; NVLink 900 GB/s bidirectional)
        Hardware("h100", 80, 3.35, 989, 1979, 450, 8, "vendor spec (NVIDIA H100 SXM datasheet)"),
        # vendor spec: NVIDIA H200 datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, same tensor cores as H100
        Hardware("h200", 141, 4.8, 989, 1979, 450, 8, "vendor spec (NVIDIA H200 SXM datasheet)"),
        # vendor spec: NVIDIA HGX/DGX B200 (1,440 GB and 64 TB/s per 8 GPUs; sparse FLOPs halved; NVLink 5)
        Hardware("b200", 180, 8.0, 2250, 4500, 900, 8, "vendor spec (NVIDIA HGX B200)"),
        # public reporting: 64 GB HBM2e, ~1.6 TB/s, ~320 TFLOPS FP16/BF16, ~640 TOPS INT8 (no FP8), HCCS, 8/node
        Hardware(
            "ascend-910b",
            64,
            1.6,
            320,
            640,
            196,
            8,
            "public reporting (Huawei Ascend 910B); INT8 as 8-bit",
            approximate=True,
        ),
        # public reporting: two 910B-class dies; CloudMatrix 384 totals / 384 = 781 TFLOPS BF16, 128 GB, 3.2 TB/s
        Hardware(
            "ascend-910c",
            128,
            3.2,
            781,
            1562,
            196,
            8,
            "public reporting (SemiAnalysis, CloudMatrix 384 totals / 384); INT8 as 8-bit",
            approximate=True,
        ),
        # public reporting: 384 x 910C in one Unified-Bus supernode (300 PFLOPS BF16, 49.2 TB HBM, 1,229 TB/s),
        # ~392 GB/s UB per NPU (Huawei CloudMatrix384 paper, arXiv 2506.12708)
        Hardware(
            "cloudmatrix-384",
            128,
            3.2,
            781,
            1562,
            392,
            384,
            "public reporting (CloudMatrix384 paper, SemiAnalysis); per 910C NPU; INT8 as 8-bit",
            approximate=True,
        ),
    )
}
"""The catalog (per-device figures). `--hardware-file` adds user-defined devices."""
_ALIASES = {
    "910b": "ascend-910b",
    "910c": "ascend-910c",
    "cm384": "cloudmatrix-384",
    "cloudmatrix": "cloudmatrix-384",
}
_HW_FIELDS = {f.name for f in dataclasses.fields(Hardware)}
_HW_EXAMPLE = (
    '{"name": "my-gpu", "memory_gb": 96, "bandwidth_tbs": 4.0, "bf16_tflops": 900, "fp8_tflops": 1800, '
    '"interconnect_gbs": 450, "scale_up": 8}'
)


def hardware_from_dict(raw: object, where: str = "hardware") -> Hardware:
    """A user-defined device from a JSON object; ValueError naming the bad field and the expected shape."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object like {_HW_EXAMPLE}")
    unknown = sorted(set(raw) - _HW_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; the fields are {sorted(_HW_FIELDS)}")
    required = ("name", "memory_gb", "bandwidth_tbs", "bf16_tflops")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; example: {_HW_EXAMPLE}")
    values = {
        "fp8_tflops": raw["bf16_tflops"],
        "interconnect_gbs": 0.0,
        "scale_up": 8,
        "source": "user-defined",
        **raw,
    }
    for key in ("memory_gb", "bandwidth_tbs", "bf16_tflops", "fp8_tflops", "interconnect_gbs", "scale_up"):
        value = values[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < 0
            or (value == 0 and key != "interconnect_gbs")
        ):
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    if not isinstance(values["name"], str) or not values["name"]:
        raise ValueError(f"{where}: name must be a non-empty string")
    return Hardware(**{**values, "scale_up": int(values["scale_up"])})


def load_hardware_file(path: str) -> Hardware:
    """Read one user-defined device from a JSON file (see `hardware_from_dict`)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no hardware file {path!r}; write a JSON object like {_HW_EXAMPLE}") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"hardware file {path!r} is not valid JSON ({e}); write an object like {_HW_EXAMPLE}"
        ) from None
    return hardware_from_dict(raw, where=f"hardware file {path!r}")


def get_hardware(name: str) -> Hardware:
    """A catalog device by name (case-insensitive; '910c', 'cm384' ... accepted)."""
    key = name.lower().strip()
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise ValueError(
            f"unknown hardware {name!r}; choose from {', '.join(HARDWARE)}, or describe it in a JSON "
            "file and pass --hardware-file FILE"
        )
    return HARDWARE[key]
