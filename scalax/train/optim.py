"""optax: global-norm clipping, AdamW with a weight-decay mask, learning-rate schedules.

Schedules take the update count s = 0 .. N-1 (the count before the update is applied) and end at
lr · final_lr_fraction exactly at s = N-1, the run's last step:
- warmup (all): lr · (s+1) / W for s < W, so the first step already learns and s = W-1 is at the peak;
- `cosine`: from the peak at s = W-1 (s = 0 without warmup) along half a cosine to the end;
- `wsd` (warmup-stable-decay): the peak until the last `wsd_decay_fraction` of steps, then linear to the end;
- `constant`: the peak after warmup (final_lr_fraction does not apply).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from scalax.errors import ConfigError
from scalax.models.param_groups import TABLE_LEAVES

SCHEDULES = ("cosine", "wsd", "constant")


def validate(optim_cfg, total_steps: int) -> None:
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", f"unknown schedule {optim_cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if not optim_cfg.lr > 0:
        raise ConfigError("optim.lr", f"must be positive, got {optim_cfg.lr}")
    if not 0 <= optim_cfg.warmup_steps < total_steps:
        raise ConfigError("optim.warmup_steps", f"must be in [0, {total_steps}) for a run of {total_steps} steps, "
                          f"got {optim_cfg.warmup_steps}")
    if not 0 <= optim_cfg.final_lr_fraction <= 1:
        raise ConfigError("optim.final_lr_fraction", f"must be in [0, 1], got {optim_cfg.final_lr_fraction}")
    if not 0 < optim_cfg.wsd_decay_fraction <= 1:
        raise ConfigError("optim.wsd_decay_fraction", f"must be in (0, 1], got {optim_cfg.wsd_decay_fraction}")
    for key in ("weight_decay", "grad_clip"):
        if optim_cfg[key] < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {optim_cfg[key]}")


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate at update count s (see the module docstring)."""
    lr, warmup, final = optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.final_lr_fraction
    last = total_steps - 1

    def fn(count):
        s = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.minimum(1.0, (s + 1) / max(warmup, 1))
        if optim_cfg.schedule == "constant":
            return warm if warmup else jnp.full_like(s, lr)
        if optim_cfg.schedule == "cosine":
            peak_at = max(warmup - 1, 0)
            progress = jnp.clip((s - peak_at) / max(last - peak_at, 1), 0.0, 1.0)
            decayed = lr * (final + (1 - final) * 0.5 * (1 + jnp.cos(math.pi * progress)))
        else:  # wsd
            decay_steps = max(1, round(optim_cfg.wsd_decay_fraction * total_steps))
            peak_at = max(last - decay_steps, warmup - 1, 0)
            progress = jnp.clip((s - peak_at) / max(last - peak_at, 1), 0.0, 1.0)
            decayed = lr * (1 - (1 - final) * progress)
        return jnp.where(s < warmup, warm, decayed)

    return fn


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: matmul kernels (and embedding tables if asked), never norms or biases."""

    def decays(path, _):
        name = path[-1].key
        return name == "kernel" or (decay_embeddings and name in TABLE_LEAVES)

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    validate(optim_cfg, total_steps)
    adamw = optax.adamw(schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                        weight_decay=optim_cfg.weight_decay,
                        mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings))
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
    return adamw
