"""Parameter counts and training FLOPs per token, under named conventions.

Counts (closed forms, equal to the initialised module's, checked by tests):
- `params_embedding`: the token table V·D, the untied head D·V, and a learned position table (max_seq_len·D).
- `params_non_embedding`: everything else (blocks, final norm, a T5 relative-bias table).
- `params_total`: their sum.

FLOPs per training token (forward + backward), with sequence length T:
- `6n`: 6 · N, N the non-embedding parameters each token passes through (with `share_layers`, every layer
  counts: the work does not shrink when the weights are shared). Kaplan et al. 2020's C ≈ 6N.
- `6n_head`: 6 · (N + V·D): adds the unembedding matmul, tied or not.
- `6n_head_attn`: 6n_head + 6 · L · T · H · K: adds causal attention's score and value matmuls, QK^T and
  A·V at 2·H·K FLOPs per key each, over T/2 keys on average (the causal mask halves the full count).
- `exact`: every matmul of forward and backward as Hoffmann et al. 2022, appendix F, count them: the
  embedding as a matmul (2·V·D), Q/K/V/O projections with GQA's smaller K/V, QK^T and A·V over all T keys,
  3·H·T for the softmax, the MLP with all its matrices (three for SwiGLU/GeGLU), the head; backward = 2x.
  Appendix F ignores the causal mask, so this does too.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import linen as nn

from scalax.models import positions
from scalax.models.config import ModelConfig
from scalax.models.param_groups import EMBEDDING_MODULES

CONVENTIONS = ("6n", "6n_head", "6n_head_attn", "exact")


# ---------------------------------------------------------------------- parameter counts
def _norm_params(cfg: ModelConfig, width: int) -> int:
    return width * (2 if cfg.norm == "layernorm" else 1)


def params_block(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = D * H * K + 2 * D * G * K + H * K * D
    mlp = (3 if cfg.gated_mlp else 2) * D * F
    if cfg.use_bias:
        attn += H * K + 2 * G * K + D
        mlp += (2 * F if cfg.gated_mlp else F) + D
    if cfg.qk_norm:
        attn += 2 * _norm_params(cfg, K)
    norms = (1 if cfg.parallel_block else 2) * _norm_params(cfg, D)
    return attn + mlp + norms


def params_embedding(cfg: ModelConfig) -> int:
    """The token table, the untied head and a positional table that is looked up into the input."""
    scheme = positions.scheme_of(cfg)
    n = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return n + (scheme.table_params(cfg) if scheme.table_is_embedding else 0)


def params_non_embedding(cfg: ModelConfig, count_shared_per_use: bool = False) -> int:
    """Non-embedding parameters; `count_shared_per_use` counts a shared block once per layer (for FLOPs)."""
    n_blocks = 1 if cfg.share_layers and not count_shared_per_use else cfg.n_layers
    n = n_blocks * params_block(cfg)
    if cfg.norm_position == "pre":
        n += _norm_params(cfg, cfg.d_model)
    scheme = positions.scheme_of(cfg)
    return n + (0 if scheme.table_is_embedding else scheme.table_params(cfg))


def params_total(cfg: ModelConfig) -> int:
    return params_embedding(cfg) + params_non_embedding(cfg)


def count_params(params: Mapping) -> dict[str, int]:
    """Counts read off a parameter tree (arrays or ShapeDtypeStructs, boxed or not), split as above."""
    params = nn.meta.unbox(params)

    def size(tree) -> int:
        return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))

    total = size(params)
    embedding = sum(size(params[k]) for k in EMBEDDING_MODULES if k in params)
    return {"params_total": total, "params_embedding": embedding, "params_non_embedding": total - embedding}


# ---------------------------------------------------------------------- FLOPs
def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Hoffmann et al. 2022 appendix F forward FLOPs of one sequence, term by term (all layers summed)."""
    T, D, V, L = seq_len, cfg.d_model, cfg.vocab_size, cfg.n_layers
    H, G, K, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    return {
        "embedding": 2 * T * V * D,
        "qkv_projection": L * 2 * T * D * K * (H + 2 * G),
        "attention_logits": L * 2 * T * T * K * H,
        "softmax": L * 3 * H * T * T,
        "attention_values": L * 2 * T * T * K * H,
        "output_projection": L * 2 * T * H * K * D,
        "mlp": L * 2 * T * D * F * (3 if cfg.gated_mlp else 2),
        "logits": 2 * T * D * V,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str) -> float:
    """Training FLOPs (forward + backward) per token under `convention` (see the module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    if convention == "exact":
        return 3 * sum(forward_flops_per_sequence(cfg, seq_len).values()) / seq_len
    flops = 6 * params_non_embedding(cfg, count_shared_per_use=True)
    if convention in ("6n_head", "6n_head_attn"):
        flops += 6 * cfg.vocab_size * cfg.d_model
    if convention == "6n_head_attn":
        flops += 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return float(flops)


def all_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    return {c: flops_per_token(cfg, seq_len, c) for c in CONVENTIONS}
