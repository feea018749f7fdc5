"""The decoder: token (+ position) embedding, L blocks (scanned or unrolled, optionally rematerialised or
sharing one set of weights), final norm, tied or untied head. Pure `init`/`apply`; the only state besides
'params' is the optional 'cache' collection used for incremental decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scalax.errors import ConfigError
from scalax.models import mup, positions
from scalax.models.attention import Attention
from scalax.models.config import ModelConfig
from scalax.models.layers import DenseGeneral, Embedding, Mlp, Norm, constrain, dtype_of, kernel_init

# Each remat name maps explicitly to one jax checkpoint policy (None: no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only
}


# model.scan_unroll 0 (auto): a model of up to this many layers is straight-line code. On 2 CPU cores that made
# the quickstart's steps 1.1-1.6x faster; at 32 layers a loop of 4-layer bodies compiled in 1.53x the 4-layer
# model's time, a loop of single layers in 0.84x (docs/benchmarks.md), so deeper models keep one layer per step.
STRAIGHT_LINE_LAYERS = 4


def scan_unroll(cfg: ModelConfig) -> int:
    """Layers per step of the scanned loop: model.scan_unroll, or its automatic choice when that is 0."""
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, cfg.n_layers)
    return cfg.n_layers if cfg.n_layers <= STRAIGHT_LINE_LAYERS else 1


class Block(nn.Module):
    """One transformer layer. Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)); parallel:
    x + attn(norm(x)) + mlp(norm(x)) with one shared norm (GPT-J, PaLM). Returns (x, None) for nn.scan."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, bias_table, start):
        cfg = self.cfg
        attn = Attention(cfg, decode=self.decode, name="attn")
        mlp = Mlp(cfg, name="mlp")
        if cfg.parallel_block:
            h_BxTxD = Norm(cfg, name="attn_norm")(x_BxTxD)
            x_BxTxD = x_BxTxD + attn(h_BxTxD, positions_T, bias_table, start) + mlp(h_BxTxD)
        elif cfg.norm_position == "pre":
            x_BxTxD = x_BxTxD + attn(Norm(cfg, name="attn_norm")(x_BxTxD), positions_T, bias_table, start)
            x_BxTxD = x_BxTxD + mlp(Norm(cfg, name="mlp_norm")(x_BxTxD))
        else:
            x_BxTxD = Norm(cfg, name="attn_norm")(x_BxTxD + attn(x_BxTxD, positions_T, bias_table, start))
            x_BxTxD = Norm(cfg, name="mlp_norm")(x_BxTxD + mlp(x_BxTxD))
        return constrain(x_BxTxD, ("act_batch", "act_seq", "act_embed")), None


class Decoder(nn.Module):
    """Decoder-only LM: tokens [B, T] int32 -> logits [B, T, V] in the compute dtype.

    With `decode=True`, call `init_cache` first; each call then continues the sequence from the cache's
    index (a prefill of any length, then one token at a time).
    """

    cfg: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        if self.decode:  # the next position to write; a cache that did not exist yet is being created
            self.cache_ready = self.has_variable("cache", "index")
            self.cache_index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        self.embed = Embedding(cfg)
        scheme = positions.scheme_of(cfg)
        self.position_table = None  # the scheme's parameter (a learned table, T5's biases), shared by the layers
        if scheme.table_name:
            self.position_table = self.param(scheme.table_name, kernel_init(cfg, scheme.table_axes),
                                             scheme.table_shape(cfg), dtype_of(cfg.param_dtype))
        block = Block
        policy = REMAT_POLICIES[cfg.remat]
        scanned = cfg.scan_layers or cfg.share_layers
        if cfg.remat != "none":
            block = nn.remat(block, policy=policy, prevent_cse=not scanned)
        if scanned:
            # share_layers: the weights are broadcast to every step of the scan instead of stacked.
            params_axes = {} if cfg.share_layers else {"params": 0}
            self.layers = nn.scan(
                block,
                variable_axes={**params_axes, "cache": 0},
                variable_broadcast="params" if cfg.share_layers else False,
                split_rngs={"params": not cfg.share_layers},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                unroll=scan_unroll(cfg),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, decode=self.decode, name="layers")
        else:
            self.layers = [block(cfg, decode=self.decode, name=f"layer_{i}") for i in range(cfg.n_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = DenseGeneral((cfg.vocab_size,), use_bias=False, dtype=dtype_of(cfg.dtype),
                                     param_dtype=dtype_of(cfg.param_dtype),
                                     kernel_init=kernel_init(cfg, ("embed", "vocab")), bias_init=nn.initializers.zeros)

    def __call__(self, tokens_BxT: jnp.ndarray, first_position: int = 0) -> jnp.ndarray:
        """`first_position`: the position of the first token (0; another value shifts every position)."""
        return self.from_embeddings(self.embed(tokens_BxT), first_position)

    def from_embeddings(self, x_BxTxD: jnp.ndarray, first_position: int = 0) -> jnp.ndarray:
        """Logits from token embeddings (before positions are added): the rest of the forward pass."""
        cfg = self.cfg
        scheme = positions.scheme_of(cfg)
        T = x_BxTxD.shape[1]
        start = None
        positions_T = np.arange(T, dtype=np.int32) + np.int32(first_position)  # numpy: known when tracing
        if self.decode:
            start = self.cache_index.value
            if self.cache_ready:  # otherwise this call only creates the cache, of length T
                self.cache_index.value = start + T
                positions_T = positions_T + start

        limit = scheme.length_limit(cfg)
        if limit is not None and first_position + T > limit:
            raise ConfigError("model.max_seq_len", f"a sequence of {T} tokens from position {first_position} runs "
                              f"past {scheme.context_name} ({limit}); raise max_seq_len or shorten the input")
        pos_TxD = scheme.embed(cfg, positions_T, self.position_table)
        if pos_TxD is not None:
            x_BxTxD = x_BxTxD + pos_TxD.astype(x_BxTxD.dtype)[None]

        # Each attention computes the scheme's bias from positions (block by block when chunked) and its table.
        bias_table = self.position_table if scheme.has_bias else None
        x_BxTxD = x_BxTxD.astype(dtype_of(cfg.dtype))
        if isinstance(self.layers, (list, tuple)):
            for layer in self.layers:
                x_BxTxD, _ = layer(x_BxTxD, positions_T, bias_table, start)
        else:
            x_BxTxD, _ = self.layers(x_BxTxD, positions_T, bias_table, start)
        if cfg.norm_position == "pre":
            x_BxTxD = self.final_norm(x_BxTxD)
        if cfg.parameterization == "mup":  # logits x 1/m (models/mup.py)
            x_BxTxD = x_BxTxD * jnp.asarray(mup.output_multiplier(cfg), x_BxTxD.dtype)
        logits_BxTxV = self.embed.attend(x_BxTxD) if cfg.tie_embeddings else self.head(x_BxTxD)
        return constrain(logits_BxTxV, ("act_batch", "act_seq", "act_vocab"))


def init_cache(model: Decoder, params, batch_size: int, max_len: int):
    """A zeroed KV cache for `model` (decode=True) holding up to `max_len` positions for `batch_size` rows."""
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, mutable=["cache"])[1], params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)["cache"]


def unstack_layers(params, n_layers: int):
    """Scanned layout ('layers' with a leading L axis) -> unrolled layout ('layer_0' ... 'layer_{L-1}')."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return params


def stack_layers(params, n_layers: int):
    """Unrolled layout -> scanned layout (the inverse of unstack_layers)."""
    params = dict(params)
    layers = [params.pop(f"layer_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params
