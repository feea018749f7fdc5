"""`scalax plan`: will this config fit that slice? Compile the train step ahead of time for N devices (fake CPU
devices stand in for the real ones: the SPMD partitioning is the same) and read per-device memory.

Parameters and optimizer state per device are exact, from their shardings; `compiled.memory_analysis()` gives
the step's arguments, outputs (the donated state aliases its input) and temporaries (activations kept for the
backward pass, gradients, XLA's scratch). Peak ≈ arguments + outputs - aliased + temporaries. CPU compilation
does not fuse exactly as a TPU or GPU compiler would, so treat the temporaries as an estimate (±20%).
"""

from __future__ import annotations

import re

import jax

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


def plan(cfg, n_devices: int) -> dict:
    """Per-device memory (bytes) of one train step of `cfg` on its mesh over `n_devices` devices."""
    from scalax import config as config_lib
    from scalax.models import Decoder
    from scalax.parallel import mesh as mesh_lib
    from scalax.parallel import shardings
    from scalax.train import loop, optim, program

    if jax.device_count() < n_devices:
        raise ConfigError("--devices", f"only {jax.device_count()} devices here, asked for {n_devices}")
    loop.validate(cfg)
    model_cfg = config_lib.model_config(cfg)
    t = cfg.train
    config_lib.check_seq_len(t.seq_len, model_cfg)
    steps = loop.total_steps(t)
    layout = mesh_lib.layout(cfg.mesh, model_cfg, t.batch_size, devices=jax.devices()[:n_devices])
    prog = program.build(Decoder(model_cfg), optim.optimizer(cfg.optim, steps), optim.schedule(cfg.optim, steps),
                         layout, t.seed, t.seq_len, t.microbatches, t.z_loss)
    compiled = prog.train_step.lower(prog.abstract_state, prog.batch_shape(t.batch_size, t.seq_len)).compile()
    ma = compiled.memory_analysis()
    state = prog.abstract_state
    params = shardings.bytes_per_device(state.params, prog.state_sharding.params)
    opt = shardings.bytes_per_device(state.opt_state, prog.state_sharding.opt_state)
    out = {
        "devices": n_devices,
        "mesh": dict(layout.mesh.shape),
        "params_per_device": params,
        "optimizer_per_device": opt,
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
    }
    out["peak_per_device"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def verdict(report: dict, memory: int | None) -> str | None:
    if memory is None:
        return None
    return "fits" if report["peak_per_device"] <= memory else "does not fit"


def format_report(report: dict, memory: int | None, description: str) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    rows = [f"mesh {mesh} ({report['devices']} devices); per device:",
            f"  parameters        {report['params_per_device'] / GIB:10.3f} GiB",
            f"  optimizer state   {report['optimizer_per_device'] / GIB:10.3f} GiB",
            f"  step arguments    {report['arguments'] / GIB:10.3f} GiB (state + batch)",
            f"  temporaries       {report['temporaries'] / GIB:10.3f} GiB (activations, gradients, scratch)",
            f"  peak              {report['peak_per_device'] / GIB:10.3f} GiB"]
    rows.append("device   memory/chip   peak/memory   fits")
    for name, (size, _) in DEVICE_MEMORY.items():
        rows.append(f"{name:<8} {size / GIB:8.1f} GiB   {report['peak_per_device'] / size:10.0%}   "
                    f"{'yes' if report['peak_per_device'] <= size else 'no'}")
    if memory is not None:
        rows.append(f"{verdict(report, memory)} on {description}: peak {human(report['peak_per_device'])} is "
                    f"{report['peak_per_device'] / memory:.0%} of {human(memory)}")
    return "\n".join(rows)
