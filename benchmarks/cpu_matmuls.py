"""The CPU train step's weight matmuls, each in the three forms that a step runs it in, jitted alone with the steps'
compiler options, against PyTorch's `mm` and numpy's `matmul` (OpenBLAS) of the same operands on the same cores,
in one run.

    python benchmarks/cpu_matmuls.py [--rounds 5] [--calls 10]      (taskset -c 0 ... for one core)

Issue #14's GPT shapes (tokens 8 x 256 = 2,048; d_model 256, d_ff 1,024; vocabulary 256). For a layer
y [N, out] = x [N, in] · W [in, out] the step computes the forward product x · W ("NN"), the input gradient
g · W^T ("NT": both operands contracted on their last axis) and the weight gradient x^T · g ("TN": both on their
first, the tokens). PyTorch and numpy run each through a BLAS with the transposes as flags. Medians of interleaved
rounds; GFLOP/s = 2 · N · in · out / time. A pause before each library's calls lets the threads of the one before
go idle: OpenBLAS's and OpenMP's busy-wait after a call and took a core from XLA's next matmuls (on 2 cores the
XLA times were some 1.3x longer without it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
from jax import lax

from scalax.train import program

N = 8 * 256
SHAPES = {"attention q/k/v/o": (256, 256), "mlp in": (256, 1024), "mlp out": (1024, 256)}
CONTRACT = {"NN": ((1,), (0,)), "NT": ((1,), (1,)), "TN": ((0,), (0,))}


def operands(form: str, n_in: int, n_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The two operands of one form, row-major as the step holds them: x [N, in], W [in, out], g [N, out]."""
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((N, n_in), (n_in, n_out), (N, n_out)))
    return {"NN": (x, w), "NT": (g, w), "TN": (x, g)}[form]


def timers(form: str, a: np.ndarray, b: np.ndarray):
    """(scalax's XLA call, PyTorch's call, numpy's call), each returning once its result is ready."""
    import torch

    dims = (CONTRACT[form], ((), ()))
    xla = jax.jit(lambda p, q: lax.dot_general(p, q, dims)).lower(a, b).compile(program.step_compiler_options())
    ja, jb = jax.device_put(a), jax.device_put(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta, tb = {"NN": (ta, tb), "NT": (ta, tb.T), "TN": (ta.T, tb)}[form]
    na, nb = {"NN": (a, b), "NT": (a, b.T), "TN": (a.T, b)}[form]
    reference = na.astype(np.float64) @ nb
    for out in (np.asarray(xla(ja, jb)), torch.mm(ta, tb).numpy(), na @ nb):  # all compute the same product
        np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-2 * np.abs(reference).max())
    return (lambda: xla(ja, jb).block_until_ready()), (lambda: torch.mm(ta, tb)), (lambda: na @ nb)


def seconds(call, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between one library's calls and the next's")
    args = parser.parse_args()
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # numpy's OpenBLAS takes its threads from the affinity mask
    rng = np.random.default_rng(0)
    cases = {(name, form): timers(form, *operands(form, *shape, rng))
             for name, shape in SHAPES.items() for form in CONTRACT}
    times = {key: ([], [], []) for key in cases}
    for _ in range(args.rounds):
        for key, library_calls in cases.items():
            for call, out in zip(library_calls, times[key], strict=True):
                time.sleep(args.pause)  # the last library's idle threads stop spinning (see the docstring)
                call()
                out.append(seconds(call, args.calls))
    print(f"# {time.strftime('%Y-%m-%d')}, {cores} core(s), jax {jax.__version__}, torch {torch.__version__}; "
          f"tokens N = {N}")
    print("| matmul | form | scalax ms (GFLOP/s) | PyTorch ms (GFLOP/s) | numpy ms (GFLOP/s) | PyTorch / scalax time |")
    print("|---|---|---|---|---|---|")
    for (name, form), runs in times.items():
        n_in, n_out = SHAPES[name]
        flop = 2 * N * n_in * n_out
        ours, torch_s, numpy_s = (statistics.median(r) for r in runs)
        cells = " | ".join(f"{s * 1e3:.2f} ({flop / s / 1e9:.1f})" for s in (ours, torch_s, numpy_s))
        print(f"| {name} {n_in}x{n_out} | {form} | {cells} | {torch_s / ours:.2f} |")


if __name__ == "__main__":
    main()
