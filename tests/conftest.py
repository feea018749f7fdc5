"""Test setup: 8 fake CPU devices (set before jax is imported), float32 compute helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from scalax.models import Decoder, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GPT = dict(norm="layernorm", mlp="gelu", use_bias=True, position="learned", tie_embeddings=True)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", use_bias=False, position="rope", tie_embeddings=False, n_kv_heads=2)
FAMILIES = {"gpt": GPT, "llama": LLAMA}


def small_config(family: str = "gpt", **changes) -> ModelConfig:
    """A small float32 model of a family: V 61, D 32, L 2, H 4 (K 8), F 64, context 32."""
    fields = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, dtype="float32",
                  init_std=0.2, **FAMILIES[family])
    fields.update(changes)
    return ModelConfig(**fields)


def init_params(cfg: ModelConfig, seq_len: int = 8, seed: int = 0):
    """Initialised parameters (unboxed), with every leaf then shifted by N(0, 0.1) noise so that biases and
    norm scales are not at their trivial init and every parameter matters in comparisons."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = jax.jit(lambda key: nn.meta.unbox(Decoder(cfg).init(key, tokens)["params"]))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), params)


def random_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, cfg.vocab_size)
