"""The decoder against an independent float64 numpy implementation (tests/reference.py), feature by feature."""

import numpy as np
import pytest

from scalax.models import Decoder, positions
from tests import reference
from tests.conftest import init_params, random_tokens, small_config

POSITIONS = list(positions.SCHEMES)
FEATURES = [
    ("llama", dict(n_kv_heads=1)),  # MQA
    ("llama", dict(n_kv_heads=4)),  # MHA
    ("llama", dict(d_model=48, n_heads=12, n_kv_heads=4, position="alibi")),  # 12 heads: non power of two
    ("gpt", dict(qk_norm=True)),
    ("llama", dict(qk_norm=True)),
    ("gpt", dict(parallel_block=True)),
    ("gpt", dict(norm_position="post")),
    ("llama", dict(share_layers=True)),
    ("gpt", dict(share_layers=True, scan_layers=False)),
    ("llama", dict(mlp="geglu")),
    ("gpt", dict(mlp="relu")),
    ("gpt", dict(mlp="swiglu", use_bias=True)),
    ("llama", dict(rope_fraction=0.5)),  # GPT-NeoX partial rotary
    # Llama-3.1 scaling with wavelengths in all three bands (kept, interpolated, divided by the factor).
    ("llama", dict(rope_scaling="llama3", rope_original_context=32, rope_scaling_factor=4.0, rope_theta=500.0)),
    # Context extension: position interpolation; dynamic NTK past an original context of 6 (the sequence is 12);
    # YaRN with a ramp over frequency indices 0..2 of 4, its default attention factor, then explicit ones.
    ("llama", dict(rope_scaling="linear", rope_scaling_factor=4.0)),
    ("llama", dict(rope_scaling="ntk", rope_scaling_factor=4.0, rope_original_context=6)),
    ("llama", dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_context=64, rope_theta=500.0)),
    ("llama", dict(rope_scaling="yarn", rope_scaling_factor=8.0, rope_original_context=256, rope_theta=500.0,
                   rope_beta_fast=8.0, rope_beta_slow=2.0, rope_attention_factor=1.3)),
    ("llama", dict(scan_layers=False)),
    ("gpt", dict(head_dim=16)),  # head_dim != d_model / n_heads
    ("gpt", dict(tie_embeddings=False, norm="rmsnorm")),
]


def _check(family, changes, seq_len=12):
    cfg = small_config(family, **changes)
    params = init_params(cfg, seq_len)
    tokens = random_tokens(cfg, 2, seq_len)
    logits = np.asarray(Decoder(cfg).apply({"params": params}, tokens))
    expected = np.stack([reference.forward(cfg, params, np.asarray(t)) for t in tokens])
    assert logits.shape == (2, seq_len, cfg.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("position", POSITIONS)
def test_every_position_scheme_matches_reference(family, position):
    _check(family, dict(position=position))


@pytest.mark.parametrize("family,changes", FEATURES, ids=[f"{f}-{c}" for f, c in FEATURES])
def test_feature_matches_reference(family, changes):
    _check(family, changes)


def test_every_registered_scheme_has_a_reference():
    """A scheme added to the registry without its float64 reference (tests/reference.py) fails here."""
    assert set(positions.SCHEMES) == set(reference.POSITION_REFERENCES)


@pytest.mark.parametrize("position", POSITIONS)
def test_shifted_positions_match_reference_and_only_relative_schemes_ignore_the_shift(position):
    """Every position moved by 13: the logits equal the reference's at those positions; they equal the
    unshifted logits for a relative scheme (RoPE, ALiBi, T5, none) and differ for an absolute one."""
    cfg = small_config("llama", position=position)
    scheme = positions.SCHEMES[position]
    params = init_params(cfg, 12)
    tokens = random_tokens(cfg, 2, 12)
    model = Decoder(cfg)
    at_0, at_13 = (np.asarray(model.apply({"params": params}, tokens, k)) for k in (0, 13))
    expected = np.stack([reference.forward(cfg, params, np.asarray(t), first_position=13) for t in tokens])
    np.testing.assert_allclose(at_13, expected, atol=5e-5, rtol=1e-5)
    change = np.abs(at_13 - at_0).max()
    if scheme.relative:
        assert change < 5e-5, change
    else:
        assert change > 1e-2, change
