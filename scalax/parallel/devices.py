"""Accelerators as facts: memory per chip by name (TPU v4 ... H200), and memory sizes as people write them."""

from __future__ import annotations

import re

from scalax.errors import ConfigError

GIB = 2**30
GB = 10**9

# Memory per chip (HBM), as the vendors publish it.
DEVICE_MEMORY: dict[str, tuple[int, str]] = {
    "v4": (32 * GIB, "TPU v4, 32 GiB HBM2"),
    "v5e": (16 * GIB, "TPU v5e, 16 GiB HBM2"),
    "v5p": (95 * GIB, "TPU v5p, 95 GiB HBM2e"),
    "v6e": (32 * GIB, "TPU v6e (Trillium), 32 GiB HBM"),
    "h100": (80 * GB, "NVIDIA H100 SXM, 80 GB HBM3"),
    "h200": (141 * GB, "NVIDIA H200, 141 GB HBM3e"),
}
# each named device's JAX platform, read off its description (which decides train.steps_per_call = 0)
PLATFORM = {name: "gpu" if text.startswith("NVIDIA") else "tpu" for name, (_, text) in DEVICE_MEMORY.items()}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": GB, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": GIB,
         "TIB": 2**40}


def human(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def parse_memory(text: str) -> int:
    """'16GiB', '80GB', '1.5 TiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError("--device-memory", f"cannot read {text!r}; allowed: a number with a unit such as 16GiB, "
                          "80GB, 512MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def device_memory(device: str | None, memory: str | None) -> tuple[int | None, str]:
    """(bytes, description) of the target device, from --device or --device-memory (or neither)."""
    if device and memory:
        raise ConfigError("--device", "give --device or --device-memory, not both")
    if device:
        key = device.lower()
        if key not in DEVICE_MEMORY:
            raise ConfigError("--device", f"unknown device {device!r}; allowed: {', '.join(DEVICE_MEMORY)}")
        return DEVICE_MEMORY[key]
    if memory:
        n = parse_memory(memory)
        return n, f"{human(n)} per device"
    return None, "no device given"


