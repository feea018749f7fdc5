"""Training throughput and MFU of the named sizes on this machine, and the input pipeline's batches/s.

    python benchmarks/train_throughput.py [--sizes tiny,small] [--rounds 3] [--steps 10]

CPU speed swings between minutes here, so variants alternate within each round, the median over rounds is
reported, and MFU is quoted against a float32 matmul peak measured in the same run (before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from scalax import config as config_lib
from scalax.data import corpora, pipeline
from scalax.models import flops
from scalax.train.bench import Bench
from scalax.train.loop import MFU_CONVENTION
from scalax.train.metrics import measure_matmul_flops


def build(family: str, size: str, dtype: str) -> Bench:
    """The real train step of a named size (`scalax bench`'s: its mesh, optimizer, donation, compiler options)."""
    cfg = config_lib.load(f"configs/{family}.py:size={size}", [f"--config.model.dtype={dtype}"])
    return Bench(f"{family}/{size}/{dtype}", cfg)


def pipeline_batches_per_s(batch_size: int, seq_len: int, n: int = 300) -> float:
    cfg = config_lib.load("configs/gpt.py")
    splits = corpora.load_splits(cfg.data, log=lambda m: None)
    it = pipeline.iterator(pipeline.train_dataset(splits.train, seq_len, batch_size, seed=0))
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    assert batch.shape == (batch_size, seq_len + 1)
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--families", default="gpt,llama")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    peak_before = measure_matmul_flops(jnp.float32)
    variants = {(f, s, d): build(f, s, d) for s in args.sizes.split(",") for f in args.families.split(",")
                for d in args.dtypes.split(",")}
    results: dict = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, v in variants.items():  # alternate variants within each round
            results[key].append(v.time_steps(args.steps))
    peak = max(peak_before, measure_matmul_flops(jnp.float32))
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, device {jax.devices()[0].device_kind}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("| family | size | params | dtype | batch x seq | tokens/s (median) | min .. max | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    consumed = {}
    for (f, s, d), rates in results.items():
        v = variants[(f, s, d)]
        med = statistics.median(rates)
        mfu = med * flops.flops_per_token(v.run.model, v.cfg.train.seq_len, MFU_CONVENTION) / peak
        t = v.cfg.train
        consumed[(s, t.batch_size, t.seq_len)] = max(consumed.get((s, t.batch_size, t.seq_len), 0),
                                                     med / v.tokens)
        print(f"| {f} | {s} | {flops.params_total(v.run.model) / 1e6:.2f}M | {d} | {t.batch_size} x {t.seq_len} | "
              f"{med:,.0f} | "
              f"{min(rates):,.0f} .. {max(rates):,.0f} | {mfu:.1%} |")
    print("\n| pipeline batch x seq | batches/s | fastest training steps/s | ratio |")
    print("|---|---|---|---|")
    for (_, batch, seq), steps_per_s in consumed.items():
        rate = pipeline_batches_per_s(batch, seq)
        print(f"| {batch} x {seq} | {rate:,.0f} | {steps_per_s:.2f} | {rate / steps_per_s:,.0f}x |")
    print(json.dumps({"peak_flops": peak, "tokens_per_s": {"/".join(k): statistics.median(r)
                                                           for k, r in results.items()}}))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
