"""The train step on CPU with glibc's default malloc against scalax's setting (train/host_memory.py: freed blocks
kept for reuse), each in its own process, the two alternating within each round.

    python benchmarks/host_memory.py [--shapes 16x1,32x1,64x2,128x1] [--cpus 0] [--rounds 3] [--steps 40]

A shape is d_model x n_layers of the quickstart's LLaMA (heads of 16, d_ff 3 d_model, batch 14 x 128 tokens),
its step compiled as `scalax train` compiles it. `--cpus 0` pins each process to CPU 0 as `scalax sweep` pins
its runs (`--cpus ""`: unpinned). Prints a markdown table of the median ms/step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("default", "keep")


def child(mode: str, shape: str, steps: int) -> None:
    """Time `steps` steps three times after a warm-up; print the ms/step of each as JSON."""
    if mode == "keep":
        from scalax.train.host_memory import keep_freed_memory

        assert keep_freed_memory(), "mallopt refused the settings"
    import jax
    import numpy as np

    from scalax import config as config_lib
    from scalax.train.setup import setup_run

    d_model, n_layers = map(int, shape.split("x"))
    cfg = config_lib.load("configs/sweeps/quickstart.py").base
    cfg.model.update(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 16),
                     n_kv_heads=max(1, d_model // 16), d_ff=3 * d_model)
    cfg.train.update(batch_size=14)
    run = setup_run(cfg)
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, (14, 129), dtype=np.int32)
    batch = jax.device_put(tokens, run.layout.batch_sharding)
    state = run.program.init()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = run.program.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps * 1e3)
    print(json.dumps(times[1:]))  # the first round compiles and warms up


def spawn(mode: str, shape: str, steps: int, cpus: str) -> float:
    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})

    out = subprocess.run([sys.executable, __file__, "--child", mode, "--shapes", shape, "--steps", str(steps)],
                         capture_output=True, text=True, check=True, preexec_fn=pin)
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="16x1,32x1,64x2,128x1")
    parser.add_argument("--cpus", default="0", help="CPUs to pin each process to, comma-separated; '' for none")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shapes, args.steps)
    print(f"# {time.strftime('%Y-%m-%d')}, pinned to CPUs {args.cpus or 'none'}")
    print("| d_model x layers | glibc default ms/step | kept ms/step | speed-up |\n|---|---|---|---|")
    for shape in args.shapes.split(","):
        ms = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                ms[mode].append(spawn(mode, shape, args.steps, args.cpus))
        default, keep = (statistics.median(ms[mode]) for mode in MODES)
        print(f"| {shape} | {default:.2f} | {keep:.2f} | {default / keep:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
