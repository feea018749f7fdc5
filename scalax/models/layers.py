"""Building blocks: norms, token embedding, MLP. Every parameter carries logical axis names."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from scalax.models import mup, reductions
from scalax.models.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def kernel_init(cfg: ModelConfig, axes: tuple[str, ...], output_projection: bool = False, hidden: bool = False):
    """Normal(0, std) with logical axis names: init_std, output projections / sqrt(2 L) (GPT-2); under muP hidden
    kernels / sqrt(m) (models/mup.py)."""
    return nn.with_logical_partitioning(nn.initializers.normal(mup.init_std(cfg, hidden, output_projection)), axes)


def constrain(x: jnp.ndarray, axes: tuple[str, ...]) -> jnp.ndarray:
    """Name an activation's axes for the mesh rules (a no-op outside a rules context)."""
    return nn.with_logical_constraint(x, axes)


def matmul(x, kernel, n_in: int = 1):
    """x [..., *in] · kernel [*in, *out] -> [..., *out], as one 2-D matmul [N, prod(in)] · [prod(in), prod(out)].

    The same products as a dot_general over the named axes, but the weight gradient comes out as x^T · dy, which
    XLA's CPU matmuls take as it is: from the N-d form XLA's CPU backend copied the output gradient transposed for
    each weight gradient and ran that matmul with both operands transposed (the quickstart's train steps 1.10-1.69x
    slower, docs/benchmarks.md). The reshapes only merge row-major axes; the batch's sharding stays on the leading
    one."""
    in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[: x.ndim - n_in]
    y = jax.lax.dot_general(x.reshape(-1, math.prod(in_shape)),
                            kernel.reshape(math.prod(in_shape), math.prod(out_shape)), (((1,), (0,)), ((), ())))
    return y.reshape(*lead, *out_shape)


class DenseGeneral(nn.Module):
    """x [..., *in] · kernel [*in, *features] (+ bias [*features]), contracting the last `n_in` axes of x.

    Like flax's DenseGeneral, but the kernel is created at its full rank, so its logical names apply to it
    as created (flax's initialises a flattened kernel, which a mesh's sharding constraints reject)."""

    features: tuple[int, ...]
    kernel_init: nn.initializers.Initializer
    bias_init: nn.initializers.Initializer
    n_in: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param("kernel", self.kernel_init, (*in_shape, *self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, self.features, self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = matmul(x, kernel, self.n_in)
        return y if bias is None else y + reductions.broadcast_rows(bias, y.shape)


class Norm(nn.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale), over the last axis, computed in float32.

    `axis_name` is the logical name of the normalised axis ('embed', or 'head_dim' for q/k norm).
    """

    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        pdtype = dtype_of(cfg.param_dtype)
        features = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (features,), pdtype)
        h, row = reductions.split_rows(x.astype(jnp.float32))
        if cfg.norm == "layernorm":
            h = h - jnp.mean(h, axis=row, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=row, keepdims=True) + cfg.norm_eps)
        h = h.reshape(x.shape) * reductions.broadcast_rows(scale.astype(jnp.float32), x.shape)
        if cfg.norm == "layernorm":
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                              (features,), pdtype)
            h = h + reductions.broadcast_rows(bias.astype(jnp.float32), x.shape)
        return h.astype(dtype_of(cfg.dtype))


class Embedding(nn.Module):
    """Token embedding table [V, D]; `attend` gives logits against it (tied head)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.table_VxD = self.param(
            "embedding", kernel_init(cfg, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
            dtype_of(cfg.param_dtype),
        )

    def __call__(self, tokens_BxT: jnp.ndarray) -> jnp.ndarray:
        x_BxTxD = jnp.take(self.table_VxD.astype(dtype_of(self.cfg.dtype)), tokens_BxT, axis=0)
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed"))

    def attend(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        table_VxD = self.table_VxD.astype(dtype_of(self.cfg.dtype))
        return matmul(x_BxTxD, table_VxD.T)


class Mlp(nn.Module):
    """Position-wise MLP: gelu/relu `wo(act(wi x))`, gated swiglu/geglu `wo(act(wg x) * wi x)`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        dense = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), use_bias=cfg.use_bias,
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
        act = {"gelu": nn.gelu, "geglu": nn.gelu, "relu": nn.relu, "swiglu": nn.silu}[cfg.mlp]
        in_init = kernel_init(cfg, ("embed", "mlp"), hidden=True)
        h_BxTxF = DenseGeneral((cfg.d_ff,), kernel_init=in_init, name="wi", **dense)(x_BxTxD)
        if cfg.gated_mlp:
            gate_BxTxF = DenseGeneral((cfg.d_ff,), kernel_init=in_init, name="wg", **dense)(x_BxTxD)
            h_BxTxF = act(gate_BxTxF) * h_BxTxF
        else:
            h_BxTxF = act(h_BxTxF)
        h_BxTxF = constrain(h_BxTxF, ("act_batch", "act_seq", "act_mlp"))
        dense["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        out_init = kernel_init(cfg, ("mlp", "embed"), output_projection=True, hidden=True)
        out_BxTxD = DenseGeneral((cfg.d_model,), kernel_init=out_init, name="wo", **dense)(h_BxTxF)
        return constrain(out_BxTxD, ("act_batch", "act_seq", "act_embed"))
