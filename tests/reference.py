"""An independent float64 numpy decoder, written from the papers' formulas, to check scalax's numerics.

It reads scalax's parameter tree but shares no code with scalax.models: RoPE as complex rotation, K/V heads
repeated explicitly for GQA, ALiBi slopes and T5 buckets from their closed forms, plain loops over layers.
"""

from __future__ import annotations

import math

import numpy as np
from flax import linen as nn

from scalax.models.config import ModelConfig


def alibi_slopes_closed_form(n: int) -> np.ndarray:
    """2^(-8i/n), i = 1..n for n a power of two; else the m = 2^floor(log2 n) slopes 2^(-8i/m), then
    2^(-4(2j-1)/m), j = 1..n-m (every other slope of 2m heads)."""
    m = 2 ** math.floor(math.log2(n))
    slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    slopes += [2.0 ** (-4.0 * (2 * j - 1) / m) for j in range(1, n - m + 1)]
    return np.asarray(slopes)


def t5_bucket_np(relative: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Raffel et al.'s `_relative_position_bucket`, unidirectional, in float64."""
    n = np.maximum(-relative, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        val_if_large = max_exact + (
            np.log(n.astype(np.float64) / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
        )
    val_if_large = np.minimum(np.where(np.isfinite(val_if_large), val_if_large, 0).astype(np.int64), num_buckets - 1)
    return np.where(n < max_exact, n, val_if_large)


def rope_freqs(cfg: ModelConfig, seq_len: int = 1) -> np.ndarray:
    """Inverse frequencies for a sequence of `seq_len` positions: Llama-3.1 scaling written per frequency as
    Meta's reference code does; position interpolation (Chen et al. 2023) divides every frequency by the factor;
    dynamic NTK raises the base once the sequence passes the original context; YaRN per frequency index as the
    paper's code (and transformers) computes it."""
    dim, s = cfg.rotary_dim, cfg.rope_scaling_factor
    theta = cfg.rope_theta
    if cfg.rope_scaling == "ntk" and seq_len > cfg.rope_original_context:
        theta *= (s * seq_len / cfg.rope_original_context - (s - 1)) ** (dim / (dim - 2))
    freqs = [1.0 / theta ** (2 * i / dim) for i in range(dim // 2)]
    if cfg.rope_scaling == "linear":
        return np.asarray(freqs) / s
    if cfg.rope_scaling == "yarn":
        def index_of(rotations):  # the frequency index whose wave turns `rotations` times in the original context
            return dim * math.log(cfg.rope_original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(index_of(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(index_of(cfg.rope_beta_slow)), dim - 1)
        out = []
        for i, f in enumerate(freqs):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            out.append(ramp * f / s + (1 - ramp) * f)
        return np.asarray(out)
    if cfg.rope_scaling == "llama3":
        out = []
        low_wl = cfg.rope_original_context / cfg.rope_low_freq_factor
        high_wl = cfg.rope_original_context / cfg.rope_high_freq_factor
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < high_wl:
                out.append(f)
            elif wavelen > low_wl:
                out.append(f / cfg.rope_scaling_factor)
            else:
                s = (cfg.rope_original_context / wavelen - cfg.rope_low_freq_factor) / (
                    cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
                out.append((1 - s) * f / cfg.rope_scaling_factor + s * f)
        freqs = out
    return np.asarray(freqs)


def rope(x_TxNxK: np.ndarray, cfg: ModelConfig, pos_T: np.ndarray) -> np.ndarray:
    dim = cfg.rotary_dim
    z = x_TxNxK[..., : dim // 2] + 1j * x_TxNxK[..., dim // 2 : dim]
    scale = 1.0
    if cfg.rope_scaling == "yarn":  # q and k scaled by the attention factor (the paper's sqrt(1/t))
        scale = cfg.rope_attention_factor or 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
    z = scale * z * np.exp(1j * pos_T[:, None, None] * rope_freqs(cfg, int(pos_T.max()) + 1)[None, None, :])
    return np.concatenate([z.real, z.imag, x_TxNxK[..., dim:]], axis=-1)


def sinusoidal(cfg: ModelConfig, pos_T: np.ndarray) -> np.ndarray:
    i = np.arange(cfg.d_model)
    angle = pos_T[:, None] / 10000.0 ** ((i - i % 2) / cfg.d_model)
    return np.where(i % 2 == 0, np.sin(angle), np.cos(angle))


def alibi(cfg: ModelConfig, pos_T: np.ndarray) -> np.ndarray:
    return -alibi_slopes_closed_form(cfg.n_heads)[:, None, None] * (pos_T[:, None] - pos_T[None, :])


def t5(cfg: ModelConfig, table: np.ndarray, pos_T: np.ndarray) -> np.ndarray:
    buckets = t5_bucket_np(pos_T[None, :] - pos_T[:, None], cfg.t5_num_buckets, cfg.t5_max_distance)
    return table[buckets].transpose(2, 0, 1)


# Each positional scheme of scalax.models.positions.SCHEMES, from its paper: what it adds to the input [T, D],
# its attention bias [H, T, T], its rotation of q and k. Functions of (cfg, params, positions [T]).
POSITION_REFERENCES = {
    "learned": dict(embed=lambda cfg, p, pos: p["pos_embed"][pos]),
    "sinusoidal": dict(embed=lambda cfg, p, pos: sinusoidal(cfg, pos)),
    "rope": dict(rotate=lambda cfg, p, pos: lambda x: rope(x, cfg, pos)),
    "alibi": dict(bias=lambda cfg, p, pos: alibi(cfg, pos)),
    "t5": dict(bias=lambda cfg, p, pos: t5(cfg, p["relpos_bias"], pos)),
    "none": dict(),
}


def norm(x: np.ndarray, p: dict, cfg: ModelConfig) -> np.ndarray:
    if cfg.norm == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def dense(x, p, contract: int = 1):
    y = np.tensordot(x, p["kernel"], axes=contract)
    return y + p["bias"] if "bias" in p else y


def attention(x_TxD, p, cfg: ModelConfig, bias_HxTxT, rotate):
    T = x_TxD.shape[0]
    q, k, v = (dense(x_TxD, p[n]) for n in "qkv")  # [T, N, K]
    if cfg.qk_norm:
        q, k = norm(q, p["q_norm"], cfg), norm(k, p["k_norm"], cfg)
    q, k = rotate(q), rotate(k)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head h uses kv head h // rep
    scores = np.einsum("thk,shk->hts", q, k) / math.sqrt(cfg.head_dim) + bias_HxTxT
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return dense(np.einsum("hts,shk->thk", probs, v), p["o"], contract=2)


def mlp(x, p, cfg: ModelConfig):
    if cfg.mlp == "swiglu":
        h = dense(x, p["wg"]) / (1 + np.exp(-dense(x, p["wg"]))) * dense(x, p["wi"])
    elif cfg.mlp == "geglu":
        h = gelu_tanh(dense(x, p["wg"])) * dense(x, p["wi"])
    elif cfg.mlp == "relu":
        h = np.maximum(dense(x, p["wi"]), 0)
    else:
        h = gelu_tanh(dense(x, p["wi"]))
    return dense(h, p["wo"])


def forward(cfg: ModelConfig, params, tokens_T: np.ndarray, first_position: int = 0) -> np.ndarray:
    """Logits [T, V] in float64 for one sequence whose first token sits at `first_position`."""
    import jax

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
    T = len(tokens_T)
    x = p["embed"]["embedding"][tokens_T]
    pos = np.arange(T) + first_position
    scheme = POSITION_REFERENCES[cfg.position]
    if "embed" in scheme:
        x = x + scheme["embed"](cfg, p, pos)
    bias = scheme["bias"](cfg, p, pos) if "bias" in scheme else np.zeros((cfg.n_heads, T, T))
    rotate = scheme["rotate"](cfg, p, pos) if "rotate" in scheme else (lambda x: x)
    for i in range(cfg.n_layers):
        if "layers" in p:
            lp = p["layers"] if cfg.share_layers else jax.tree.map(lambda a, i=i: a[i], p["layers"])
        else:
            lp = p[f"layer_{i}"]
        if cfg.parallel_block:
            h = norm(x, lp["attn_norm"], cfg)
            x = x + attention(h, lp["attn"], cfg, bias, rotate) + mlp(h, lp["mlp"], cfg)
        elif cfg.norm_position == "pre":
            x = x + attention(norm(x, lp["attn_norm"], cfg), lp["attn"], cfg, bias, rotate)
            x = x + mlp(norm(x, lp["mlp_norm"], cfg), lp["mlp"], cfg)
        else:
            x = norm(x + attention(x, lp["attn"], cfg, bias, rotate), lp["attn_norm"], cfg)
            x = norm(x + mlp(x, lp["mlp"], cfg), lp["mlp_norm"], cfg)
    if cfg.norm_position == "pre":
        x = norm(x, p["final_norm"], cfg)
    return x @ (p["embed"]["embedding"].T if cfg.tie_embeddings else p["head"]["kernel"])
