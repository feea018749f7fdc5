"""Causal self-attention: MHA, GQA and MQA, RoPE, an additive position bias, a KV cache, and five ways to
compute softmax(q·k / sqrt(K) + bias) · v, chosen by `model.attention`:

- `einsum`: the reference. Scores [B, G, Q, T, S] in float32, materialised; on CPU self-attention in query
  blocks that skip the scores above the causal diagonal (`query_blocks_for`).
- `dot_product`: `jax.nn.dot_product_attention`; cuDNN's fused kernel on a GPU in bfloat16/float16, XLA's
  otherwise.
- `chunked`: blockwise attention in pure JAX with an online softmax (Rabe & Staats 2021; Dao et al. 2022):
  queries and keys in blocks of `model.attention_block`, the bias computed block by block, each block
  rematerialised in the backward pass, so memory is O(T · block) on any device, for every positional scheme.
- `splash`: the TPU Pallas splash-attention kernel under `shard_map` (interpreted off TPU); no additive bias.
- `auto` (default): splash on TPU for schemes without a bias, cuDNN (`dot_product`) on GPU, einsum elsewhere.

Shapes: B batch, T query positions, S key positions, H query heads, G = n_kv_heads, Q = H // G query heads
per kv head, K head_dim. Keys and values are never repeated to H heads: queries are grouped as [B,T,G,Q,K].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from scalax.errors import ConfigError
from scalax.models import mup, positions, reductions
from scalax.models.config import ModelConfig
from scalax.models.layers import DenseGeneral, Norm, constrain, dtype_of, kernel_init

BiasFn = Callable[[jax.Array, jax.Array], jax.Array] | None  # (q_pos_T, k_pos_S) -> bias [H, T, S] float32
NEG = float(jnp.finfo(jnp.float32).min)


def resolve(cfg: ModelConfig, backend: str | None = None) -> str:
    """The implementation a config's `model.attention` stands for on `backend` (default: JAX's)."""
    if cfg.attention != "auto":
        return cfg.attention
    backend = backend or jax.default_backend()
    if backend == "tpu" and not positions.scheme_of(cfg).has_bias:
        return "splash"
    return "dot_product" if backend == "gpu" else "einsum"


def query_blocks_for(T: int, backend: str | None = None) -> int:
    """How many query blocks `einsum_attention` splits self-attention over T positions into on `backend`
    (default: JAX's): on CPU blocks of about 128 (64 below T = 256), 2 to 8 of them; elsewhere 1 (no split).
    Skipping the scores above the diagonal made the attention's forward and backward pass 1.2-1.5x faster at issue
    #14's and the quickstart's shapes, the quickstart's steps 1.11-1.17x (docs/benchmarks.md)."""
    if (backend or jax.default_backend()) != "cpu" or T < 128:
        return 1
    return min(8, max(2, T // 128))


def describe(cfg: ModelConfig) -> str:
    """One phrase for the run's first log line, e.g. 'einsum (auto on cpu)'."""
    impl = resolve(cfg)
    return f"{impl} (auto on {jax.default_backend()})" if cfg.attention == "auto" else impl


# ---------------------------------------------------------------------- einsum (the reference)
def einsum_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn: BiasFn,
                     query_blocks: int = 1):
    """Materialised scores; softmax in float32, probabilities cast to v's dtype. Returns [B, T, G, Q, K].

    query_blocks > 1 is for self-attention only (the keys are the queries, positions increasing): the queries in
    that many blocks, each against the keys up to its own last, so the scores wholly above the causal diagonal
    are never computed (`query_blocks_for`).

    Both products are batched over (B, G) leading, with the Q query heads of a group stacked on the queries
    (M = Q·T): the [T, S] scores come out of the dot in the layout the softmax reads, and only q, k, v and the
    output ([., K] each, far smaller than the scores) are transposed. Scores laid out [B, G, Q, T, S] straight
    from `btgqk,bsgk->bgqts` made XLA's CPU fusions transpose every [T, S] block (a 1.3-1.6x slower attention
    at quickstart shapes; benchmarks/attention_layout.py)."""
    B, T, G, Q, K = q_BxTxGxQxK.shape
    if query_blocks > 1:
        ends = [T * (i + 1) // query_blocks for i in range(query_blocks)]
        return jnp.concatenate([
            einsum_attention(q_BxTxGxQxK[:, a:b], k_BxSxGxK[:, :b], v_BxSxGxK[:, :b], q_pos_T[a:b], k_pos_S[:b],
                             bias_fn) for a, b in zip([0, *ends[:-1]], ends, strict=True)], axis=1)
    S = k_BxSxGxK.shape[1]
    q_BxGxMxK = jnp.einsum("btgqk->bgqtk", q_BxTxGxQxK).reshape(B, G, Q * T, K)
    k_BxGxSxK, v_BxGxSxK = (jnp.einsum("bsgk->bgsk", x) for x in (k_BxSxGxK, v_BxSxGxK))
    scores_BxGxMxS = jnp.einsum("bgmk,bgsk->bgms", q_BxGxMxK, k_BxGxSxK, preferred_element_type=jnp.float32)
    scores_BxGxQxTxS = scores_BxGxMxS.astype(jnp.float32).reshape(B, G, Q, T, S) * K**-0.5
    if bias_fn is not None:
        bias_HxTxS = bias_fn(q_pos_T, k_pos_S)
        scores_BxGxQxTxS = scores_BxGxQxTxS + bias_HxTxS.reshape(G, Q, *bias_HxTxS.shape[1:])
    causal_TxS = k_pos_S[None, :] <= q_pos_T[:, None]
    scores_BxGxQxTxS = jnp.where(causal_TxS, scores_BxGxQxTxS, NEG)
    probs_BxGxMxS = reductions.softmax(scores_BxGxQxTxS).astype(v_BxSxGxK.dtype).reshape(B, G, Q * T, S)
    out_BxGxMxK = jnp.einsum("bgms,bgsk->bgmk", probs_BxGxMxS, v_BxGxSxK)
    return jnp.einsum("bgqtk->btgqk", out_BxGxMxK.reshape(B, G, Q, T, K))


# ---------------------------------------------------------------------- jax.nn.dot_product_attention
def dot_product_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn: BiasFn):
    """`jax.nn.dot_product_attention` (GQA natively): cuDNN on a GPU for 16-bit inputs, XLA otherwise."""
    B, T, G, Q, K = q_BxTxGxQxK.shape
    bias_1xHxTxS = None if bias_fn is None else bias_fn(q_pos_T, k_pos_S)[None]
    mask_1x1xTxS = (k_pos_S[None, :] <= q_pos_T[:, None])[None, None]
    cudnn = jax.default_backend() == "gpu" and q_BxTxGxQxK.dtype in (jnp.bfloat16, jnp.float16)
    out_BxTxHxK = jax.nn.dot_product_attention(
        q_BxTxGxQxK.reshape(B, T, G * Q, K), k_BxSxGxK, v_BxSxGxK,
        bias=None if bias_1xHxTxS is None else bias_1xHxTxS.astype(q_BxTxGxQxK.dtype),
        mask=mask_1x1xTxS, scale=K**-0.5, implementation="cudnn" if cudnn else "xla")
    return out_BxTxHxK.reshape(B, T, G, Q, K)


# ---------------------------------------------------------------------- chunked (online softmax)
def _blocks(x, n_blocks: int, axis: int):
    """Split `axis` into [n_blocks, size / n_blocks] and move the block index to the front (for lax.scan)."""
    shape = (*x.shape[:axis], n_blocks, x.shape[axis] // n_blocks, *x.shape[axis + 1 :])
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _pad(x, length: int, axis: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _row(reduce, x):
    """`reduce` (jnp.max, jnp.sum) over the last axis, split as in `reductions.split_rows`: [..., n] -> [...]."""
    rows, axes = reductions.split_rows(x)
    return reduce(rows, axis=axes)


def chunked_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn: BiasFn, block: int):
    """Blockwise attention: for each block of queries, a scan over blocks of keys keeps the running max m, the
    running sum of exponentials l and the unnormalised output (all float32), skipping key blocks wholly after
    the query block. Both scans' bodies are rematerialised, so the backward pass keeps O(T · K) per block
    instead of [T, S] scores. Sequences are padded to whole blocks (padded keys are masked out).

    The layout is einsum_attention's: q, k and v are transposed once, batched over (B, G) leading with the Q
    heads of a group stacked on a block's queries (M = Q·t), so each block's [M, s] scores come out of the dot
    in the layout the row max and sum read; the row reductions are split as in `reductions.split_rows`."""
    B, T, G, Q, K = q_BxTxGxQxK.shape
    S = k_BxSxGxK.shape[1]
    bq, bk = min(block, T), min(block, S)
    nq, nk = -(-T // bq), -(-S // bk)
    big = jnp.iinfo(jnp.int32).max
    q_BxGxQxTxK = jnp.einsum("btgqk->bgqtk", _pad(q_BxTxGxQxK, nq * bq, 1))
    q_blocks = _blocks(q_BxGxQxTxK, nq, 3).reshape(nq, B, G, Q * bq, K)  # [nq, B, G, M, K]
    q_pos_blocks = _blocks(_pad(q_pos_T, nq * bq, 0, -1), nq, 0)  # padded queries see no key
    k_blocks, v_blocks = (_blocks(jnp.einsum("bsgk->bgsk", _pad(x, nk * bk, 1)), nk, 2)  # [nk, B, G, s, K]
                          for x in (k_BxSxGxK, v_BxSxGxK))
    k_pos_blocks = _blocks(_pad(k_pos_S, nk * bk, 0, big), nk, 0)  # padded keys are after every query

    def query_block(_, xs):
        q_BxGxMxK, q_pos_t = xs

        def key_block(carry, ys):
            k_BxGxsxK, v_BxGxsxK, k_pos_s = ys

            def update(carry):
                m_BxGxM, l_BxGxM, acc_BxGxMxK = carry
                s_BxGxQxtxs = jnp.einsum("bgmk,bgsk->bgms", q_BxGxMxK, k_BxGxsxK, preferred_element_type=jnp.float32
                                         ).astype(jnp.float32).reshape(B, G, Q, bq, bk) * K**-0.5
                if bias_fn is not None:
                    s_BxGxQxtxs = s_BxGxQxtxs + bias_fn(q_pos_t, k_pos_s).reshape(G, Q, bq, bk)
                causal_txs = k_pos_s[None, :] <= q_pos_t[:, None]
                s_BxGxMxs = jnp.where(causal_txs, s_BxGxQxtxs, NEG).reshape(B, G, Q * bq, bk)
                # The running max only keeps exp in range: the output does not depend on it, so no gradient
                # flows through it (exact, and no max-gradient's tie mask, which a remat that rounds the
                # recomputed scores otherwise can leave empty: 0/0 = NaN, seen with ALiBi at LLVM -O0).
                m_new = jax.lax.stop_gradient(jnp.maximum(m_BxGxM, _row(jnp.max, s_BxGxMxs)))
                p_BxGxMxs = jnp.where(jnp.tile(causal_txs, (Q, 1)), jnp.exp(s_BxGxMxs - m_new[..., None]), 0.0)
                correction = jnp.exp(m_BxGxM - m_new)
                pv_BxGxMxK = jnp.einsum("bgms,bgsk->bgmk", p_BxGxMxs.astype(v_BxGxsxK.dtype), v_BxGxsxK,
                                        preferred_element_type=jnp.float32).astype(jnp.float32)
                return (m_new, l_BxGxM * correction + _row(jnp.sum, p_BxGxMxs),
                        acc_BxGxMxK * correction[..., None] + pv_BxGxMxK)

            after = jnp.min(k_pos_s) > jnp.max(q_pos_t)  # every key of the block is after every query
            return jax.lax.cond(after, lambda c: c, update, carry), None

        init = (jnp.full((B, G, Q * bq), NEG, jnp.float32), jnp.zeros((B, G, Q * bq), jnp.float32),
                jnp.zeros((B, G, Q * bq, K), jnp.float32))
        (_, l_BxGxM, acc_BxGxMxK), _ = jax.lax.scan(jax.checkpoint(key_block), init,
                                                   (k_blocks, v_blocks, k_pos_blocks))
        out_BxGxMxK = acc_BxGxMxK / jnp.where(l_BxGxM > 0, l_BxGxM, 1.0)[..., None]
        return None, out_BxGxMxK.astype(v_BxSxGxK.dtype)

    _, out_nqxBxGxMxK = jax.lax.scan(jax.checkpoint(query_block), None, (q_blocks, q_pos_blocks))
    out_BxGxQxTxK = jnp.moveaxis(out_nqxBxGxMxK.reshape(nq, B, G, Q, bq, K), 0, 3).reshape(B, G, Q, nq * bq, K)
    return jnp.einsum("bgqtk->btgqk", out_BxGxQxTxK)[:, :T]


# ---------------------------------------------------------------------- splash (TPU Pallas)
def splash_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, block: int):
    """The TPU splash-attention kernel, causal, one multi-query kernel per kv head (no repeated keys), under
    `shard_map`: the batch split as the mesh splits `act_batch`, kv heads as it splits `act_kv_heads`. Off TPU
    the kernel runs in Pallas interpret mode (slow; for tests). Blocks: multiples of 128 dividing T and S."""
    # Imported here: Pallas's TPU ops are only needed by this path (and cost start-up time everywhere else).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    _, T, _, Q, K = q_BxTxGxQxK.shape
    S = k_BxSxGxK.shape[1]
    bq, bk = min(block, T), min(block, S)
    if T % bq or S % bk or bq % 128 or bk % 128:
        raise ConfigError("model.attention_block", f"splash needs blocks that are multiples of 128 and divide the "
                          f"sequence ({T}), got {block}; use such a block, or model.attention=chunked")
    batch_axes, head_axes = nn.logical_to_mesh_axes(("act_batch", "act_kv_heads"))
    mesh = jax.sharding.get_abstract_mesh()
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((T, S)) for _ in range(Q)])
    sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                  block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    splash = kernel_lib.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                        interpret=jax.default_backend() != "tpu")

    def local(q_BxGxQxTxK, k_BxGxSxK, v_BxGxSxK):
        per_kv_head = jax.vmap(splash)  # q [Q, T, K], k [S, K], v [S, K] for each kv head
        return jax.vmap(per_kv_head)(q_BxGxQxTxK, k_BxGxSxK, v_BxGxSxK)

    q_BxGxQxTxK = jnp.einsum("btgqk->bgqtk", q_BxTxGxQxK * jnp.asarray(K**-0.5, q_BxTxGxQxK.dtype))
    k_BxGxSxK, v_BxGxSxK = (jnp.einsum("bsgk->bgsk", x) for x in (k_BxSxGxK, v_BxSxGxK))
    if mesh.empty:
        out_BxGxQxTxK = local(q_BxGxQxTxK, k_BxGxSxK, v_BxGxSxK)
    else:
        spec = P(batch_axes, head_axes)
        out_BxGxQxTxK = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                      check_vma=False)(q_BxGxQxTxK, k_BxGxSxK, v_BxGxSxK)
    return jnp.einsum("bgqtk->btgqk", out_BxGxQxTxK)


def attend(impl: str, q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn: BiasFn, block: int,
           query_blocks: int = 1):
    """softmax(q·k / sqrt(K) + bias, causal by position) · v with implementation `impl`: [B, T, G, Q, K].
    query_blocks: einsum's (self-attention only)."""
    if impl == "einsum":
        return einsum_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn, query_blocks)
    if impl == "dot_product":
        return dot_product_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn)
    if impl == "chunked":
        return chunked_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, q_pos_T, k_pos_S, bias_fn, block)
    if bias_fn is not None:
        raise ConfigError("model.attention", "splash adds no attention bias (ALiBi, T5); use chunked, "
                          "dot_product or einsum")
    return splash_attention(q_BxTxGxQxK, k_BxSxGxK, v_BxSxGxK, block)


class Attention(nn.Module):
    """Self-attention over `x_BxTxD` at absolute `positions_T`.

    bias_table: T5's [buckets, H] relative-bias table (shared by the layers) or None. In decode mode the keys
    and values are written into the 'cache' collection at `start` (an int32 scalar), and the queries attend to
    the whole cache, masked to key positions at or before their own (splash decodes through einsum: one new
    token is not a multiple of its block).
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, positions_T, bias_table=None, start=None):
        cfg = self.cfg
        H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dense = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), use_bias=cfg.use_bias)

        def proj(name, heads, head_axis):
            return DenseGeneral(
                (heads, K), kernel_init=kernel_init(cfg, ("embed", head_axis, "head_dim"), hidden=True),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "head_dim")),
                name=name, **dense)(x_BxTxD)

        q_BxTxHxK = proj("q", H, "heads")
        k_BxTxGxK = proj("k", G, "kv_heads")
        v_BxTxGxK = proj("v", G, "kv_heads")
        if cfg.qk_norm:
            q_BxTxHxK = Norm(cfg, axis_name="head_dim", name="q_norm")(q_BxTxHxK)
            k_BxTxGxK = Norm(cfg, axis_name="head_dim", name="k_norm")(k_BxTxGxK)
        scheme = positions.scheme_of(cfg)
        q_BxTxHxK = scheme.rotate(cfg, q_BxTxHxK, positions_T)
        if cfg.parameterization == "mup":  # every implementation divides q.k by sqrt(K); muP's is 1/K
            q_BxTxHxK = q_BxTxHxK * jnp.asarray(mup.attention_scale(cfg) * K**0.5, q_BxTxHxK.dtype)
        k_BxTxGxK = scheme.rotate(cfg, k_BxTxGxK, positions_T)
        q_BxTxHxK = constrain(q_BxTxHxK, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
        k_BxTxGxK = constrain(k_BxTxGxK, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
        v_BxTxGxK = constrain(v_BxTxGxK, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))

        k_BxSxGxK, v_BxSxGxK, k_pos_S = k_BxTxGxK, v_BxTxGxK, positions_T
        impl = resolve(cfg)
        if self.decode:
            # Write this chunk's keys/values at [start, start + T) and attend to the whole cache, whose
            # length S is fixed when it is created (by `decoder.init_cache`, from a [B, S] input).
            initialised = self.has_variable("cache", "cached_k")
            k_cache = self.variable("cache", "cached_k", jnp.zeros, k_BxTxGxK.shape, k_BxTxGxK.dtype)
            v_cache = self.variable("cache", "cached_v", jnp.zeros, v_BxTxGxK.shape, v_BxTxGxK.dtype)
            if initialised:
                zero = jnp.zeros((), jnp.int32)
                k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BxTxGxK, (zero, start, zero, zero))
                v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BxTxGxK, (zero, start, zero, zero))
            k_BxSxGxK, v_BxSxGxK = k_cache.value, v_cache.value
            k_pos_S = jnp.arange(k_BxSxGxK.shape[1], dtype=jnp.int32)
            impl = "einsum" if impl == "splash" else impl

        B, T = q_BxTxHxK.shape[:2]
        bias_fn = functools.partial(scheme.bias, cfg, table=bias_table) if scheme.has_bias else None
        out_BxTxGxQxK = attend(impl, q_BxTxHxK.reshape(B, T, G, H // G, K), k_BxSxGxK, v_BxSxGxK, positions_T,
                               k_pos_S, bias_fn, cfg.attention_block, 1 if self.decode else query_blocks_for(T))
        out_BxTxHxK = constrain(out_BxTxGxQxK.reshape(B, T, H, K), ("act_batch", "act_seq", "act_heads",
                                                                    "act_head_dim"))
        out_BxTxD = DenseGeneral(
            (cfg.d_model,), n_in=2,
            kernel_init=kernel_init(cfg, ("heads", "head_dim", "embed"), output_projection=True, hidden=True),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="o", **dense)(out_BxTxHxK)
        return constrain(out_BxTxD, ("act_batch", "act_seq", "act_embed"))
