"""Which slice each run gets: the smallest slice of the asked generation on which the memory plan (`scalax plan`:
the train step compiled ahead of time for that many devices) fits the chip's memory.

Plans run in a child process per slice size (XLA reads its fake device count once), all pending runs in one
child, and are cached in CACHE/plans by (run config, devices), so a `--dry-run` followed by the launch, or a
restarted launch, compiles nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from scalax import io
from scalax.launch.tpus import Slice, device_memory, slices_up_to
from scalax.parallel.devices import human

# What does not change the compiled step: where the data is and how it is read (the tokenizer stays: the vocabulary)
_NOT_PLANNED = ("corpus", "cache_dir", "prefetch", "text_field", "val_fraction", "token_dtype")


def _key(config: dict, devices: int) -> str:
    data = {k: v for k, v in config.get("data", {}).items() if k not in _NOT_PLANNED}
    text = json.dumps({"config": {**config, "data": data}, "devices": devices}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plans(configs: dict[str, dict], devices: int) -> dict[str, dict]:
    """name -> {"peak": bytes per device} or {"error": one line}, from the cache or one child process."""
    cache = os.path.join(io.cache_root(), "plans")
    out, todo = {}, {}
    for name, config in configs.items():
        path = os.path.join(cache, _key(config, devices) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
        else:
            todo[name] = config
    if not todo:
        return out
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    names = list(todo)
    n_children = max(1, min(len(names), (os.cpu_count() or 1), 4))  # compiles are single-threaded mostly
    children = [(subprocess.Popen([sys.executable, "-m", "scalax.launch.placement", str(devices)], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 {n: todo[n] for n in names[i::n_children]}) for i in range(n_children)]
    for proc, part in children:
        stdout, stderr = proc.communicate(json.dumps(part))
        if proc.returncode != 0:
            lines = stderr.strip().splitlines()
            raise RuntimeError(f"the memory plan on {devices} devices failed: {lines[-1] if lines else '?'}")
        for name, result in json.loads(stdout).items():
            io.atomic_write_json(os.path.join(cache, _key(todo[name], devices) + ".json"), result)
            out[name] = result
    return out


def choose_slices(configs: dict[str, dict], largest: Slice, log=print) -> dict[str, Slice | str]:
    """name -> the smallest slice up to `largest` that the run fits, or why it fits none."""
    chosen: dict[str, Slice | str] = {}
    pending = dict(configs)
    for slice_ in slices_up_to(largest):
        if not pending:
            break
        chips = f"{slice_.chips} chip" + ("s" if slice_.chips > 1 else "")
        log(f"launch: planning {len(pending)} run(s) on {slice_.name} ({chips})")
        memory = device_memory(slice_)
        for name, result in _plans(pending, slice_.chips).items():
            if "peak" in result and result["peak"] <= memory:
                chosen[name] = slice_
                del pending[name]
            else:
                chosen[name] = (f"needs {human(result['peak'])} per chip on {slice_.name} "
                                f"({human(memory)} each)" if "peak" in result else f"{slice_.name}: {result['error']}")
    return chosen


def _main() -> None:
    """Child: plan the configs on stdin on this process's devices; print name -> result as JSON."""
    import jax  # noqa: F401  (after XLA_FLAGS are set by the parent)
    from ml_collections import ConfigDict

    from scalax.errors import ScalaxError
    from scalax.train import memory

    devices = int(sys.argv[1])
    out = {}
    for name, config in json.loads(sys.stdin.read()).items():
        try:
            out[name] = {"peak": memory.memory_plan(ConfigDict(config), devices, "tpu")["peak_per_device"]}
        except ScalaxError as e:
            out[name] = {"error": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
