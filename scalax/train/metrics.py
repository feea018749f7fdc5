"""What a run reports: metrics.jsonl (one JSON object per logged step), TensorBoard scalars, and the peak
FLOP/s that MFU is measured against. Only process 0 writes.

On a gs:// workdir metrics.jsonl is replaced by one upload per record (GCS objects cannot be appended to), and
TensorBoard's event files, which its writer appends to, are written in a local mirror (io.local_mirror) and
uploaded whole to WORKDIR/tensorboard at every flush (after each checkpoint save, and at the end):
TensorBoard reads them from the bucket."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from scalax import io

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
}


def measure_matmul_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n matmul on the default device: the CPU's stand-in for a data-sheet peak."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(compute_dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for this process's devices: a data sheet's, or on a device
    without one (a CPU) a matmul measured once per machine and dtype and then read from the cache, so that MFU
    compares across runs (measured anew by each run, it varied 2x on one machine)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{kind} data sheet"
    return cached_matmul_peak(jnp.dtype(compute_dtype).name, kind)


def _machine() -> str:
    """What the peak depends on: the CPU model and the CPUs this process may use."""
    model = platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model} x {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"


def cached_matmul_peak(dtype: str, kind: str) -> tuple[float, str]:
    """The best of 10 2048 x 2048 `dtype` matmuls, measured on the first call on this machine and kept in
    CACHE/peak_flops.json (io.cache_root) under (device kind, dtype, CPU model and count, jax version)."""
    path = os.path.join(io.cache_root(), "peak_flops.json")
    key = f"{kind} | {dtype} | {_machine()} | jax {jax.__version__}"
    table = io.read_json(path) if os.path.isfile(path) else {}
    if key not in table:
        flops = measure_matmul_flops(jnp.dtype(dtype), n=2048, repeats=10)
        table = io.read_json(path) if os.path.isfile(path) else {}  # (another process may have written since)
        table[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d")}
        io.atomic_write_json(path, table)
    entry = table[key]
    return entry["flops"], f"{dtype} matmul on {kind}, measured {entry['measured']}, cached in {path}"


class ScalarWriter:
    """TensorBoard scalars as classic scalar summaries (`simple_value`), which every reader finds: TensorBoard,
    `EventAccumulator.Scalars`, tbparse. (tensorboard.summary.Writer writes tensor summaries, which
    `EventAccumulator.Scalars` does not list.) Written with tensorboard's own protos: no TensorFlow."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # (slow import: process 0 only)

        self._dir = io.MirroredDir(logdir)
        self._writer = EventFileWriter(self._dir.local)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._writer.flush()
        self._dir.sync()

    def close(self) -> None:
        self._writer.close()
        self._dir.sync()


class MetricsLog:
    """Appends records to `workdir/metrics.jsonl` and TensorBoard scalars to `workdir/tensorboard`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = io.join(workdir, "metrics.jsonl")
        self._tb = ScalarWriter(io.join(workdir, "tensorboard")) if enabled else None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the restored checkpoint, so each step appears once."""
        if not self.enabled or not io.exists(self.path):
            return
        lines = io.read_text(self.path).splitlines(keepends=True)
        io.atomic_write_text(self.path, "".join(line for line in lines if (s := _step_of(line)) is not None
                                                and s <= step))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        io.append_text(self.path, json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and np.isfinite(value):
                self._tb.add_scalar(_tb_tag(key), float(value), step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    """The step of a record line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _tb_tag(key: str) -> str:
    """TensorBoard groups tags by prefix: train/..., eval/..., throughput/..., compute/..."""
    if key in ("tokens_per_s", "mfu"):
        return "throughput/" + key
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key.startswith(("tokens", "flops", "wall")):
        return "compute/" + key
    return "train/" + key
