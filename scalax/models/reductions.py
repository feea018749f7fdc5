"""Sums over a row and over the tokens, written so that XLA's CPU backend runs them fast.

XLA's default CPU pipeline rewrites every reduction over an axis longer than 32 into a reduce-window of 32 and a
second reduce (its tree-reduction rewrite), and those reduce-windows run an output element at a time: in issue
#14's float32 GPT step (d_model 256) they took some 50 ms of a 500 ms step, the norms' and softmax's row sums
([8, 256, 256] -> [8, 256], 0.7-1.2 ms each) and the bias and norm-parameter gradients, sums over the 2,048
tokens ([2048, 1024] -> [1024], 3.5-7 ms each). Without the rewrite (the train step turns it off,
train/program.step_compiler_options) a plain sum over the tokens runs slower still (that step 1.5x). Two
rewrites, on CPU only (elsewhere both are the plain form):
- `split_rows`: a row of n > 32 (a multiple of 32) reduced as [n / 32, 32] over both axes. Written for the
  rewrite, which leaves axes of 32 alone; with it off, the GPT step still ran 1.08x faster than with plain rows
  (467 against 505 ms) and the quickstart's 0.96-1.0x (docs/benchmarks.md);
- `broadcast_rows`: a parameter broadcast over the tokens as ones [N, 1] · p [1, F], so that its gradient, the
  sum over the tokens, is the matmul ones^T · dy (XLA folds the forward product back into a broadcast).
The same sums in another order: float rounding, nothing more.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WINDOW = 32  # XLA's CPU tree-reduction window, and the rows' split


def split_rows(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """x [..., n] -> (x as [..., n / 32, 32], the axes that make up a row (-2, -1)) on CPU when 32 < n and
    32 divides n; else (x, (-1,)). Reduce over the axes returned, then reshape back to x's shape."""
    n = x.shape[-1]
    if jax.default_backend() == "cpu" and n > WINDOW and n % WINDOW == 0:
        return x.reshape(*x.shape[:-1], n // WINDOW, WINDOW), (-2, -1)
    return x, (-1,)


def softmax(x: jax.Array) -> jax.Array:
    """`jax.nn.softmax` over the last axis, its sums split as in `split_rows`."""
    rows, axes = split_rows(x)
    return jax.nn.softmax(rows, axis=axes).reshape(x.shape)


def logsumexp(x: jax.Array) -> jax.Array:
    """`jax.nn.logsumexp` over the last axis ([..., n] -> [...]), its sums split as in `split_rows`."""
    rows, axes = split_rows(x)
    return jax.nn.logsumexp(rows, axis=axes)


def broadcast_rows(p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """p [*F] broadcast to shape [..., *F]; on CPU as ones [N, 1] · p [1, prod(F)], N the leading axes' size,
    so that p's gradient is a matmul against ones (`jnp.broadcast_to` elsewhere)."""
    if jax.default_backend() != "cpu":
        return jnp.broadcast_to(p, shape)
    ones_Nx1 = jnp.ones((math.prod(shape[: len(shape) - p.ndim]), 1), p.dtype)
    return (ones_Nx1 @ p.reshape(1, -1)).reshape(shape)
