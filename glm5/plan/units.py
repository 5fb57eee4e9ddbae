"""Human-readable counts and byte sizes, shared by the planner and its tables."""

from __future__ import annotations


def human_count(n: int) -> str:
    """753864119552 -> '753.9B'; 9952920320 -> '9.95B'; 951582720 -> '951.6M' (two decimals below 10)."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:,.{2 if abs(value) < 10 else 1}f}{unit}"
    return str(n)


def human_bytes(n: int, binary: bool = False) -> str:
    """At least three significant digits, in units up to GB: 1487822475264 -> '1,488 GB', 746130054912 ->
    '746 GB', 22267035648 -> '22.3 GB'; binary=True -> GiB etc."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB")) if binary else (1000, ("B", "KB", "MB", "GB"))
    value, unit = float(n), units[0]
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            break
        value /= base
    if unit == "B":
        return f"{n:,} B"
    digits = max(0, 3 - len(str(int(abs(value)))))
    return f"{value:,.{digits}f} {unit}"
