"""Decoder behaviour: causality, KV-cache decoding, GQA/MQA, scan/remat equivalence, dtypes, axis names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scalax.errors import ConfigError
from scalax.models import Decoder, init_cache, positions
from scalax.models.decoder import stack_layers, unstack_layers
from tests.conftest import init_params, random_tokens, small_config

POSITIONS = list(positions.SCHEMES)
FAMILIES = ["gpt", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", POSITIONS)
def test_causality(family, position):
    """d(output t)/d(input embedding s) is exactly zero for s > t and non-zero for s <= t."""
    cfg = small_config(family, position=position)
    T = 8
    params = init_params(cfg, T)
    x_TxD = jax.random.normal(jax.random.key(3), (T, cfg.d_model))
    w_V = jax.random.normal(jax.random.key(4), (cfg.vocab_size,))

    def outputs(x_TxD):
        logits = Decoder(cfg).apply({"params": params}, x_TxD[None], method=Decoder.from_embeddings)
        return logits[0] @ w_V  # [T]

    jac_TxTxD = np.asarray(jax.jit(jax.jacrev(outputs))(x_TxD))
    norms_TxT = np.linalg.norm(jac_TxTxD, axis=-1)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(jac_TxTxD[future] == 0.0)
    assert np.all(norms_TxT[~future] > 1e-6)


def _decode_incrementally(cfg, params, tokens_BxT, prefill: int, cache_len: int):
    model = Decoder(cfg, decode=True)
    cache = init_cache(model, params, tokens_BxT.shape[0], cache_len)

    @jax.jit
    def step(cache, chunk):
        logits, variables = model.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
        return variables["cache"], logits

    cache, logits = step(cache, tokens_BxT[:, :prefill])
    out = [logits]
    for t in range(prefill, tokens_BxT.shape[1]):
        cache, logits = step(cache, tokens_BxT[:, t : t + 1])
        out.append(logits)
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_decoding_equals_full_forward(family, position):
    cfg = small_config(family, position=position)
    T = 12
    params = init_params(cfg, T)
    tokens = random_tokens(cfg, 2, T)
    full = jax.jit(Decoder(cfg).apply)({"params": params}, tokens)
    decoded, cache = _decode_incrementally(cfg, params, tokens, prefill=5, cache_len=cfg.max_seq_len)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == T


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(share_layers=True), dict(n_kv_heads=1),
                                     dict(parallel_block=True, qk_norm=True), dict(norm_position="post")])
def test_kv_cache_with_other_features(changes):
    cfg = small_config("llama", **changes)
    params = init_params(cfg, 10)
    tokens = random_tokens(cfg, 3, 10, seed=5)
    full = jax.jit(Decoder(cfg).apply)({"params": params}, tokens)
    decoded, _ = _decode_incrementally(cfg, params, tokens, prefill=1, cache_len=16)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)


def _repeat_kv(params, rep: int, scanned: bool = True):
    """MHA weights that compute exactly what GQA with `rep` query heads per kv head computes."""
    axis = 2 if scanned else 1  # kernel [L, D, G, K]: the kv-head axis after the layer axis
    attn = dict(params["layers"]["attn"])
    for name in ("k", "v"):
        attn[name] = {"kernel": jnp.repeat(attn[name]["kernel"], rep, axis=axis)}
    return {**params, "layers": {**params["layers"], "attn": attn}}


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_and_mqa_equal_mha_with_repeated_kv_weights(n_kv_heads):
    gqa = small_config("llama", n_kv_heads=n_kv_heads)
    mha = gqa.replace(n_kv_heads=gqa.n_heads)
    params = init_params(gqa, 8)
    tokens = random_tokens(gqa, 2, 8)
    out_gqa = jax.jit(Decoder(gqa).apply)({"params": params}, tokens)
    out_mha = jax.jit(Decoder(mha).apply)({"params": _repeat_kv(params, gqa.n_heads // n_kv_heads)}, tokens)
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5, rtol=1e-5)
    assert params["layers"]["attn"]["k"]["kernel"].shape[2] == n_kv_heads  # K/V really are smaller


@pytest.mark.parametrize("family", FAMILIES)
# auto: straight-line code (3 layers), a loop of one layer (6); a loop of 4 with a remainder of 2
@pytest.mark.parametrize("n_layers,scan_unroll", [(3, 0), (6, 0), (6, 4)])
def test_scan_equals_unrolled(family, n_layers, scan_unroll):
    """The scanned model (a loop of scan_unroll layers per step) gives the unrolled model's logits and gradients."""
    scanned = small_config(family, n_layers=n_layers, scan_unroll=scan_unroll)
    unrolled = scanned.replace(scan_layers=False)
    params = init_params(scanned, 8)
    tokens = random_tokens(scanned, 2, 9)
    flat = unstack_layers(params, n_layers)
    assert jax.tree.structure(flat) == jax.tree.structure(init_params(unrolled, 8))
    out_scan = jax.jit(Decoder(scanned).apply)({"params": params}, tokens)
    out_unrolled = jax.jit(Decoder(unrolled).apply)({"params": flat}, tokens)
    np.testing.assert_allclose(out_scan, out_unrolled, atol=1e-5, rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, stack_layers(flat, n_layers), params)
    loss_scan, grads_scan = _loss_and_grads(scanned, params, tokens)
    loss_unrolled, grads_unrolled = _loss_and_grads(unrolled, flat, tokens)
    np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
    # float32 sums in another order: a few elements of the deeper models' gradients differ by about 5e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
                 unstack_layers(grads_scan, n_layers), grads_unrolled)


def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = Decoder(cfg).apply({"params": p}, tokens[:, :-1]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_equals_no_remat(remat, scan_layers):
    base = small_config("llama", scan_layers=scan_layers)
    params = init_params(base, 8)
    tokens = random_tokens(base, 2, 9)
    loss0, grads0 = _loss_and_grads(base, params, tokens)
    loss1, grads1 = _loss_and_grads(base.replace(remat=remat), params, tokens)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads1, grads0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_close_to_float32(family):
    cfg32 = small_config(family, init_std=0.02)
    params = init_params(cfg32, 16)
    tokens = random_tokens(cfg32, 2, 16)
    out32 = np.asarray(jax.jit(Decoder(cfg32).apply)({"params": params}, tokens))
    out16 = jax.jit(Decoder(cfg32.replace(dtype="bfloat16")).apply)({"params": params}, tokens)
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - out32).max() / np.abs(out32).max()
    assert err < 3e-2, err
    # float32 parameters stay float32 when the compute is bfloat16
    p16 = jax.eval_shape(Decoder(cfg32.replace(dtype="bfloat16")).init, jax.random.key(0), tokens)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(p16))} == {jnp.dtype("float32")}


AXIS_NAMES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", "position", "relpos_buckets"}


@pytest.mark.parametrize("changes", [dict(position="learned"), dict(position="t5", qk_norm=True, tie_embeddings=False),
                                     dict(scan_layers=False, mlp="swiglu"), dict(share_layers=True)])
def test_every_parameter_has_logical_axis_names(changes):
    cfg = small_config("gpt", **changes)
    boxed = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 5
    stacked = cfg.scan_layers and not cfg.share_layers
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
        assert set(leaf.names) <= AXIS_NAMES, path
        in_layers = path[0].key == "layers"
        assert (leaf.names[0] == "layers") == (in_layers and stacked), path
        assert leaf.names.count("layers") <= 1, path


def test_learned_positions_refuse_longer_sequences():
    cfg = small_config("gpt", max_seq_len=8)
    params = init_params(cfg, 8)
    with pytest.raises(ConfigError, match=r"model\.max_seq_len"):
        Decoder(cfg).apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("n_in, in_shape, out_shape", [(1, (6,), (2, 7)), (2, (4, 6), (7,))])
def test_matmul_and_its_gradients_equal_the_contraction_in_float64(n_in, in_shape, out_shape):
    """layers.matmul (a 2-D matmul over flattened axes) against numpy's float64 tensordot, value and gradients of
    sum(sin(y)): dy = cos(y), dx = dy · kernel^T, dkernel = x^T · dy over the leading axes."""
    from scalax.models.layers import matmul

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, *in_shape))
    kernel = rng.standard_normal((*in_shape, *out_shape)) / 4
    y = np.tensordot(x, kernel, axes=n_in)
    dy = np.cos(y)
    lead_axes = [0, 1]
    dx = np.tensordot(dy, kernel, axes=(list(range(2, dy.ndim)), list(range(n_in, kernel.ndim))))
    dkernel = np.tensordot(x, dy, axes=(lead_axes, lead_axes))
    got = matmul(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), n_in)
    gx, gk = jax.grad(lambda a, k: jnp.sum(jnp.sin(matmul(a, k, n_in))), (0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
    assert got.shape == y.shape and gx.shape == x.shape and gk.shape == kernel.shape
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gk, dkernel, rtol=1e-5, atol=1e-5)
