"""The train step on CPU with XLA's default options against scalax's (program.step_compiler_options: YNNPACK
fusions off, LLVM O2, XLA's tree-reduction rewrite off), at quickstart shapes, in one process, the two
alternating within each round; also each variant's compile time (the first compile of the process, a
throwaway, goes before).

    python benchmarks/cpu_step_options.py [--shapes 16x1,64x2,128x2] [--rounds 3] [--steps 30]

A shape is d_model x n_layers of the quickstart's LLaMA (heads of 16, d_ff 3 d_model, batch 14 x 128 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from scalax import config as config_lib
from scalax.train import program
from scalax.train.setup import setup_run


def build(d_model: int, n_layers: int, options: dict | None):
    cfg = config_lib.load("configs/sweeps/quickstart.py").base
    cfg.model.update(d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 16),
                     n_kv_heads=max(1, d_model // 16), d_ff=3 * d_model)
    cfg.train.update(batch_size=14)
    run = setup_run(cfg)
    prog = run.program
    step = jax.jit(prog.train_step.jitted.__wrapped__, in_shardings=(prog.state_sharding, run.layout.batch_sharding),
                   donate_argnums=0, compiler_options=options)
    tokens = np.random.default_rng(0).integers(0, run.model.vocab_size, (14, 129), dtype=np.int32)
    batch = jax.device_put(tokens, run.layout.batch_sharding)
    with run.layout.context():
        lowered = step.lower(prog.abstract_state, batch)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
    state = prog.init()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    return {"step": compiled, "state": state, "batch": batch, "compile_s": compile_s,
            "ynn": "__ynn_fusion" in compiled.as_text()}


def ms_per_step(v: dict, steps: int) -> float:
    start, state = time.perf_counter(), v["state"]
    for _ in range(steps):
        state, m = v["step"](state, v["batch"])
    jax.block_until_ready(m)
    v["state"] = state
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="16x1,64x2,128x2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    ours = program.step_compiler_options()
    print(f"# {time.strftime('%Y-%m-%d')}, jax {jax.__version__}; scalax's options: {ours}")
    jax.jit(lambda x: x + 1).lower(0.0).compile()  # XLA's one-time start-up, outside the compile times
    print("| d_model x layers | XLA defaults ms/step | scalax's options ms/step | speed-up | compile s (default, "
          "ours) | YNN fusions (default, ours) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        d_model, n_layers = map(int, shape.split("x"))
        variants = {"default": build(d_model, n_layers, None), "ours": build(d_model, n_layers, ours)}
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, v in variants.items():
                times[k].append(ms_per_step(v, args.steps))
        default, tuned = (statistics.median(times[k]) for k in ("default", "ours"))
        print(f"| {d_model} x {n_layers} | {default:.2f} | {tuned:.2f} | {default / tuned:.2f}x | "
              f"{variants['default']['compile_s']:.2f}, {variants['ours']['compile_s']:.2f} | "
              f"{variants['default']['ynn']}, {variants['ours']['ynn']} |", flush=True)


if __name__ == "__main__":
    main()
