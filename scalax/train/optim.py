"""optax: global-norm clipping, AdamW with a weight-decay mask, learning-rate schedules.

Schedules take the update count s = 0 .. N-1 (the count before the update is applied) and end at
lr · final_lr_fraction exactly at s = N-1, the run's last step:
- warmup (all): lr · (s+1) / W for s < W, so the first step already learns and s = W-1 is at the peak. W is
  `warmup_steps`, or ceil(`warmup_tokens` / tokens per step) when that is set (> 0), so that runs of other
  lengths, or a cooldown branched from a long run, share one warmup;
- `cosine`: from the peak at s = W-1 (s = 0 without warmup) along half a cosine to the end;
- `wsd` (warmup-stable-decay, Hägele et al. 2024): the peak until the last `wsd_decay_fraction` of steps, then a
  cooldown of `wsd_decay_shape` to the end, over its progress p from 0 to 1: `linear` 1 - p, `cosine`
  (1 + cos(pi p)) / 2, `1-sqrt` 1 - sqrt(p) (Hägele et al.'s best); lr · (f + (1 - f) · shape(p)), f the final
  fraction;
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
COOLDOWNS = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + jnp.cos(math.pi * p)),
             "1-sqrt": lambda p: 1 - jnp.sqrt(p)}


def warmup_steps(optim_cfg, tokens_per_step: int) -> int:
    """W: `warmup_steps`, or `warmup_tokens` in steps of `tokens_per_step` (rounded up) when that is set."""
    tokens = optim_cfg.get("warmup_tokens", 0)  # .get: configs written before the key existed
    if tokens > 0 and tokens_per_step <= 0:
        raise ValueError("a warmup in tokens needs the tokens per step")
    return math.ceil(tokens / tokens_per_step) if tokens > 0 else optim_cfg.warmup_steps


def validate(optim_cfg, total_steps: int, tokens_per_step: int = 0) -> None:
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError("optim.schedule", f"unknown schedule {optim_cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if optim_cfg.get("wsd_decay_shape", "linear") not in COOLDOWNS:
        raise ConfigError("optim.wsd_decay_shape", f"unknown cooldown {optim_cfg.wsd_decay_shape!r}; allowed: "
                          f"{', '.join(COOLDOWNS)}")
    if not optim_cfg.lr > 0:
        raise ConfigError("optim.lr", f"must be positive, got {optim_cfg.lr}")
    if optim_cfg.get("warmup_tokens", 0) < 0:
        raise ConfigError("optim.warmup_tokens", f"must be >= 0 (0: optim.warmup_steps), got {optim_cfg.warmup_tokens}")
    warmup = warmup_steps(optim_cfg, tokens_per_step)
    if not 0 <= warmup < total_steps:
        key = "optim.warmup_tokens" if optim_cfg.get("warmup_tokens", 0) > 0 else "optim.warmup_steps"
        raise ConfigError(key, f"gives a warmup of {warmup} steps; allowed: [0, {total_steps}) for a run of "
                          f"{total_steps} steps")
    if not 0 <= optim_cfg.final_lr_fraction <= 1:
        raise ConfigError("optim.final_lr_fraction", f"must be in [0, 1], got {optim_cfg.final_lr_fraction}")
    if not 0 < optim_cfg.wsd_decay_fraction <= 1:
        raise ConfigError("optim.wsd_decay_fraction", f"must be in (0, 1], got {optim_cfg.wsd_decay_fraction}")
    for key in ("weight_decay", "grad_clip"):
        if optim_cfg[key] < 0:
            raise ConfigError(f"optim.{key}", f"must be >= 0, got {optim_cfg[key]}")


def schedule(optim_cfg, total_steps: int, tokens_per_step: int = 0) -> optax.Schedule:
    """The learning rate at update count s (see the module docstring)."""
    lr, warmup, final = optim_cfg.lr, warmup_steps(optim_cfg, tokens_per_step), optim_cfg.final_lr_fraction
    cooldown = COOLDOWNS[optim_cfg.get("wsd_decay_shape", "linear")]
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
            peak_at = branch_point(optim_cfg, total_steps, tokens_per_step) - 1
            progress = jnp.clip((s - peak_at) / max(last - peak_at, 1), 0.0, 1.0)
            decayed = lr * (final + (1 - final) * cooldown(progress))
        return jnp.where(s < warmup, warm, jnp.where(s <= peak_at, lr, decayed))  # the peak exactly: as constant's

    return fn


def branch_point(optim_cfg, total_steps: int, tokens_per_step: int = 0) -> int:
    """Steps a `wsd` run of `total_steps` trains before its cooldown starts (its last peak step, plus one): a
    constant-schedule run with the same warmup and peak has taken exactly the same steps until then, so the
    cooldown can branch from that run's checkpoint at this step."""
    decay_steps = max(1, round(optim_cfg.wsd_decay_fraction * total_steps))
    return max(total_steps - 1 - decay_steps, warmup_steps(optim_cfg, tokens_per_step) - 1, 0) + 1


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: matmul kernels (and embedding tables if asked), never norms or biases."""

    def decays(path, _):
        name = path[-1].key
        return name == "kernel" or (decay_embeddings and name in TABLE_LEAVES)

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_path(multiplier) -> optax.GradientTransformation:
    """Each leaf's update times `multiplier(path)`, path its tuple of names (muP's per-parameter learning rates)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * multiplier(tuple(k.key for k in path)),
                                                updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(optim_cfg, total_steps: int, tokens_per_step: int = 0, lr_multiplier=None,
              eps_multiplier: float = 1.0) -> optax.GradientTransformation:
    """AdamW (with clipping) on the schedule; `tokens_per_step` (batch x seq_len) for a warmup in tokens;
    `lr_multiplier(path) -> float`, when given, scales each parameter's update, and `eps_multiplier` Adam's
    epsilon (models/mup.py)."""
    validate(optim_cfg, total_steps, tokens_per_step)
    adamw = optax.adamw(schedule(optim_cfg, total_steps, tokens_per_step), b1=optim_cfg.b1, b2=optim_cfg.b2,
                        eps=optim_cfg.eps * eps_multiplier, weight_decay=optim_cfg.weight_decay,
                        mask=lambda p: decay_mask(p, optim_cfg.decay_embeddings))
    parts = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
    parts.append(adamw)
    if lr_multiplier is not None:
        parts.append(scale_by_path(lr_multiplier))
    return optax.chain(*parts) if len(parts) > 1 else adamw
