"""Published model shapes and the parametric size families used by scaling sweeps.

A preset is a dict of ModelConfig fields. Sources: GPT-2 (Radford et al. 2019, HF configs), GPT-3 (Brown et
al. 2020, table 2.1), LLaMA 1 (Touvron et al. 2023a), Llama 2 (Touvron et al. 2023b), Llama 3 / 3.1 (Meta's
released configs). GPT-3 notes: the paper's alternating locally banded sparse attention is not modelled
(dense attention throughout); the 1.3B row lists 24 heads of 128 (3072 != d_model 2048) and the 13B row
d_model 5140 (not 40 x 128): we use 16 heads of 128 and d_model 5120, as GPT-Neo and Megatron do, which
gives the nominal sizes.
"""

from __future__ import annotations

from typing import Any

from scalax.errors import ConfigError

GPT2_VOCAB = 50257
LLAMA1_2_VOCAB = 32000
LLAMA3_VOCAB = 128256
# Families and named sizes take the vocabulary of the configured tokenizer (vocab_size 0 means that).
FROM_TOKENIZER = 0

# The two families as feature bundles, defined here once: presets, the parametric families, Hugging Face
# interop (family_of) and the CLI read them.
FAMILY_FEATURES: dict[str, dict[str, Any]] = {
    "gpt": dict(norm="layernorm", norm_eps=1e-5, mlp="gelu", use_bias=True, position="learned",
                tie_embeddings=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", use_bias=False, position="rope", tie_embeddings=False),
}
_GPT, _LLAMA = FAMILY_FEATURES["gpt"], FAMILY_FEATURES["llama"]
# What neither family varies: pre-norm blocks, one norm per sublayer, no qk-norm, no shared layers.
COMMON_FEATURES = dict(norm_position="pre", parallel_block=False, qk_norm=False, share_layers=False)
# Keys a family may set either way (LLaMA checkpoints come tied or untied).
FREE_FEATURES = {"llama": ("tie_embeddings",), "gpt": ()}


def family_of(cfg) -> str | None:
    """The family whose features a ModelConfig has ('gpt', 'llama'), or None (norm_eps aside)."""
    for name, features in FAMILY_FEATURES.items():
        wanted = {k: v for k, v in {**features, **COMMON_FEATURES}.items()
                  if k != "norm_eps" and k not in FREE_FEATURES[name]}
        if all(getattr(cfg, k) == v for k, v in wanted.items()):
            return name
    return None


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> dict[str, Any]:
    return dict(_GPT, vocab_size=GPT2_VOCAB, max_seq_len=1024, d_model=d_model, n_layers=n_layers,
                n_heads=n_heads, d_ff=4 * d_model)


def _gpt3(d_model: int, n_layers: int, n_heads: int) -> dict[str, Any]:
    return dict(_GPT, vocab_size=GPT2_VOCAB, max_seq_len=2048, d_model=d_model, n_layers=n_layers,
                n_heads=n_heads, d_ff=4 * d_model)


def _llama(vocab: int, context: int, eps: float, theta: float, d_model: int, n_layers: int, n_heads: int,
           n_kv_heads: int, d_ff: int, **extra: Any) -> dict[str, Any]:
    return dict(_LLAMA, vocab_size=vocab, max_seq_len=context, norm_eps=eps, rope_theta=theta, d_model=d_model,
                n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff, **extra)


def _llama1(d, L, h, f):
    return _llama(LLAMA1_2_VOCAB, 2048, 1e-6, 10000.0, d, L, h, h, f)


def _llama2(d, L, h, kv, f):
    return _llama(LLAMA1_2_VOCAB, 4096, 1e-5, 10000.0, d, L, h, kv, f)


def _llama3(d, L, h, f):
    return _llama(LLAMA3_VOCAB, 8192, 1e-5, 500000.0, d, L, h, 8, f)


def _llama31(d, L, h, f):
    return _llama(LLAMA3_VOCAB, 131072, 1e-5, 500000.0, d, L, h, 8, f, rope_scaling="llama3",
                  rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_context=8192)


def _llama32(d, L, h, f):  # small LLaMA 3.2 models: tied embeddings, context scaled 32x from 8192
    return _llama(LLAMA3_VOCAB, 131072, 1e-5, 500000.0, d, L, h, 8, f, rope_scaling="llama3",
                  rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_context=8192, tie_embeddings=True)


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "gpt3-125m": _gpt3(768, 12, 12),
    "gpt3-350m": _gpt3(1024, 24, 16),
    "gpt3-760m": _gpt3(1536, 24, 16),
    "gpt3-1.3b": _gpt3(2048, 24, 16),
    "gpt3-2.7b": _gpt3(2560, 32, 32),
    "gpt3-6.7b": _gpt3(4096, 32, 32),
    "gpt3-13b": _gpt3(5120, 40, 40),
    "gpt3-175b": _gpt3(12288, 96, 96),
    "llama1-7b": _llama1(4096, 32, 32, 11008),
    "llama1-13b": _llama1(5120, 40, 40, 13824),
    "llama1-33b": _llama1(6656, 60, 52, 17920),
    "llama1-65b": _llama1(8192, 80, 64, 22016),
    "llama2-7b": _llama2(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 8, 28672),
    "llama3-8b": _llama3(4096, 32, 32, 14336),
    "llama3-70b": _llama3(8192, 80, 64, 28672),
    "llama3.1-8b": _llama31(4096, 32, 32, 14336),
    "llama3.1-70b": _llama31(8192, 80, 64, 28672),
    "llama3.1-405b": _llama31(16384, 126, 128, 53248),
    "llama3.2-1b": _llama32(2048, 16, 32, 8192),
    "llama3.2-3b": _llama32(3072, 28, 24, 8192),
}

# Nominal sizes from the GPT-3 paper, table 2.1 (its models are named by these).
GPT3_NOMINAL = {"gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-760m": 760e6, "gpt3-1.3b": 1.3e9,
                "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9}

# ---------------------------------------------------------------------- parametric families
HEAD_DIM = 64  # family rule: heads of 64 dims, so d_model must be a multiple of 64
LLAMA_FF_MULTIPLE = 64

# Named small sizes (d_model, n_layers, context). `tiny` trains in seconds on one CPU core.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 2, 256),
    "small": (256, 4, 512),
    "medium": (512, 8, 1024),
    "large": (768, 12, 1024),
}

FAMILIES = ("gpt", "llama")


def llama_d_ff(d_model: int, multiple_of: int = LLAMA_FF_MULTIPLE) -> int:
    """SwiGLU hidden size by Meta's rule: 2/3 of 4 d_model (same parameters as a 4 d_model GELU MLP),
    rounded up to a multiple of `multiple_of` (Meta used 256; the family uses 64 to suit small models)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


def family(name: str, d_model: int, n_layers: int, vocab_size: int = FROM_TOKENIZER,
           max_seq_len: int = 1024, head_dim: int = HEAD_DIM) -> dict[str, Any]:
    """A model of family `name` ('gpt' or 'llama') from (d_model, n_layers), by documented rules:
    n_heads = d_model / head_dim (64 unless told; CPU-sized sweeps use 16 or 32); GPT: d_ff = 4 d_model,
    learned positions, tied embeddings, biases; LLaMA: d_ff = llama_d_ff(d_model, min(64, head_dim)), RoPE
    (theta 10000), untied head, multi-head attention (kv heads = heads; override model.n_kv_heads for GQA)."""
    if name not in FAMILIES:
        raise ConfigError("family", f"unknown family {name!r}; allowed: {', '.join(FAMILIES)}")
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError("head_dim", f"must be a positive even number, got {head_dim}")
    if d_model <= 0 or d_model % head_dim:
        raise ConfigError("model.d_model", f"a family size needs a positive multiple of {head_dim}, got {d_model}")
    if n_layers <= 0:
        raise ConfigError("model.n_layers", f"must be a positive integer, got {n_layers}")
    n_heads = d_model // head_dim
    shape = dict(vocab_size=vocab_size, max_seq_len=max_seq_len, d_model=d_model, n_layers=n_layers,
                 n_heads=n_heads)
    if name == "gpt":
        return dict(_GPT, **shape, d_ff=4 * d_model)
    return dict(_LLAMA, **shape, n_kv_heads=n_heads, d_ff=llama_d_ff(d_model, min(LLAMA_FF_MULTIPLE, head_dim)),
                norm_eps=1e-5, rope_theta=10000.0)


def named_size(name: str, size: str) -> dict[str, Any]:
    """A named small size ('tiny', 'small', ...) of a family, on the tokenizer's vocabulary."""
    if size not in SIZES:
        raise ConfigError("size", f"unknown size {size!r}; allowed: {', '.join(SIZES)}")
    d_model, n_layers, context = SIZES[size]
    return family(name, d_model, n_layers, max_seq_len=context)


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
