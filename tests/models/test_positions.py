"""Positional schemes against their closed forms and published formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalax.models import positions
from tests import reference
from tests.conftest import small_config


def test_sinusoidal_equals_closed_form():
    d_model, T = 10, 50
    got = np.asarray(positions.sinusoidal(jnp.arange(T), d_model))
    want = np.zeros((T, d_model))
    for p in range(T):
        for i in range(d_model // 2):
            want[p, 2 * i] = math.sin(p / 10000 ** (2 * i / d_model))
            want[p, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / d_model))
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("changes", [
    dict(),
    dict(rope_fraction=0.5),
    dict(rope_scaling="llama3", rope_original_context=16, rope_scaling_factor=8.0, rope_theta=500.0),
])
def test_rope_scores_depend_only_on_relative_offset(changes):
    cfg = small_config("llama", **changes)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 1, cfg.head_dim)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, cfg.head_dim)).astype(np.float32)

    def score(m, n):
        qm = positions.apply_rope(jnp.asarray(q), jnp.asarray([m]), cfg)
        kn = positions.apply_rope(jnp.asarray(k), jnp.asarray([n]), cfg)
        return float(jnp.sum(qm * kn))

    for m, n in [(5, 2), (9, 0), (3, 3), (20, 7)]:
        for shift in (1, 13, 100):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=2e-4)
    # ... and it does depend on the offset (else the test above would be vacuous).
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_keeps_unrotated_dims_and_norms():
    cfg = small_config("llama", rope_fraction=0.5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 3, cfg.head_dim)), jnp.float32)
    y = positions.apply_rope(x, jnp.arange(6), cfg)
    np.testing.assert_array_equal(y[..., cfg.rotary_dim:], x[..., cfg.rotary_dim:])
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # position 0 is not rotated


@pytest.mark.parametrize("changes", [
    dict(), dict(rope_fraction=0.5), dict(rope_scaling="yarn", rope_original_context=16)])
def test_rope_with_positions_known_when_tracing_equals_the_traced_path_and_float64(changes):
    """Positions as numpy (a forward pass without a KV cache): cos and sin become constants; the rotation
    equals the traced path (positions a jax array) to float32 rounding, and a float64 rotation."""
    cfg = small_config("llama", **changes)
    T = 300
    x = np.random.default_rng(2).standard_normal((2, T, 3, cfg.head_dim)).astype(np.float32)
    constant = np.asarray(positions.apply_rope(jnp.asarray(x), np.arange(T, dtype=np.int32), cfg))
    traced = np.asarray(jax.jit(lambda x, p: positions.apply_rope(x, p, cfg))(x, jnp.arange(T, dtype=jnp.int32)))
    np.testing.assert_allclose(constant, traced, rtol=0, atol=2e-5)
    dim, scale = cfg.rotary_dim, positions.rope_attention_factor(cfg)
    angle = np.arange(T, dtype=np.float64)[:, None] * positions.rope_inv_freq(cfg)[None, :]
    cos, sin = (scale * f(angle)[None, :, None, :] for f in (np.cos, np.sin))
    x1, x2 = x[..., : dim // 2].astype(np.float64), x[..., dim // 2 : dim].astype(np.float64)
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., dim:]], axis=-1)
    np.testing.assert_allclose(constant, want, rtol=0, atol=2e-4)  # float32 angles of positions up to 300


def test_llama31_frequencies_equal_per_frequency_reference():
    cfg = small_config("llama", d_model=256, n_heads=2, n_kv_heads=2, rope_theta=500000.0, rope_scaling="llama3",
                       rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                       rope_original_context=8192)
    got = positions.rope_inv_freq(cfg)
    want = reference.rope_freqs(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    wavelen = 2 * math.pi / want
    # The three bands are all present at head_dim 128, so every branch is exercised.
    assert (wavelen < 2048).any() and (wavelen > 8192).any() and ((wavelen > 2048) & (wavelen < 8192)).any()


def test_alibi_slopes_8_heads():
    np.testing.assert_allclose(positions.alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-12)


def test_alibi_slopes_12_heads():
    # Press et al.: the 8 slopes of 8 heads, then every other slope of 16 heads: 2^-0.5, 2^-1.5, ...
    want = [2.0**-i for i in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    np.testing.assert_allclose(positions.alibi_slopes(12), want, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 16, 20, 24, 64, 96])
def test_alibi_slopes_closed_form(n):
    np.testing.assert_allclose(positions.alibi_slopes(n), reference.alibi_slopes_closed_form(n), rtol=1e-12)


def test_alibi_bias_is_minus_slope_times_distance():
    bias = np.asarray(positions.alibi_bias(jnp.arange(6), jnp.arange(6), 8))
    slopes = [2.0**-i for i in range(1, 9)]
    for h in range(8):
        for q in range(6):
            for k in range(q + 1):
                assert bias[h, q, k] == pytest.approx(-slopes[h] * (q - k), rel=1e-6)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (8, 20)])
def test_t5_buckets_equal_float64_reference(num_buckets, max_distance):
    q = np.arange(400)[:, None]
    k = np.arange(400)[None, :]
    got = np.asarray(positions.t5_bucket(jnp.asarray(k - q), num_buckets, max_distance))
    want = reference.t5_bucket_np(k - q, num_buckets, max_distance)
    np.testing.assert_array_equal(got, want)
    assert got.max() == num_buckets - 1 and got.min() == 0
    assert len(np.unique(got)) == num_buckets  # every bucket reached over distances up to 400
