"""muP (Yang et al. 2022, Tensor Programs V), as the Cerebras practitioner's guide (Dey et al. 2024, "The
practitioner's guide to the maximal update parameterization", and its nanoGPT-mup port) tabulates it for a
decoder. Width multiplier m = d_model / mup_base_width; sigma = model.init_std, eta = optim.lr:

    parameters                                   init std          AdamW LR    forward
    embedding tables (token, learned position)   sigma             eta         as sp
    hidden kernels (attention q k v o, MLP)      sigma / sqrt(m)   eta / m     as sp
    unembedding (tied table or untied head)      sigma             eta         logits x 1/m
    norm scales and biases                       1 and 0           eta         as sp
    attention logits                                                           q.k / K   (sp: q.k / sqrt(K))

Under sp the output projections (attention o, MLP wo) start at sigma / sqrt(2 L) (GPT-2); the guide's muP table
has no depth factor, so under muP they start at sigma / sqrt(m) like the other hidden kernels. Adam's epsilon is
eps / m for every parameter, as nanoGPT-mup's muP groups have it: the 1/m on the logits shrinks every gradient
by m, and an unscaled epsilon then damps the wide model's updates (in the coordinate check, the second layer's
queries and keys shrank by a quarter from width 128 to 1024 with it). Width only: no depth rule (CompleteP). The
LR multiplier scales the whole AdamW update, decoupled decay included, as a PyTorch AdamW group's LR does.
At m = 1 muP differs from sp only in the attention scale and the output projections' depth factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scalax.models.config import ModelConfig

ROLES = ("embedding", "hidden", "unembedding", "vector")


def role(path: Sequence[str], tie_embeddings: bool = True) -> str:
    """Which row of the table a parameter (its path of names, e.g. ('layers', 'attn', 'q', 'kernel')) is in."""
    inside_layers = any(k == "layers" or k.startswith("layer_") for k in path)
    if path[-1] == "kernel":
        return "hidden" if inside_layers else "unembedding"  # outside the layers: the untied head
    if path[0] == "embed" and not inside_layers:
        return "unembedding" if tie_embeddings else "embedding"  # a tied table is both; its LR is eta either way
    if len(path) == 1:  # a positional scheme's table (learned positions, T5's biases)
        return "embedding"
    return "vector"


def init_std(cfg: ModelConfig, hidden: bool, output_projection: bool = False) -> float:
    """The normal init's standard deviation of a kernel or table (the table above; sp: GPT-2's)."""
    if cfg.parameterization == "mup":
        return cfg.init_std / math.sqrt(cfg.width_multiplier) if hidden else cfg.init_std
    return cfg.init_std / math.sqrt(2 * cfg.n_layers) if output_projection else cfg.init_std


def lr_multiplier(cfg: ModelConfig, path: Sequence[str]) -> float:
    """The factor on eta for the parameter at `path` (1 everywhere under sp)."""
    if cfg.parameterization == "mup" and role(path, cfg.tie_embeddings) == "hidden":
        return 1.0 / cfg.width_multiplier
    return 1.0


def adam_eps_multiplier(cfg: ModelConfig) -> float:
    """The factor on AdamW's epsilon: 1/m under muP."""
    return 1.0 / cfg.width_multiplier


def attention_scale(cfg: ModelConfig) -> float:
    """The factor on q.k: 1/K under muP, 1/sqrt(K) under sp."""
    return 1.0 / cfg.head_dim if cfg.parameterization == "mup" else cfg.head_dim**-0.5


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the final hidden state before the unembedding: 1/m under muP."""
    return 1.0 / cfg.width_multiplier
