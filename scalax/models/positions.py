"""Positional schemes: sinusoidal, RoPE (+ partial rotary, Llama-3.1 scaling), ALiBi, T5 relative buckets.

Learned absolute positions are a parameter table in the decoder; `none` adds nothing (causal masking alone
leaks position, Haviv et al. 2022). Pure functions of positions; everything here is float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from scalax.models.config import ModelConfig


# ---------------------------------------------------------------------- sinusoidal (Vaswani et al. 2017)
def sinusoidal(positions_T: jnp.ndarray, d_model: int, base: float = 10000.0) -> jnp.ndarray:
    """PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(p / base^(2i/D)). Returns [T, D] float32."""
    inv_freq_D2 = base ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angle_TxD2 = positions_T.astype(jnp.float32)[:, None] * inv_freq_D2[None, :]
    pe_TxD2x2 = jnp.stack([jnp.sin(angle_TxD2), jnp.cos(angle_TxD2)], axis=-1)
    return pe_TxD2x2.reshape(positions_T.shape[0], -1)[:, :d_model]


# ---------------------------------------------------------------------- RoPE (Su et al. 2021)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float64 numpy), with Llama-3.1 scaling when configured.

    Llama-3.1: wavelengths longer than original_context / low_freq_factor are divided by `factor`; shorter
    than original_context / high_freq_factor are kept; in between, a smooth interpolation.
    """
    dim = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old_context = cfg.rope_original_context
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen < old_context / high,
            inv_freq,
            np.where(wavelen > old_context / low, inv_freq / factor, smoothed),
        )
    return inv_freq


def apply_rope(x_BxTxNxK: jnp.ndarray, positions_T: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Rotate the first `rotary_dim` dims of each head by position (rotate-half layout, as GPT-NeoX / HF)."""
    dim = cfg.rotary_dim
    inv_freq_R = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    angle_TxR = positions_T.astype(jnp.float32)[:, None] * inv_freq_R[None, :]
    cos_Tx1xR, sin_Tx1xR = jnp.cos(angle_TxR)[:, None, :], jnp.sin(angle_TxR)[:, None, :]
    x = x_BxTxNxK.astype(jnp.float32)
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
    rotated = jnp.concatenate([x1 * cos_Tx1xR - x2 * sin_Tx1xR, x2 * cos_Tx1xR + x1 * sin_Tx1xR], axis=-1)
    return jnp.concatenate([rotated, rest], axis=-1).astype(x_BxTxNxK.dtype)


# ---------------------------------------------------------------------- ALiBi (Press et al. 2022)
def alibi_slopes(n_heads: int) -> np.ndarray:
    """The published head slopes: a geometric sequence from 2^(-8/n) for n a power of two; otherwise the
    slopes of the nearest lower power of two, then every other slope of twice that count."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(power_of_2(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return np.concatenate([power_of_2(closest), extra])


def alibi_bias(q_pos_T: jnp.ndarray, k_pos_S: jnp.ndarray, n_heads: int) -> jnp.ndarray:
    """Additive bias [H, T, S] = -slope_h * (q - k): linear in distance to each earlier key."""
    slopes_H = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
    distance_TxS = (q_pos_T[:, None] - k_pos_S[None, :]).astype(jnp.float32)
    return -slopes_H[:, None, None] * distance_TxS[None]


# ---------------------------------------------------------------------- T5 relative buckets (Raffel et al. 2020)
def t5_bucket(relative_TxS: jnp.ndarray, num_buckets: int, max_distance: int) -> jnp.ndarray:
    """Unidirectional (causal) T5 bucket of relative position k - q: exact for distances below
    num_buckets // 2, then logarithmic up to max_distance; later keys (k > q) fall in bucket 0."""
    n = jnp.maximum(-relative_TxS, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return jnp.where(n < max_exact, n, large)


# ---------------------------------------------------------------------- the additive attention bias
def has_bias(cfg: ModelConfig) -> bool:
    """Whether the scheme adds a bias to the attention scores (ALiBi, T5) instead of touching q/k or x."""
    return cfg.position in ("alibi", "t5")


def attention_bias(cfg: ModelConfig, q_pos_T: jnp.ndarray, k_pos_S: jnp.ndarray,
                   table_NxH: jnp.ndarray | None) -> jnp.ndarray | None:
    """The scheme's additive bias [H, T, S] float32 between query and key positions (None: no bias).

    A function of positions alone (and T5's learned [buckets, H] table), so blockwise attention can compute it
    one block of queries and keys at a time."""
    if cfg.position == "alibi":
        return alibi_bias(q_pos_T, k_pos_S, cfg.n_heads)
    if cfg.position == "t5":
        buckets_TxS = t5_bucket(k_pos_S[None, :] - q_pos_T[:, None], cfg.t5_num_buckets, cfg.t5_max_distance)
        return jnp.take(table_NxH.astype(jnp.float32), buckets_TxS, axis=0).transpose(2, 0, 1)
    return None
