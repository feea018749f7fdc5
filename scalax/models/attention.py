"""Causal self-attention: MHA, GQA and MQA in one einsum, additive position bias, RoPE, a KV cache.

Shapes: B batch, T query positions, S key positions, H query heads, G = n_kv_heads, Q = H // G query heads
per kv head, K head_dim. Keys and values are never repeated to H heads: queries are grouped as [B,T,G,Q,K].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scalax.models import positions
from scalax.models.config import ModelConfig
from scalax.models.layers import DenseGeneral, Norm, constrain, dtype_of, kernel_init


class Attention(nn.Module):
    """Self-attention over `x_BxTxD` at absolute `positions_T`.

    bias_HxTxS: an additive float32 bias (ALiBi, T5) or None. In decode mode the keys and values are written
    into the 'cache' collection at `start` (an int32 scalar), and the queries attend to the whole cache,
    masked to key positions at or before their own.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, bias_HxTxS=None, start=None):
        cfg = self.cfg
        H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dense = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), use_bias=cfg.use_bias)

        def proj(name, heads, head_axis):
            return DenseGeneral(
                (heads, K), kernel_init=kernel_init(cfg, ("embed", head_axis, "head_dim")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "head_dim")),
                name=name, **dense)(x_BxTxD)

        q_BxTxHxK = proj("q", H, "heads")
        k_BxTxGxK = proj("k", G, "kv_heads")
        v_BxTxGxK = proj("v", G, "kv_heads")
        if cfg.qk_norm:
            q_BxTxHxK = Norm(cfg, axis_name="head_dim", name="q_norm")(q_BxTxHxK)
            k_BxTxGxK = Norm(cfg, axis_name="head_dim", name="k_norm")(k_BxTxGxK)
        if cfg.position == "rope":
            q_BxTxHxK = positions.apply_rope(q_BxTxHxK, positions_T, cfg)
            k_BxTxGxK = positions.apply_rope(k_BxTxGxK, positions_T, cfg)
        q_BxTxHxK = constrain(q_BxTxHxK, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
        k_BxTxGxK = constrain(k_BxTxGxK, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
        v_BxTxGxK = constrain(v_BxTxGxK, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))

        k_BxSxGxK, v_BxSxGxK, k_pos_S = k_BxTxGxK, v_BxTxGxK, positions_T
        if self.decode:
            # Write this chunk's keys/values at [start, start + T) and attend to the whole cache, whose
            # length S is fixed when it is created (by `decoder.init_cache`, from a [B, S] input).
            initialised = self.has_variable("cache", "cached_k")
            k_cache = self.variable("cache", "cached_k", jnp.zeros, k_BxTxGxK.shape, k_BxTxGxK.dtype)
            v_cache = self.variable("cache", "cached_v", jnp.zeros, v_BxTxGxK.shape, v_BxTxGxK.dtype)
            if initialised:
                zero = jnp.zeros((), jnp.int32)
                k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BxTxGxK, (zero, start, zero, zero))
                v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BxTxGxK, (zero, start, zero, zero))
            k_BxSxGxK, v_BxSxGxK = k_cache.value, v_cache.value
            k_pos_S = jnp.arange(k_BxSxGxK.shape[1], dtype=jnp.int32)

        B, T = q_BxTxHxK.shape[:2]
        q_BxTxGxQxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
        scores_BxGxQxTxS = jnp.einsum("btgqk,bsgk->bgqts", q_BxTxGxQxK, k_BxSxGxK,
                                      preferred_element_type=jnp.float32)
        scores_BxGxQxTxS = scores_BxGxQxTxS.astype(jnp.float32) * K**-0.5
        if bias_HxTxS is not None:
            scores_BxGxQxTxS = scores_BxGxQxTxS + bias_HxTxS.reshape(G, H // G, *bias_HxTxS.shape[1:])
        causal_TxS = k_pos_S[None, :] <= positions_T[:, None]
        scores_BxGxQxTxS = jnp.where(causal_TxS, scores_BxGxQxTxS, jnp.finfo(jnp.float32).min)
        probs_BxGxQxTxS = jax.nn.softmax(scores_BxGxQxTxS, axis=-1).astype(v_BxSxGxK.dtype)
        out_BxTxGxQxK = jnp.einsum("bgqts,bsgk->btgqk", probs_BxGxQxTxS, v_BxSxGxK)
        out_BxTxHxK = out_BxTxGxQxK.reshape(B, T, H, K)
        out_BxTxHxK = constrain(out_BxTxHxK, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
        out_BxTxD = DenseGeneral(
            (cfg.d_model,), n_in=2,
            kernel_init=kernel_init(cfg, ("heads", "head_dim", "embed"), output_projection=True),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="o", **dense)(out_BxTxHxK)
        return constrain(out_BxTxD, ("act_batch", "act_seq", "act_embed"))
