"""The train state: one pytree holding everything a step changes."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from scalax.models import Decoder


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict  # float32 (param_dtype) parameters, unboxed
    opt_state: optax.OptState
    rng: jax.Array  # a raw uint32[2] PRNG key (checkpointable as plain data), split per step


def init_state(model: Decoder, tx: optax.GradientTransformation, seed: int, seq_len: int) -> TrainState:
    """A fresh state; parameters from `model.init` with the PRNG key derived from `seed`."""
    init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.meta.unbox(model.init(init_key, tokens)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_key)
