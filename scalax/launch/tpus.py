"""Cloud TPU slices as facts (chips, hosts, memory, peak FLOP/s, runtime image), their prices, and the cost of a
sweep before anything is created: FLOPs -> chip-hours at an assumed MFU -> dollars and wall time.

A slice is named as `gcloud` and xpk name it: `v4-16`, `v5litepod-8`, `v5p-32`, `v6e-4`. The number counts
TensorCores on v4 and v5p (2 per chip) and chips on v5e and v6e.
"""

from __future__ import annotations

import dataclasses
import math

from scalax.errors import ConfigError
from scalax.parallel.devices import DEVICE_MEMORY


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as in accelerator types: v4, v5litepod, v5p, v6e
    device: str  # the key of parallel.devices.DEVICE_MEMORY (scalax plan --device)
    cores_per_chip: int  # what the number in the type counts per chip
    sizes: tuple[int, ...]  # the numbers of the slice types gcloud offers, smallest first
    chips_per_host: int  # on multi-host slices
    single_host_chips: int  # the largest slice that is one host
    peak_flops: float  # dense bf16 FLOP/s per chip, as Google publishes it
    runtime_version: str  # the TPU VM software image for `queued-resources create`
    price: float  # USD per chip-hour, on demand
    spot_price: float  # USD per chip-hour, spot


# Prices: USD per chip-hour in us-central regions, as read from https://cloud.google.com/tpu/pricing (on demand)
# and the Spot VM prices page, recorded 2026-12-02. Prices differ by region and change: pass --price to use
# your own. Peak FLOP/s: the system-architecture pages of https://cloud.google.com/tpu/docs (bf16, per chip).
GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("v4", "v4", 2, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), 4, 4, 275e12,
               "tpu-ubuntu2204-base", 3.22, 1.45),
    Generation("v5litepod", "v5e", 1, (1, 4, 8, 16, 32, 64, 128, 256), 4, 8, 197e12,
               "v2-alpha-tpuv5-lite", 1.20, 0.48),
    Generation("v5p", "v5p", 2, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144, 8192, 12288), 4, 4,
               459e12, "v2-alpha-tpuv5", 4.20, 1.89),
    Generation("v6e", "v6e", 1, (1, 4, 8, 16, 32, 64, 128, 256), 4, 8, 918e12, "v2-alpha-tpuv6e", 2.70, 1.08),
)}

# The MFU assumed for a run when none is given (--mfu), by non-embedding parameters: small models keep a TPU's
# matrix units far less busy than MaxText's 45-70% at 8B-128B (short rows, the embedding and the softmax weigh
# more); these are deliberately modest guesses, not measurements.
MFU_BY_SIZE = ((2e7, 0.05), (2e8, 0.15), (2e9, 0.30), (math.inf, 0.45))


@dataclasses.dataclass(frozen=True)
class Slice:
    generation: Generation
    size: int  # the number in the type's name

    @property
    def name(self) -> str:
        return f"{self.generation.name}-{self.size}"

    @property
    def chips(self) -> int:
        return self.size // self.generation.cores_per_chip

    @property
    def hosts(self) -> int:
        g = self.generation
        return 1 if self.chips <= g.single_host_chips else self.chips // g.chips_per_host


def _allowed() -> str:
    return ", ".join(f"{g.name}-{g.sizes[0]} ... {g.name}-{g.sizes[-1]}" for g in GENERATIONS.values())


def parse(text: str, key: str = "--tpu") -> Slice:
    """`v5litepod-16` -> that slice; a bare generation (`v5litepod`) -> its largest slice."""
    name, _, size = text.strip().lower().rpartition("-") if "-" in text else (text.strip().lower(), "", "")
    if name in ("v5e", "v5lite"):
        name = "v5litepod"
    if name not in GENERATIONS:
        raise ConfigError(key, f"unknown TPU type {text!r}; allowed: {_allowed()}")
    generation = GENERATIONS[name]
    if not size:
        return Slice(generation, generation.sizes[-1])
    if not size.isdigit() or int(size) not in generation.sizes:
        raise ConfigError(key, f"unknown TPU type {text!r}; {name} comes in sizes "
                          f"{', '.join(map(str, generation.sizes))}")
    return Slice(generation, int(size))


def slices_up_to(largest: Slice) -> list[Slice]:
    """The slices of `largest`'s generation from the smallest up to it."""
    return [Slice(largest.generation, n) for n in largest.generation.sizes if n <= largest.size]


def device_memory(slice_: Slice) -> int:
    return DEVICE_MEMORY[slice_.generation.device][0]


def assumed_mfu(params_non_embedding: float) -> float:
    return next(mfu for bound, mfu in MFU_BY_SIZE if params_non_embedding < bound)


@dataclasses.dataclass(frozen=True)
class RunCost:
    name: str
    slice: str
    chips: int
    flops: float  # training FLOPs (models.flops "exact": matmuls and attention, forward and backward)
    mfu: float
    chip_hours: float
    dollars: float
    hours: float  # wall time on its slice, compute only


def run_cost(name: str, slice_: Slice, flops: float, params_non_embedding: float, spot: bool,
             mfu: float | None = None, price: float | None = None) -> RunCost:
    """chip-hours = FLOPs / (peak per chip x MFU) / 3600; dollars = chip-hours x price; hours = chip-hours / chips."""
    mfu = assumed_mfu(params_non_embedding) if mfu is None else mfu
    g = slice_.generation
    chip_hours = flops / (g.peak_flops * mfu) / 3600
    price = (g.spot_price if spot else g.price) if price is None else price
    return RunCost(name, slice_.name, slice_.chips, flops, mfu, chip_hours, chip_hours * price,
                   chip_hours / slice_.chips)


def makespan(hours: list[float], slots: int) -> float:
    """Wall hours of runs placed as the launcher places them: in the given order, each on the first free of
    `slots` slices."""
    free = [0.0] * max(1, slots)
    for h in hours:
        i = free.index(min(free))
        free[i] += h
    return max(free) if hours else 0.0


def format_costs(costs: list[RunCost], slots: int, spot: bool) -> str:
    lines = [f"{'run':<28} {'slice':<14} {'PFLOP':>10} {'MFU':>5} {'chip-h':>9} {'USD':>10} {'hours':>8}"]
    for c in costs:
        lines.append(f"{c.name:<28} {c.slice:<14} {c.flops / 1e15:>10.4g} {c.mfu:>5.0%} {c.chip_hours:>9.4g} "
                     f"{c.dollars:>10.4g} {c.hours:>8.3g}")
    total_usd = sum(c.dollars for c in costs)
    wall = makespan([c.hours for c in costs], slots)
    lines.append(f"total: {sum(c.chip_hours for c in costs):.4g} chip-hours, ${total_usd:.4g} "
                 f"({'spot' if spot else 'on-demand'} prices of 2026-12-02, us-central; --price to change), "
                 f"about {wall:.3g} h of compute on {slots} slice(s) at once, plus creating the slices and "
                 "compiling; MFU assumed by model size (--mfu to change)")
    return "\n".join(lines)
