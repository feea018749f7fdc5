"""The memory plan (`scalax plan`): will this config fit that slice? Compile the train step ahead of time for N
devices (fake CPU devices stand in for the real ones: the SPMD partitioning is the same) and read per-device
memory.

Parameters and optimizer state per device are exact, from their shardings; `compiled.memory_analysis()` gives
the step's arguments, outputs (the donated state aliases its input) and temporaries (activations kept for the
backward pass, gradients, XLA's scratch). Peak ≈ arguments + outputs - aliased + temporaries. CPU compilation
does not fuse exactly as a TPU or GPU compiler would, so treat the temporaries as an estimate (±20%).
"""

from __future__ import annotations

import jax

from scalax.errors import ConfigError
from scalax.parallel import shardings
from scalax.parallel.devices import DEVICE_MEMORY, GIB, human
from scalax.train.program import run_once_compiler_options
from scalax.train.setup import setup_run


def peak_bytes(ma) -> int:
    """A compiled step's peak per device from its memory_analysis(): arguments + outputs - aliased + temporaries."""
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def memory_plan(cfg, n_devices: int, platform: str | None = None) -> dict:
    """Per-device memory (bytes) of one call of `cfg`'s train step (K steps with train.steps_per_call K > 1) on
    its mesh over `n_devices` devices; `platform` (cpu, gpu, tpu; default this host's) is the one the run will
    use, which decides train.steps_per_call = 0 (auto)."""
    if jax.device_count() < n_devices:
        raise ConfigError("--devices", f"only {jax.device_count()} devices here, asked for {n_devices}")
    run = setup_run(cfg, devices=jax.devices()[:n_devices], platform=platform)
    prog, train_cfg = run.program, cfg.train
    # the program the run calls: with train.steps_per_call K > 1, K steps over a stack of K batches
    lowered = prog.lower_call(train_cfg.batch_size, train_cfg.seq_len)
    # compiled for its memory analysis only, so without LLVM's optimisations (the same buffers, sooner); these
    # options are added to the step's own (jax appends them; a key given again wins)
    compiled = lowered.compile(run_once_compiler_options())
    ma = compiled.memory_analysis()
    state = prog.abstract_state
    params = shardings.bytes_per_device(state.params, prog.state_sharding.params)
    opt = shardings.bytes_per_device(state.opt_state, prog.state_sharding.opt_state)
    out = {
        "devices": n_devices,
        "mesh": dict(run.layout.mesh.shape),
        "steps_per_call": prog.steps_per_call,
        "params_per_device": params,
        "optimizer_per_device": opt,
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
    }
    out["peak_per_device"] = peak_bytes(ma)
    return out


def verdict(report: dict, memory: int | None) -> str | None:
    if memory is None:
        return None
    return "fits" if report["peak_per_device"] <= memory else "does not fit"


def format_report(report: dict, memory: int | None, description: str) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    rows = [f"mesh {mesh} ({report['devices']} devices), {report['steps_per_call']} step(s) a call; per device:",
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
