"""MFU of a ~1B LLaMA (the `llama3.2-1b` preset) at seq 2048 in bfloat16 with each attention path, on one GPU.

    python benchmarks/gpu_attention.py --out DIR [--batch 8] [--paths dot_product,chunked,einsum]

Three parts, each written to DIR/gpu_attention.json as soon as it is done (a device lease is short):
1. `scalax bench --json` of the preset's real train step with each path, one process per path, so a path that
   runs out of memory leaves the others' numbers; MFU counts the `6n_head_attn` FLOPs, as training logs do.
   This process touches the device only after them (JAX takes most of a GPU's memory in the first process
   that uses it: the benches ran out of memory at any batch while it held that);
2. the bf16 matmul rate (8192^3, random data), a measured ceiling beside the data sheet's;
3. each path's attention against the einsum reference computed in float32 from the same bf16 inputs,
   forward and gradients (relative L2 error, causal, GQA 32 query heads over 8 kv heads).
The benches share a deadline (--budget seconds from the start, less 40 s for parts 2 and 3): each gets an
equal share of what is left, and one that would get under 30 s is skipped.
`--config`, `--seq` and `--batch` shrink it for a dry run on CPU; `--set KEY=VALUE` adds config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scalax.models import attention

START = time.monotonic()


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Median FLOP/s of an n x n x n bfloat16 product on random data."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def parity(impl: str, T: int, block: int, B: int = 2, G: int = 8, Q: int = 4, K: int = 64) -> dict:
    """Relative L2 errors of `impl` in bf16 against einsum in float32 on the same inputs: output and d(q, k, v)."""
    keys = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(keys[i], shape, jnp.bfloat16)
               for i, shape in enumerate([(B, T, G, Q, K), (B, T, G, K), (B, T, G, K)]))
    cot = jax.random.normal(keys[3], (B, T, G, Q, K), jnp.float32)
    pos = jnp.arange(T)

    def loss(name, *qkv):
        out = attention.attend(name, *qkv, pos, pos, None, block)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    grads = {}
    for name, dtype in ((impl, jnp.bfloat16), ("einsum", jnp.float32)):
        fn = jax.jit(jax.value_and_grad(lambda *x, n=name: loss(n, *x), argnums=(0, 1, 2), has_aux=True))
        (_, out), dqkv = fn(*(x.astype(dtype) for x in (q, k, v)))
        grads[name] = [np.asarray(x, np.float64) for x in (out, *dqkv)]
    pairs = zip(grads[impl], grads["einsum"], strict=True)
    errors = [float(np.linalg.norm(a - r) / np.linalg.norm(r)) for a, r in pairs]
    return dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))


def bench(args, impl: str, timeout: float) -> dict:
    """`scalax bench --json` of the config with model.attention = impl, in its own process."""
    cmd = [sys.executable, "-m", "scalax", "bench", f"--config={args.config}", f"--config.model.attention={impl}",
           f"--config.train.seq_len={args.seq}", f"--config.train.batch_size={args.batch}",
           f"--config.model.remat={args.remat}", f"--steps={args.steps}", f"--rounds={args.rounds}", "--json",
           *(f"--config.{item}" for item in args.set)]
    t = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"attention": impl, "error": f"no result within {timeout:.0f} s"}
    row = {"attention": impl, "wall_seconds": time.monotonic() - t}
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-3:]}
    return {**row, **json.loads(done.stdout)[0]}


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="configs/llama.py:preset=llama3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--paths", default="dot_product,chunked,einsum")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE: another config override, e.g. "
                        "model.scan_unroll=16 (repeat for several)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "parity": {}, "bench": []}

    def save():
        with open(os.path.join(args.out, "gpu_attention.json"), "w") as f:
            json.dump(result, f, indent=2)

    # The benches first, each in its own process: this one touches no device until they are done (part 1).
    paths = args.paths.split(",")
    for i, impl in enumerate(paths):
        share = (left(args.budget) - 40) / (len(paths) - i)  # what is left, shared by the paths still to run
        if share < 30:
            result["bench"].append({"attention": impl, "error": "skipped: out of time"})
            continue
        row = bench(args, impl, share)
        result["bench"].append(row)
        save()
        print(json.dumps({k: row.get(k) for k in ("attention", "tokens_per_s", "mfu", "compile_seconds",
                                                   "peak_bytes_per_device", "wall_seconds", "error")}), flush=True)
    device = jax.devices()[0]
    result.update(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__)
    result["matmul_bf16_flops"] = matmul_rate(args.matmul_n)
    print(f"{device.device_kind}: bf16 matmul {result['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s", flush=True)
    save()
    for impl in [p for p in paths if p != "einsum"]:
        try:
            result["parity"][impl] = parity(impl, args.seq, 512)
        except Exception as e:  # reported beside the path's bench
            result["parity"][impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"parity {impl} vs einsum (float32): {result['parity'][impl]}", flush=True)
        save()
    print("| attention | tokens/s | TFLOP/s | MFU (data sheet) | MFU (measured matmul) | compile s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["bench"]:
        if "error" in r:
            print(f"| {r['attention']} | {r['error']} |||||")
            continue
        print(f"| {r['attention']} | {r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.1f} | {r['mfu']:.1%} | "
              f"{r['flops_per_s'] / result['matmul_bf16_flops']:.1%} | {r['compile_seconds']:.1f} | "
              f"{(r['peak_bytes_per_device'] or 0) / 2**30:.1f} |")


if __name__ == "__main__":
    main()
