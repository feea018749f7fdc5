"""scalax's train step against its peers' at the same shapes, in one run: a plain Flax GPT (nanodo's shape: linen
modules, an optax AdamW, one jitted step) and a nanoGPT-style PyTorch eager step.

    python benchmarks/peers.py [--rounds 3] [--steps 10] [--dtypes float32,bfloat16] [--steps-per-call 0]

GPT family, d_model 256, 4 layers, 4 heads, context 256, batch 8, vocabulary 256 (issue #14's shapes); scalax with
`model.scan_unroll=0` (auto: its 4 layers as straight-line code) and `train.steps_per_call=0` (auto, as `scalax
train` runs it: on CPU ten steps to a compiled call, so a call's temporaries, 255 MB here, are allocated and
faulted in once for ten steps; --steps-per-call 1 for one step a call, as plain Flax's). Variants
alternate within each round and the median round counts; the float32 2048² matmul peak is measured in the same
run, and each step's FLOP/s (6N + unembedding + causal attention per token) is quoted against it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from scalax import config as config_lib
from scalax.models import flops
from scalax.train.bench import Bench
from scalax.train.host_memory import keep_freed_memory
from scalax.train.loop import MFU_CONVENTION
from scalax.train.metrics import measure_matmul_flops

D, L, H, T, B, V = 256, 4, 4, 256, 8, 256


def scalax_variant(dtype: str, steps_per_call: int = 0) -> Bench:
    cfg = config_lib.load("configs/gpt.py", [f"--config.model.{k}={v}" for k, v in dict(
        d_model=D, n_layers=L, n_heads=H, d_ff=4 * D, max_seq_len=T, vocab_size=V, dtype=dtype,
        scan_unroll=0).items()]
        + [f"--config.train.batch_size={B}", f"--config.train.seq_len={T}",
           f"--config.train.steps_per_call={steps_per_call}"])
    return Bench(f"scalax {dtype}", cfg)


class Block(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxTxD):
        h = nn.LayerNorm(dtype=self.dtype)(x_BxTxD)
        q, k, v = jnp.split(nn.Dense(3 * D, dtype=self.dtype)(h).reshape(B, T, 3 * H, D // H), 3, axis=2)
        s_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(D // H)
        s_BxHxTxT = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s_BxHxTxT.astype(jnp.float32), -1e9)
        a = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s_BxHxTxT, -1).astype(self.dtype), v).reshape(B, T, D)
        x_BxTxD = x_BxTxD + nn.Dense(D, dtype=self.dtype)(a)
        h = nn.LayerNorm(dtype=self.dtype)(x_BxTxD)
        return x_BxTxD + nn.Dense(D, dtype=self.dtype)(nn.gelu(nn.Dense(4 * D, dtype=self.dtype)(h)))


class FlaxGPT(nn.Module):
    """nanodo-style: learned positions, pre-LayerNorm blocks, tied embeddings."""

    dtype: jnp.dtype

    @nn.compact
    def __call__(self, tokens_BxT):
        embed = nn.Embed(V, D, dtype=self.dtype)
        x = embed(tokens_BxT) + self.param("pos", nn.initializers.normal(0.02), (T, D)).astype(self.dtype)
        for _ in range(L):
            x = Block(self.dtype)(x)
        return embed.attend(nn.LayerNorm(dtype=self.dtype)(x)).astype(jnp.float32)


class FlaxVariant:
    def __init__(self, dtype: str):
        self.name, self.tokens = f"plain Flax {dtype}", B * T
        model, tx = FlaxGPT(jnp.dtype(dtype)), optax.adamw(3e-4, weight_decay=0.1)
        batch = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T + 1)), jnp.int32)
        params = model.init(jax.random.key(0), batch[:, :-1])["params"]

        def step(state, batch_BxT1):
            params, opt_state = state

            def loss_fn(p):
                logits = model.apply({"params": p}, batch_BxT1[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxT1[:, 1:]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        self.step, self.batch = jax.jit(step, donate_argnums=0), batch
        self.state = (params, tx.init(params))
        self.time_steps(1)

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, loss = self.step(self.state, self.batch)
        jax.block_until_ready(loss)
        return steps * self.tokens / (time.perf_counter() - start)


class TorchVariant:
    """nanoGPT's model and step: eager PyTorch, scaled_dot_product_attention, AdamW (autocast for bfloat16)."""

    def __init__(self, dtype: str):
        import torch
        from torch import nn as tnn
        from torch.nn import functional as F

        torch.manual_seed(0)
        self.torch, self.tokens, self.dtype = torch, B * T, dtype
        self.name = f"PyTorch {torch.__version__.split('+')[0]} eager {dtype}"

        class TorchBlock(tnn.Module):
            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = tnn.LayerNorm(D), tnn.LayerNorm(D)
                self.qkv, self.proj = tnn.Linear(D, 3 * D), tnn.Linear(D, D)
                self.fc, self.out = tnn.Linear(D, 4 * D), tnn.Linear(4 * D, D)

            def forward(self, x):
                q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
                q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
                x = x + self.proj(a)
                return x + self.out(F.gelu(self.fc(self.ln2(x))))

        class TorchGPT(tnn.Module):
            def __init__(self):
                super().__init__()
                self.wte, self.wpe = tnn.Embedding(V, D), tnn.Embedding(T, D)
                self.blocks = tnn.ModuleList(TorchBlock() for _ in range(L))
                self.ln = tnn.LayerNorm(D)

            def forward(self, idx):
                x = self.wte(idx) + self.wpe(torch.arange(T))
                for block in self.blocks:
                    x = block(x)
                return self.ln(x) @ self.wte.weight.T  # tied

        self.model = TorchGPT()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.batch = torch.from_numpy(np.random.default_rng(0).integers(0, V, (B, T + 1)))
        self.F = F
        self.time_steps(1)

    def time_steps(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", torch.bfloat16, enabled=self.dtype == "bfloat16"):
                logits = self.model(self.batch[:, :-1])
            loss = self.F.cross_entropy(logits.float().view(-1, V), self.batch[:, 1:].reshape(-1))
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        loss.item()
        return steps * self.tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps-per-call", type=int, default=0, help="scalax's train.steps_per_call (0: auto)")
    args = parser.parse_args()
    if args.steps_per_call < 0:
        parser.error(f"--steps-per-call must be a positive integer or 0 (auto), got {args.steps_per_call}")
    keep_freed_memory()  # as `scalax bench` and `scalax train` do; the peers share the process and the setting
    peak = measure_matmul_flops(jnp.float32, n=2048, repeats=10)
    dtypes = args.dtypes.split(",")
    variants = {}
    for dtype in dtypes:
        for make in (functools.partial(scalax_variant, steps_per_call=args.steps_per_call), FlaxVariant,
                     TorchVariant):
            v = make(dtype)
            variants[v.name] = v
    rates = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            rates[name].append(v.time_steps(args.steps))
    peak = max(peak, measure_matmul_flops(jnp.float32, n=2048, repeats=10))
    ours = next(v for v in variants.values() if isinstance(v, Bench))
    per_token = flops.flops_per_token(ours.run.model, T, MFU_CONVENTION)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}; GPT d{D} L{L} H{H}, batch {B} x {T}, vocabulary {V}; scalax's steps_per_call "
          f"{ours.steps_per_call}; float32 2048² matmul {peak / 1e9:.1f} GFLOP/s")
    print("| step | tokens/s (median) | min .. max | of the matmul peak | scalax / this |")
    print("|---|---|---|---|---|")
    for dtype in dtypes:
        ours = statistics.median(rates[f"scalax {dtype}"])
        for name in (n for n in variants if n.endswith(dtype)):
            med = statistics.median(rates[name])
            print(f"| {name} | {med:,.0f} | {min(rates[name]):,.0f} .. {max(rates[name]):,.0f} | "
                  f"{med * per_token / peak:.1%} | {ours / med:.2f}x |")


if __name__ == "__main__":
    main()
