"""Two layouts on CPU, forward and backward, at the quickstart's shapes, in one process, alternating:

- attention: scores laid out [B, G, Q, T, S] straight from `btgqk,bsgk->bgqts` (scalax's einsum attention until
  2026-12-04, kept here as the reference) against scalax's `models/attention.py: einsum_attention` (batched over
  B, G leading, the Q heads of a group stacked on the queries);
- RoPE: cos and sin computed in the graph (positions a traced array) against constants (positions known when
  tracing, numpy: `models/positions.py: _rope_tables`).

    python benchmarks/attention_layout.py [--heads 1,2,4,8] [--rounds 5] [--steps 50] [--cpus 0]

Batch 14 x 128 tokens, heads of 16 dims, bfloat16 inputs, XLA options as the train step's
(program.step_compiler_options). Prints markdown tables of the median ms per forward-and-backward call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from scalax import config as config_lib
from scalax.models import ModelConfig, attention, positions
from scalax.train.program import step_compiler_options

B, T, K = 14, 128, 16


def bgqts_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S):
    """The reference layout: the scores come out of the dot as [B, G, Q, T, S]."""
    K = q_BxTxGxQxK.shape[-1]
    scores = jnp.einsum("btgqk,bsgk->bgqts", q_BxTxGxQxK, k_BxSxGxK, preferred_element_type=jnp.float32) * K**-0.5
    scores = jnp.where(k_pos_S[None, :] <= q_pos_T[:, None], scores, attention.NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    return jnp.einsum("bgqts,bsgk->btgqk", probs, v_BxSxGxK)


def timed(fn, args, rounds: int, steps: int) -> list[float]:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return times


def grad_of(f, n_args: int):
    """fwd + bwd of sum(f(...)^2) with respect to the first n_args arguments, jitted as the step is."""
    loss = lambda *a: jnp.sum(jnp.square(f(*a).astype(jnp.float32)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(n_args))), compiler_options=step_compiler_options())


def compare(fns: dict, args_of: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median ms of each function, measured in alternation (one round of each, then the next)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += timed(fn, args_of[name], 1, steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", default="1,2,4,8", help="heads (d_model / 16) of the models compared")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cpus", default="0", help="CPUs to pin to, comma-separated; '' for none")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    print(f"# {time.strftime('%Y-%m-%d')}, jax {jax.__version__}, pinned to CPUs {args.cpus or 'none'}")
    pos_np = np.arange(T, dtype=np.int32)
    pos = jnp.asarray(pos_np)
    print("| heads | attention [B,G,Q,T,S] ms | scalax's ms | speed-up | RoPE traced ms | RoPE constants ms | "
          "speed-up |\n|---|---|---|---|---|---|---|")
    for heads in map(int, args.heads.split(",")):
        keys = jax.random.split(jax.random.PRNGKey(heads), 3)
        q = jax.random.normal(keys[0], (B, T, heads, 1, K), jnp.bfloat16)
        k, v = (jax.random.normal(key, (B, T, heads, K), jnp.bfloat16) for key in keys[1:])
        attn = {"reference": grad_of(lambda q, k, v: bgqts_attention(q, k, v, pos, pos), 3),
                "scalax": grad_of(lambda q, k, v: attention.einsum_attention(q, k, v, pos, pos, None), 3)}
        a = compare(attn, {name: (q, k, v) for name in attn}, args.rounds, args.steps)
        model_cfg = config_lib.load("configs/sweeps/quickstart.py").base.model
        cfg = ModelConfig(**{**model_cfg.to_dict(), "d_model": 16 * heads, "n_heads": heads, "n_kv_heads": heads,
                             "vocab_size": 256})
        x = q[:, :, :, 0]
        rope = {"traced": grad_of(lambda x, p, cfg=cfg: positions.apply_rope(x, p, cfg), 1),
                "constants": grad_of(lambda x, cfg=cfg: positions.apply_rope(x, pos_np, cfg), 1)}
        r = compare(rope, {"traced": (x, pos), "constants": (x,)}, args.rounds, args.steps)
        print(f"| {heads} | {a['reference']:.3f} | {a['scalax']:.3f} | {a['reference'] / a['scalax']:.2f}x | "
              f"{r['traced']:.3f} | {r['constants']:.3f} | {r['traced'] / r['constants']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
