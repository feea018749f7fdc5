"""Models: one linen decoder whose behaviour is chosen by a validated ModelConfig."""

import jax
import jax.numpy as jnp

from scalax.models.config import ModelConfig
from scalax.models.decoder import Decoder, init_cache


def apply(config: ModelConfig, params, tokens_BxT) -> jax.Array:
    """The forward pass as a plain function: int tokens [B, T] -> float32 logits [B, T, V].

    `params` are unboxed (as `scalax.interop.hf.load`, a checkpoint or `nn.meta.unbox(model.init(...))` give
    them), in the layout `config.scan_layers` names."""
    logits_BxTxV = Decoder(config).apply({"params": params}, jnp.asarray(tokens_BxT, jnp.int32))
    return logits_BxTxV.astype(jnp.float32)


__all__ = ["Decoder", "ModelConfig", "apply", "init_cache"]
