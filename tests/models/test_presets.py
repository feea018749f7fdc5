"""Presets reproduce the published parameter counts; the analytic counts equal the module's."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalax.config import load, model_config
from scalax.models import Decoder, ModelConfig, flops, positions, presets

# Published counts: Hugging Face's model cards / parameter counts of the released checkpoints.
PUBLISHED = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


def module_counts(cfg: ModelConfig) -> dict[str, int]:
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return flops.count_params(shapes["params"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts_exact(name):
    cfg = ModelConfig.from_dict(presets.preset(name))
    assert module_counts(cfg)["params_total"] == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(presets.GPT3_NOMINAL))
def test_gpt3_within_two_percent_of_nominal(name):
    cfg = ModelConfig.from_dict(presets.preset(name))
    total = module_counts(cfg)["params_total"]
    assert abs(total / presets.GPT3_NOMINAL[name] - 1) < 0.02, total


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_analytic_counts_equal_module_for_every_preset(name):
    cfg = ModelConfig.from_dict(presets.preset(name))
    counts = module_counts(cfg)
    assert counts == {"params_total": flops.params_total(cfg), "params_embedding": flops.params_embedding(cfg),
                      "params_non_embedding": flops.params_non_embedding(cfg)}


@pytest.mark.parametrize("name,published", [("llama3.1-405b", dict(n_kv_heads=8, rope_theta=500000.0,
                         rope_scaling="llama3", rope_scaling_factor=8.0, max_seq_len=131072, vocab_size=128256)),
                         ("llama3.2-1b", dict(n_kv_heads=8, head_dim=64, rope_scaling_factor=32.0,
                                              tie_embeddings=True, max_seq_len=131072, d_ff=8192)),
                         ("llama3.2-3b", dict(n_heads=24, head_dim=128, tie_embeddings=True, n_layers=28)),
                         ("llama2-70b", dict(n_kv_heads=8, max_seq_len=4096, vocab_size=32000, norm_eps=1e-5)),
                         ("llama1-65b", dict(n_kv_heads=64, max_seq_len=2048, norm_eps=1e-6)),
                         ("gpt2-xl", dict(n_heads=25, head_dim=64, max_seq_len=1024, tie_embeddings=True))])
def test_preset_published_hyperparameters(name, published):
    cfg = ModelConfig.from_dict(presets.preset(name))
    for key, value in published.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("family", presets.FAMILIES)
@pytest.mark.parametrize("size", sorted(presets.SIZES))
def test_named_sizes_follow_family_rules(family, size):
    cfg = model_config(load(f"configs/{family}.py:size={size}"))
    d_model, n_layers, _ = presets.SIZES[size]
    assert (cfg.d_model, cfg.n_layers, cfg.head_dim) == (d_model, n_layers, presets.HEAD_DIM)
    assert cfg.d_ff == (4 * d_model if family == "gpt" else presets.llama_d_ff(d_model))


def test_llama_d_ff_rule_reproduces_meta_with_multiple_256():
    # Meta's rule with multiple_of=256 gives LLaMA-7B's 11008 and 13B's 13824.
    assert presets.llama_d_ff(4096, 256) == 11008
    assert presets.llama_d_ff(5120, 256) == 13824
    assert presets.llama_d_ff(6656, 256) == 17920


shapes = st.fixed_dictionaries({
    "vocab_size": st.integers(1, 300),
    "n_layers": st.integers(1, 4),
    "n_kv_heads": st.integers(1, 3),
    "q_per_kv": st.integers(1, 3),
    "head_dim": st.sampled_from([2, 4, 8, 16]),
    "d_model": st.integers(1, 40),
    "d_ff": st.integers(1, 64),
    "max_seq_len": st.integers(1, 64),
    "norm": st.sampled_from(["layernorm", "rmsnorm"]),
    "mlp": st.sampled_from(["gelu", "swiglu", "geglu", "relu"]),
    "position": st.sampled_from(list(positions.SCHEMES)),
    "use_bias": st.booleans(),
    "qk_norm": st.booleans(),
    "tie_embeddings": st.booleans(),
    "parallel_block": st.booleans(),
    "share_layers": st.booleans(),
    "scan_layers": st.booleans(),
    "post_norm": st.booleans(),
    "t5_num_buckets": st.integers(2, 40),
})


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_analytic_counts_equal_module_for_random_shapes(s):
    q_per_kv, post_norm = s.pop("q_per_kv"), s.pop("post_norm")
    n_heads = s["n_kv_heads"] * q_per_kv
    cfg = ModelConfig(**s, n_heads=n_heads, t5_max_distance=s["t5_num_buckets"] + 1,
                      norm_position="post" if post_norm and not s["parallel_block"] else "pre")
    counts = module_counts(cfg)
    assert counts["params_total"] == flops.params_total(cfg)
    assert counts["params_embedding"] == flops.params_embedding(cfg)
