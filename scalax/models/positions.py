"""Positional schemes, one object each behind one protocol (`Scheme`), and the registry `SCHEMES` that maps
`model.position` to it: learned absolute, sinusoidal, RoPE (+ partial rotary, context extension), ALiBi, T5
relative buckets, none (causal masking alone leaks position, Haviv et al. 2022).

The rest of scalax asks the scheme (`scheme_of(cfg)`), never the scheme's name: the decoder for its table and
what it adds to the input, attention for its bias and its rotation of q and k, FLOPs and the optimizer for its
parameters, training and generation for its length limit. Pure functions of positions; float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from scalax.errors import ConfigError

if TYPE_CHECKING:  # models/config.py imports this module (its list of schemes, their validation)
    from scalax.models.config import ModelConfig


# ---------------------------------------------------------------------- sinusoidal (Vaswani et al. 2017)
def sinusoidal(positions_T: jnp.ndarray, d_model: int, base: float = 10000.0) -> jnp.ndarray:
    """PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(p / base^(2i/D)). Returns [T, D] float32."""
    inv_freq_D2 = base ** (-jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angle_TxD2 = positions_T.astype(jnp.float32)[:, None] * inv_freq_D2[None, :]
    pe_TxD2x2 = jnp.stack([jnp.sin(angle_TxD2), jnp.cos(angle_TxD2)], axis=-1)
    return pe_TxD2x2.reshape(positions_T.shape[0], -1)[:, :d_model]


# ---------------------------------------------------------------------- RoPE (Su et al. 2021)
# Context extension, as transformers implements each (`rope_type`): linear position interpolation (Chen et al.
# 2023); dynamic NTK-aware scaling (the base grows with the sequence once it passes the original context);
# YaRN (Peng et al. 2023: interpolate the low frequencies, keep the high ones, a linear ramp between, and scale
# q and k by an attention factor); Llama-3.1's frequency bands.
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float64 numpy) under the configured scaling; for `ntk`, those of
    sequences within the original context (apply_rope computes the longer ones)."""
    dim, factor = cfg.rotary_dim, cfg.rope_scaling_factor
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    if cfg.rope_scaling == "yarn":
        return _yarn(cfg, inv_freq)
    if cfg.rope_scaling == "llama3":
        return _llama3(cfg, inv_freq)
    return inv_freq


def _llama3(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Wavelengths longer than original_context / low_freq_factor are divided by `factor`; shorter than
    original_context / high_freq_factor are kept; in between, a smooth interpolation."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < old_context / high, inv_freq,
                    np.where(wavelen > old_context / low, inv_freq / factor, smoothed))


def _yarn(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Frequency index i keeps its frequency below the dimension where a wave turns beta_fast times within the
    original context, is divided by `factor` above the one where it turns beta_slow times, and is blended
    linearly in index between (the bounds rounded outwards, as transformers does)."""
    dim, base, context = cfg.rotary_dim, cfg.rope_theta, cfg.rope_original_context

    def dim_of(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(cfg.rope_beta_fast)), 0), min(math.ceil(dim_of(cfg.rope_beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high != low else 0.001), 0, 1)
    return inv_freq / cfg.rope_scaling_factor * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN multiplies q and k by (its cos and sin): `rope_attention_factor`, or 0.1 ln(factor) + 1."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_scaling_factor) + 1.0 if cfg.rope_scaling_factor > 1 else 1.0


def _ntk_inv_freq(cfg: ModelConfig, seq_len) -> jnp.ndarray:
    """Dynamic NTK: past the original context L, base theta · (s · T / L - (s - 1))^(dim / (dim - 2)) for a
    sequence of T positions (float32, T traced). Decoding with a KV cache, the cached keys keep the frequencies
    of the call that wrote them, as in transformers."""
    dim, factor, context = cfg.rotary_dim, cfg.rope_scaling_factor, cfg.rope_original_context
    seq = jnp.maximum(seq_len, context).astype(jnp.float32)
    base = cfg.rope_theta * (factor * seq / context - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def _rope_tables(positions_T: np.ndarray, inv_freq_R: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """scale · cos and scale · sin of the float32 angles position · inv_freq, as float32 constants [T, R]: for
    positions known when tracing (a forward pass without a KV cache). The same float32 angles as the traced
    path, their cosines rounded once (XLA's float32 cos is within an ulp or two). As constants they cost XLA
    nothing per step; computed in the graph, XLA's CPU fusions recomputed cos and sin for every batch row and
    head (the q and k rotations cost more than the projections at quickstart shapes)."""
    angle_TxR = positions_T.astype(np.float32)[:, None] * inv_freq_R.astype(np.float32)[None, :]
    scale32 = np.float32(scale)
    return tuple(scale32 * fn(angle_TxR.astype(np.float64)).astype(np.float32) for fn in (np.cos, np.sin))


def apply_rope(x_BxTxNxK: jnp.ndarray, positions_T: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
    """Rotate the first `rotary_dim` dims of each head by position (rotate-half layout, as GPT-NeoX / HF)."""
    dim = cfg.rotary_dim
    scale = rope_attention_factor(cfg)
    if isinstance(positions_T, np.ndarray) and cfg.rope_scaling != "ntk":
        cos_TxR, sin_TxR = _rope_tables(positions_T, rope_inv_freq(cfg), scale)
    else:
        if cfg.rope_scaling == "ntk":  # the sequence's length sets the base (as transformers: the largest position + 1)
            inv_freq_R = _ntk_inv_freq(cfg, jnp.max(positions_T) + 1)
        else:
            inv_freq_R = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
        angle_TxR = positions_T.astype(jnp.float32)[:, None] * inv_freq_R[None, :]
        cos_TxR, sin_TxR = scale * jnp.cos(angle_TxR), scale * jnp.sin(angle_TxR)
    cos_Tx1xR, sin_Tx1xR = cos_TxR[:, None, :], sin_TxR[:, None, :]
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


# ---------------------------------------------------------------------- the schemes
class Scheme:
    """A positional scheme. Every hook defaults to "adds nothing"; a scheme overrides what it uses.

    Its parameter (at most one, at the decoder's top level): `table_name`, `table_axes` (logical axis names),
    `table_shape(cfg)`; `table_is_embedding`: counted apart from N with the token table (a lookup into the
    input) rather than in N. `relative`: its logits depend only on distances between positions.
    """

    name: str = ""
    table_name: str | None = None
    table_axes: tuple[str, ...] = ()
    table_is_embedding: bool = False
    has_bias: bool = False
    relative: bool = True
    context_name: str = "the model's context"  # what a too-long sequence exceeds, in error messages

    def validate(self, cfg: ModelConfig) -> None:
        """Raise ConfigError for a key of this scheme that is out of range, or another scheme's key that is set."""
        if cfg.rope_scaling != "none":
            raise ConfigError("model.rope_scaling", f"only applies with position='rope', got {cfg.position!r}")

    def table_shape(self, cfg: ModelConfig) -> tuple[int, ...] | None:
        return None

    def table_params(self, cfg: ModelConfig) -> int:
        shape = self.table_shape(cfg)
        return int(np.prod(shape)) if shape else 0

    def length_limit(self, cfg: ModelConfig) -> int | None:
        """The longest sequence the scheme can encode (None: any length)."""
        return None

    def embed(self, cfg: ModelConfig, positions_T: jnp.ndarray, table) -> jnp.ndarray | None:
        """What is added to the token embeddings: [T, D] float32, or None."""
        return None

    def rotate(self, cfg: ModelConfig, x_BxTxNxK: jnp.ndarray, positions_T: jnp.ndarray) -> jnp.ndarray:
        """Queries or keys as attention sees them (RoPE rotates them; the rest leave them)."""
        return x_BxTxNxK

    def bias(self, cfg: ModelConfig, q_pos_T: jnp.ndarray, k_pos_S: jnp.ndarray, table) -> jnp.ndarray | None:
        """The additive attention bias [H, T, S] float32 between query and key positions (None: no bias).

        A function of positions alone (and the scheme's table), so blockwise attention can compute it one block
        of queries and keys at a time."""
        return None


class Learned(Scheme):
    """A learned table [max_seq_len, D] added to the input (GPT-2); sequences up to max_seq_len."""

    name, table_name, table_axes, table_is_embedding = "learned", "pos_embed", ("position", "embed"), True
    relative, context_name = False, "the learned position table"

    def table_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return (cfg.max_seq_len, cfg.d_model)

    def length_limit(self, cfg: ModelConfig) -> int:
        return cfg.max_seq_len

    def embed(self, cfg: ModelConfig, positions_T: jnp.ndarray, table) -> jnp.ndarray:
        return jnp.take(table, positions_T, axis=0).astype(jnp.float32)


class Sinusoidal(Scheme):
    """Fixed sines and cosines added to the input (Vaswani et al. 2017)."""

    name, relative = "sinusoidal", False

    def embed(self, cfg: ModelConfig, positions_T: jnp.ndarray, table) -> jnp.ndarray:
        return sinusoidal(positions_T, cfg.d_model)


class Rope(Scheme):
    """Rotary embeddings of q and k (Su et al. 2021), partial rotary, context extension (`ROPE_SCALINGS`)."""

    name = "rope"

    def validate(self, cfg: ModelConfig) -> None:
        if not 0.0 < cfg.rope_fraction <= 1.0:
            raise ConfigError("model.rope_fraction", f"must be in (0, 1], got {cfg.rope_fraction}")
        if cfg.rotary_dim % 2 or cfg.rotary_dim == 0:
            raise ConfigError("model.head_dim", f"RoPE rotates pairs of dimensions: head_dim * rope_fraction = "
                              f"{cfg.rotary_dim} must be even and positive (head_dim={cfg.head_dim}, "
                              f"rope_fraction={cfg.rope_fraction})")
        if cfg.rope_theta <= 0:
            raise ConfigError("model.rope_theta", f"must be positive, got {cfg.rope_theta}")
        if cfg.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError("model.rope_scaling", f"unknown value {cfg.rope_scaling!r}; allowed: "
                              f"{', '.join(ROPE_SCALINGS)}")
        if cfg.rope_scaling == "none":
            return
        if cfg.rope_scaling_factor < 1:
            raise ConfigError("model.rope_scaling_factor", f"must be >= 1, got {cfg.rope_scaling_factor}")
        if cfg.rope_original_context <= 0:
            raise ConfigError("model.rope_original_context", f"must be positive, got {cfg.rope_original_context}")
        if cfg.rope_scaling == "llama3" and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
            raise ConfigError("model.rope_high_freq_factor", "must exceed rope_low_freq_factor > 0, got "
                              f"low={cfg.rope_low_freq_factor}, high={cfg.rope_high_freq_factor}")
        if cfg.rope_scaling == "yarn":
            if not 0 < cfg.rope_beta_slow < cfg.rope_beta_fast:
                raise ConfigError("model.rope_beta_fast", "must exceed rope_beta_slow > 0 (rotations within the "
                                  f"original context), got fast={cfg.rope_beta_fast}, slow={cfg.rope_beta_slow}")
            if cfg.rope_attention_factor < 0:
                raise ConfigError("model.rope_attention_factor", "must be >= 0 (0: 0.1 ln(factor) + 1), got "
                                  f"{cfg.rope_attention_factor}")
        if cfg.rope_scaling == "ntk" and cfg.rotary_dim <= 2:
            raise ConfigError("model.head_dim", f"dynamic NTK scaling needs more than 2 rotated dimensions, got "
                              f"{cfg.rotary_dim}")

    def rotate(self, cfg: ModelConfig, x_BxTxNxK: jnp.ndarray, positions_T: jnp.ndarray) -> jnp.ndarray:
        return apply_rope(x_BxTxNxK, positions_T, cfg)


class Alibi(Scheme):
    """A bias linear in distance, one slope per head (Press et al. 2022)."""

    name, has_bias = "alibi", True

    def bias(self, cfg: ModelConfig, q_pos_T: jnp.ndarray, k_pos_S: jnp.ndarray, table) -> jnp.ndarray:
        return alibi_bias(q_pos_T, k_pos_S, cfg.n_heads)


class T5(Scheme):
    """A learned bias per head and distance bucket [buckets, H], one table shared by all layers (Raffel et al.
    2020); a per-head scalar used inside attention, so counted in N."""

    name, table_name, table_axes, has_bias = "t5", "relpos_bias", ("relpos_buckets", "heads"), True

    def validate(self, cfg: ModelConfig) -> None:
        super().validate(cfg)
        if cfg.t5_num_buckets < 2:
            raise ConfigError("model.t5_num_buckets", f"must be >= 2, got {cfg.t5_num_buckets}")
        if cfg.t5_max_distance <= cfg.t5_num_buckets // 2:
            raise ConfigError("model.t5_max_distance", f"must exceed t5_num_buckets // 2 = "
                              f"{cfg.t5_num_buckets // 2}, got {cfg.t5_max_distance}")

    def table_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return (cfg.t5_num_buckets, cfg.n_heads)

    def bias(self, cfg: ModelConfig, q_pos_T: jnp.ndarray, k_pos_S: jnp.ndarray, table) -> jnp.ndarray:
        buckets_TxS = t5_bucket(k_pos_S[None, :] - q_pos_T[:, None], cfg.t5_num_buckets, cfg.t5_max_distance)
        return jnp.take(table.astype(jnp.float32), buckets_TxS, axis=0).transpose(2, 0, 1)


class NoPosition(Scheme):
    """Nothing: the causal mask alone (NoPE, Kazemnejad et al. 2023)."""

    name = "none"


SCHEMES: dict[str, Scheme] = {s.name: s for s in (Learned(), Sinusoidal(), Rope(), Alibi(), T5(), NoPosition())}


def scheme_of(cfg: ModelConfig) -> Scheme:
    """The scheme of `cfg.position` (validated by ModelConfig against SCHEMES)."""
    return SCHEMES[cfg.position]
