"""The decoder: token (+ position) embedding, L blocks (scanned or unrolled, optionally rematerialised or
sharing one set of weights), final norm, tied or untied head. Pure `init`/`apply`; the only state besides
'params' is the optional 'cache' collection used for incremental decoding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from scalax.errors import ConfigError
from scalax.models import positions
from scalax.models.attention import Attention
from scalax.models.config import ModelConfig
from scalax.models.layers import Embedding, Mlp, Norm, constrain, dtype_of, kernel_init

# Each remat name maps explicitly to one jax checkpoint policy (None: no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only
}


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
        if cfg.position == "learned":
            self.pos_embed = self.param("pos_embed", kernel_init(cfg, ("position", "embed")),
                                        (cfg.max_seq_len, cfg.d_model), dtype_of(cfg.param_dtype))
        if cfg.position == "t5":  # one table shared by all layers, as in T5
            self.relpos_bias = self.param("relpos_bias", kernel_init(cfg, ("relpos_buckets", "heads")),
                                          (cfg.t5_num_buckets, cfg.n_heads), dtype_of(cfg.param_dtype))
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
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, decode=self.decode, name="layers")
        else:
            self.layers = [block(cfg, decode=self.decode, name=f"layer_{i}") for i in range(cfg.n_layers)]
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype_of(cfg.dtype),
                                 param_dtype=dtype_of(cfg.param_dtype),
                                 kernel_init=kernel_init(cfg, ("embed", "vocab")))

    def __call__(self, tokens_BxT: jnp.ndarray) -> jnp.ndarray:
        return self.from_embeddings(self.embed(tokens_BxT))

    def from_embeddings(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        """Logits from token embeddings (before positions are added): the rest of the forward pass."""
        cfg = self.cfg
        T = x_BxTxD.shape[1]
        start = None
        positions_T = jnp.arange(T, dtype=jnp.int32)
        if self.decode:
            start = self.cache_index.value
            if self.cache_ready:  # otherwise this call only creates the cache, of length T
                self.cache_index.value = start + T
                positions_T = positions_T + start

        if cfg.position == "learned":
            if T > cfg.max_seq_len:
                raise ConfigError("model.max_seq_len", f"a sequence of {T} tokens is longer than the learned "
                                  f"position table ({cfg.max_seq_len}); raise max_seq_len or shorten the input")
            pos_TxD = jnp.take(self.pos_embed, positions_T, axis=0)
            x_BxTxD = x_BxTxD + pos_TxD.astype(x_BxTxD.dtype)[None]
        elif cfg.position == "sinusoidal":
            x_BxTxD = x_BxTxD + positions.sinusoidal(positions_T, cfg.d_model).astype(x_BxTxD.dtype)[None]

        # T5's table is shared by the layers; each attention computes its bias from positions (block by block
        # when chunked).
        bias_table = self.relpos_bias if cfg.position == "t5" else None
        x_BxTxD = x_BxTxD.astype(dtype_of(cfg.dtype))
        if isinstance(self.layers, (list, tuple)):
            for layer in self.layers:
                x_BxTxD, _ = layer(x_BxTxD, positions_T, bias_table, start)
        else:
            x_BxTxD, _ = self.layers(x_BxTxD, positions_T, bias_table, start)
        if cfg.norm_position == "pre":
            x_BxTxD = self.final_norm(x_BxTxD)
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
