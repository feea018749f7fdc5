"""Every attention implementation against the einsum reference: the attention function alone (no bias, ALiBi,
T5; MHA, GQA, MQA; float32 and bfloat16; forward and gradients, including T5's table), the whole decoder for
every positional scheme, decoding with a KV cache, splash under shard_map on a mesh, and `auto`'s choice."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from scalax.errors import ConfigError
from scalax.models import Decoder, apply, attention, positions
from scalax.models.attention import attend, describe, query_blocks_for, resolve
from scalax.models.decoder import init_cache
from scalax.parallel.mesh import Layout
from scalax.parallel.rules import DEFAULT_RULES
from tests.conftest import init_params, small_config

TOLERANCE = {"float32": 2e-5, "bfloat16": 3e-2}


def inputs(dtype, heads, kv_heads, T, S=None, K=8, seed=0):
    S = S or T
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, T, kv_heads, heads // kv_heads, K)).astype(dtype)
    k = jax.random.normal(keys[1], (2, S, kv_heads, K)).astype(dtype)
    v = jax.random.normal(keys[2], (2, S, kv_heads, K)).astype(dtype)
    table = jax.random.normal(keys[3], (32, heads))
    return q, k, v, table


def outputs_and_grads(impl, cfg, q, k, v, table, block, compiler_options=None, query_blocks=1):
    """attend's output and the gradients of a random projection of it w.r.t. q, k, v and T5's table (one
    compiled program)."""
    T, S = q.shape[1], k.shape[1]
    q_pos, k_pos = jnp.arange(S - T, S, dtype=jnp.int32), jnp.arange(S, dtype=jnp.int32)
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def f(q, k, v, table):
        scheme = positions.scheme_of(cfg)
        bias_fn = functools.partial(scheme.bias, cfg, table=table) if scheme.has_bias else None
        out = attend(impl, q, k, v, q_pos, k_pos, bias_fn, block, query_blocks)
        return jnp.sum(out.astype(jnp.float32) * w), out

    grad_fn = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)
    (_, out), grads = jax.jit(grad_fn, compiler_options=compiler_options)(q, k, v, table)
    return out, grads


def assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)


@pytest.mark.parametrize(("position", "kv_heads", "dtype"), [
    ("alibi", 4, "float32"), ("alibi", 2, "float32"), ("alibi", 1, "float32"),
    ("t5", 4, "float32"), ("t5", 2, "float32"), ("t5", 1, "float32"),
    ("none", 2, "float32"), ("t5", 2, "bfloat16")], ids=lambda x: {4: "mha", 2: "gqa", 1: "mqa"}.get(x, str(x)))
def test_attention_agrees_with_einsum(position, kv_heads, dtype):
    """dot_product and chunked; T 40 in blocks of 16: padding (40 is no multiple), skipped key blocks, a partial
    last block. `none` stands for every scheme without a bias (learned, sinusoidal, RoPE: they act before)."""
    cfg = small_config("llama", position=position, n_kv_heads=kv_heads)
    q, k, v, table = inputs(dtype, 4, kv_heads, 40)
    ref, ref_grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=16)
    for impl in ("dot_product", "chunked"):
        out, grads = outputs_and_grads(impl, cfg, q, k, v, table, block=16)
        assert out.dtype == ref.dtype == jnp.dtype(dtype)
        assert_close(out, ref, TOLERANCE[dtype])
        for g, r in zip(grads, ref_grads, strict=True):
            assert_close(g, r, TOLERANCE[dtype])
        if position == "t5":  # the table gets a gradient, block by block
            assert np.abs(np.asarray(grads[3])).max() > 0


@pytest.mark.parametrize(("position", "kv_heads"), [("none", 4), ("alibi", 2), ("t5", 1)],
                         ids=["mha-none", "gqa-alibi", "mqa-t5"])
def test_einsum_in_query_blocks_equals_one_block(position, kv_heads):
    """Self-attention over 40 positions in 2, 3 (uneven: 13, 13, 14) and 8 query blocks, each against the keys up
    to its last: the same output and gradients as the whole [T, S] scores, T5's table included."""
    cfg = small_config("llama", position=position, n_kv_heads=kv_heads)
    q, k, v, table = inputs("float32", 4, kv_heads, 40)
    ref, ref_grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=16)
    for blocks in (2, 3, 8):
        out, grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=16, query_blocks=blocks)
        assert_close(out, ref, TOLERANCE["float32"])
        for g, r in zip(grads, ref_grads, strict=True):
            assert_close(g, r, TOLERANCE["float32"])


def test_the_decoder_splits_training_attention_into_query_blocks_on_cpu(monkeypatch):
    """A GPT over 128 positions: its attention in 2 query blocks (scores of [64, 64] and [64, 128] per head, none
    of [128, 128]), the logits and gradients those of one block."""
    assert [query_blocks_for(T, "cpu") for T in (64, 127, 128, 256, 512, 1024, 4096)] == [1, 1, 2, 2, 4, 8, 8]
    assert query_blocks_for(1024, "gpu") == query_blocks_for(1024, "tpu") == 1
    cfg = small_config("gpt", max_seq_len=128, n_heads=2, d_model=32)
    params = init_params(cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, 128), 0, cfg.vocab_size)
    loss = lambda p: jnp.mean(apply(cfg, p, tokens).astype(jnp.float32) ** 2)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert "f32[2,2,64,64]" in jaxpr and "f32[2,2,64,128]" in jaxpr and "f32[2,2,128,128]" not in jaxpr
    got = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setattr(attention, "query_blocks_for", lambda T: 1)
    jax.clear_caches()  # apply's traces are cached
    assert "f32[2,2,128,128]" in str(jax.make_jaxpr(loss)(params))
    want = jax.jit(jax.value_and_grad(loss))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, 2e-5)


def test_decoding_a_long_chunk_after_a_prefill_keeps_one_query_block():
    """128 tokens decoded at position 128 of a 256-long cache (queries after a prefix of keys: a split by query
    blocks would cut their keys short) give the full forward pass's logits."""
    cfg = small_config("gpt", max_seq_len=256)
    params = init_params(cfg)
    tokens = jax.random.randint(jax.random.key(5), (1, 256), 0, cfg.vocab_size)
    model = Decoder(cfg, decode=True)
    step = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, mutable=["cache"]))
    first, state = step(params, init_cache(model, params, 1, 256), tokens[:, :128])
    second, _ = step(params, state["cache"], tokens[:, 128:])
    want = jax.jit(lambda p: apply(cfg, p, tokens))(params)
    assert_close(jnp.concatenate([first, second], axis=1), want, 2e-5)


@pytest.mark.parametrize("level", [0, 3])
def test_chunked_gradients_are_finite_whatever_the_compiler_rounds(level):
    """At LLVM -O0 a gradient through the running max made NaNs in dq and dk with ALiBi (likely its tie mask
    held no element, the backward's recomputed scores rounded otherwise than the forward's: 0/0)."""
    cfg = small_config("llama", position="alibi", n_kv_heads=2)
    q, k, v, table = inputs("float32", 4, 2, 32)
    options = {"xla_backend_optimization_level": level} if jax.default_backend() == "cpu" else None
    _, ref_grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=16)
    _, grads = outputs_and_grads("chunked", cfg, q, k, v, table, block=16, compiler_options=options)
    for g, r in zip(grads[:3], ref_grads[:3], strict=True):
        assert np.isfinite(np.asarray(g)).all()
        assert_close(g, r, TOLERANCE["float32"])


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_splash_agrees_with_einsum(kv_heads):
    """The Pallas kernel itself, interpreted on CPU: T 256 in blocks of 128."""
    cfg = small_config("llama", position="rope", n_kv_heads=kv_heads)
    q, k, v, table = inputs("float32", 4, kv_heads, 256)
    out, grads = outputs_and_grads("splash", cfg, q, k, v, table, block=128)
    ref, ref_grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=128)
    assert_close(out, ref, 1e-5)
    for g, r in zip(grads[:3], ref_grads[:3], strict=True):
        assert_close(g, r, 1e-5)


def test_chunked_with_queries_after_a_prefix_of_keys():
    """Decode-like: 5 queries at positions 35-39 against 40 keys (the query blocks do not start at 0)."""
    cfg = small_config("llama", position="alibi", n_kv_heads=2)
    q, k, v, table = inputs("float32", 4, 2, 5, S=40)
    out, grads = outputs_and_grads("chunked", cfg, q, k, v, table, block=16)
    ref, ref_grads = outputs_and_grads("einsum", cfg, q, k, v, table, block=16)
    assert_close(out, ref, 2e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, 2e-5)


def decoder_logits_and_grads(cfg, params, tokens):
    """Logits and the gradients of a loss of them w.r.t. every parameter (one compiled program)."""

    def loss(p):
        logits = apply(cfg, p, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_decoder_with_chunked_attention_equals_einsum_for_every_scheme():
    """The whole model (GQA, blocks of 8 over 20 tokens) for every positional scheme: logits; gradients for T5,
    whose bias has a learned table (the attention's own gradients: test_attention_agrees_with_einsum)."""
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, 61)
    for position, scheme in positions.SCHEMES.items():
        cfg = small_config("llama", position=position, attention="einsum", attention_block=8)
        params, chunked = init_params(cfg), cfg.replace(attention="chunked")
        if scheme.has_bias and scheme.table_name:  # a learned bias table: its gradients too
            (ref, ref_grads), (logits, grads) = (decoder_logits_and_grads(c, params, tokens) for c in (cfg, chunked))
            for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
                assert_close(g, r, 2e-5)
        else:
            ref, logits = (jax.jit(lambda p, c=c: apply(c, p, tokens))(params) for c in (cfg, chunked))
        assert_close(logits, ref, 2e-5)


def cached_logits(cfg, params, tokens, prefill):
    """Logits of a prefill of `prefill` tokens, then one token at a time, through the KV cache: [B, T, V]."""
    model = Decoder(cfg, decode=True)
    step = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, mutable=["cache"]))
    cache = init_cache(model, params, tokens.shape[0], tokens.shape[1])
    logits, state = step(params, cache, tokens[:, :prefill])
    pieces = [logits]
    for i in range(prefill, tokens.shape[1]):
        logits, state = step(params, state["cache"], tokens[:, i : i + 1])
        pieces.append(logits)
    return jnp.concatenate(pieces, axis=1)


@pytest.mark.parametrize(("impl", "position"), [("dot_product", "alibi"), ("chunked", "t5"), ("splash", "rope")])
def test_decoding_with_each_implementation_equals_the_full_forward_pass(impl, position):
    """A prefill of 7 then 5 single tokens (chunked: blocks of 8 over a 12-long cache). Splash decodes through
    einsum (one token is no multiple of its block)."""
    cfg = small_config("llama", position=position, attention=impl, attention_block=8 if impl == "chunked" else 128)
    params = init_params(cfg.replace(attention="einsum"))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    want = jax.jit(lambda p: apply(cfg.replace(attention="einsum"), p, tokens))(params)
    assert_close(cached_logits(cfg, params, tokens, prefill=7), want, 2e-5)


def test_splash_under_shard_map_on_a_mesh_equals_einsum():
    """8 devices as data 2 x fsdp 2 x tensor 2: the batch split over data x fsdp, kv heads over tensor (the
kernel's gradients: test_splash_agrees_with_einsum)."""
    cfg = small_config("llama", position="rope", n_kv_heads=2, attention="splash", attention_block=128,
                       max_seq_len=128)
    params = init_params(cfg.replace(attention="einsum"))
    tokens = jax.random.randint(jax.random.key(3), (4, 128), 0, cfg.vocab_size)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    forward = lambda c: jax.jit(lambda p: apply(c, p, tokens))  # noqa: E731
    with Layout(mesh, DEFAULT_RULES).context():
        logits = forward(cfg)(params)
        text = forward(cfg).lower(params).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    assert_close(logits, forward(cfg.replace(attention="einsum"))(params), 2e-5)


def test_auto_picks_per_device_and_says_which():
    rope, alibi = small_config("llama", position="rope"), small_config("llama", position="alibi")
    assert [resolve(rope, b) for b in ("cpu", "gpu", "tpu")] == ["einsum", "dot_product", "splash"]
    assert [resolve(alibi, b) for b in ("cpu", "gpu", "tpu")] == ["einsum", "dot_product", "einsum"]
    assert resolve(rope.replace(attention="chunked"), "tpu") == "chunked"
    assert describe(rope) == f"{resolve(rope)} (auto on {jax.default_backend()})"
    assert describe(rope.replace(attention="chunked")) == "chunked"


def test_splash_refuses_bias_schemes_and_bad_blocks():
    with pytest.raises(ConfigError, match=r"model\.attention: splash adds no attention bias"):
        small_config("llama", position="alibi", attention="splash")
    with pytest.raises(ConfigError, match=r"model\.attention_block"):
        small_config("llama", attention_block=0)
    cfg = small_config("llama", attention="splash", attention_block=8)
    with pytest.raises(ConfigError, match=r"model\.attention_block: splash needs blocks that are multiples of 128"):
        apply(cfg, init_params(cfg.replace(attention="einsum")), jnp.zeros((1, 8), jnp.int32))
