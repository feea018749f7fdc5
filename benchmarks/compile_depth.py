"""Compile time against depth: the initialiser, train step and eval step of a scanned model with 4 and with 32
layers, compiled ahead of time (`lower().compile()`) exactly as `scalax train` builds them (train/setup.py).

    python benchmarks/compile_depth.py [--family llama] [--depths 4,32] [--rounds 3] [--scan-unroll 1]

The depths alternate within each round and the median over rounds is reported (CPU speed swings between
minutes here); the ratio is the deepest's total over the shallowest's. JAX's persistent compilation cache is
not used (this script never turns it on), so every compile is a real one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax

from scalax import config as config_lib
from scalax.train.setup import setup_run


def compile_seconds(family: str, n_layers: int, scan: bool, scan_unroll: int) -> dict[str, float]:
    cfg = config_lib.load(f"configs/{family}.py:size=tiny")
    cfg.model.n_layers, cfg.model.scan_layers, cfg.model.scan_unroll = n_layers, scan, scan_unroll
    prog = setup_run(cfg, devices=jax.devices()[:1]).program
    batch = prog.batch_shape(cfg.train.batch_size, cfg.train.seq_len)
    out = {}
    for name, lower in (("init", lambda: prog.init.lower()),
                        ("train_step", lambda: prog.train_step.lower(prog.abstract_state, batch)),
                        ("eval_step", lambda: prog.eval_step.lower(prog.abstract_state.params, batch))):
        start = time.perf_counter()
        lower().compile()
        out[name] = time.perf_counter() - start
    out["total"] = sum(out.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--depths", default="4,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unrolled", action="store_true", help="also without scan_layers, for contrast")
    parser.add_argument("--scan-unroll", type=int, default=1, help="model.scan_unroll (0: auto)")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    variants = [(d, True) for d in depths] + ([(d, False) for d in depths] if args.unrolled else [])
    times: dict[tuple[int, bool], list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for depth, scan in variants:
            times[(depth, scan)].append(compile_seconds(args.family, depth, scan, args.scan_unroll))
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.default_backend()}; "
          f"{args.family} tiny (d_model 128, seq 256, batch 16), medians of {args.rounds} rounds, seconds")
    print("| layers | layout | init | train step | eval step | total |")
    print("|---|---|---|---|---|---|")
    table = {}
    for (depth, scan), runs in times.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        table[f"{depth}{'' if scan else '-unrolled'}"] = med
        print(f"| {depth} | {'scanned' if scan else 'unrolled'} | {med['init']:.2f} | {med['train_step']:.2f} | "
              f"{med['eval_step']:.2f} | {med['total']:.2f} |")
    shallow, deep = table[str(min(depths))]["total"], table[str(max(depths))]["total"]
    print(f"scanned: {max(depths)} layers / {min(depths)} layers = {deep / shallow:.2f}x")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
