"""FLOPs per token: the published DeepSeek LLM figures, and XLA's own count of the forward pass."""

import jax
import jax.numpy as jnp
import pytest

from scalax.config import load, model_config
from scalax.models import Decoder, ModelConfig, flops

# DeepSeek LLM 2024, table 3: n_layer 8, d_model 512, vocab 102400, seq 4096.
L, D, V, SEQ = 8, 512, 102400, 4096


@pytest.fixture
def deepseek_shape():
    # MHA with d_ff = 4 d and no biases: the shape behind 12·L·d². RMSNorm adds (2L + 1)·d scale parameters.
    return ModelConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=8, d_ff=4 * D, norm="rmsnorm", use_bias=False,
                       position="rope", tie_embeddings=True, max_seq_len=SEQ)


def test_deepseek_parameter_counts(deepseek_shape):
    norms = (2 * L + 1) * D
    assert flops.params_non_embedding(deepseek_shape) - norms == 25_165_824 == 12 * L * D**2
    assert flops.flops_per_token(deepseek_shape, SEQ, "6n_head") / 6 - norms == 77_594_624


def test_deepseek_non_embedding_flops_M(deepseek_shape):
    """M = 72·L·d² + 12·L·d·seq is the `exact` count without embedding, softmax and head (full attention)."""
    terms = flops.forward_flops_per_sequence(deepseek_shape, SEQ)
    matmuls = ("qkv_projection", "attention_logits", "attention_values", "output_projection", "mlp")
    m = 3 * sum(terms[k] for k in matmuls) / SEQ
    assert m == 352_321_536 == 72 * L * D**2 + 12 * L * D * SEQ


def test_causal_attention_is_half_of_full(deepseek_shape):
    attn = (flops.flops_per_token(deepseek_shape, SEQ, "6n_head_attn")
            - flops.flops_per_token(deepseek_shape, SEQ, "6n_head"))
    assert attn == 12 * L * D * SEQ / 2


def test_6n_is_six_times_non_embedding_and_exact_close_for_large_models():
    cfg = model_config(load("configs/llama.py:preset=llama2-70b"))
    assert flops.flops_per_token(cfg, 4096, "6n") == 6 * flops.params_non_embedding(cfg)
    # For a large model at moderate context the conventions agree within a few percent (Hoffmann et al. table A4).
    exact, approx = flops.flops_per_token(cfg, 2048, "exact"), flops.flops_per_token(cfg, 2048, "6n_head_attn")
    assert abs(exact / approx - 1) < 0.05


def test_shared_layers_count_every_use():
    shared = model_config(load("configs/gpt.py:size=small")).replace(share_layers=True)
    unshared = shared.replace(share_layers=False)
    assert flops.params_non_embedding(shared) < flops.params_non_embedding(unshared)
    for convention in flops.CONVENTIONS:
        assert flops.flops_per_token(shared, 256, convention) == flops.flops_per_token(unshared, 256, convention)


def test_unknown_convention_refused():
    with pytest.raises(ValueError, match="6n_head_attn"):
        flops.flops_per_token(model_config(load("configs/gpt.py")), 16, "7n")


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("seq_len", [64, 256])
def test_forward_flops_agree_with_xla_cost_analysis(family, seq_len):
    """XLA counts the unrolled forward pass's FLOPs (a scanned loop body would count once); its embedding is
    a gather, not the matmul appendix F counts, so that term is left out."""
    cfg = model_config(load(f"configs/{family}.py:size=tiny")).replace(dtype="float32", scan_layers=False)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens)["params"]
    compiled = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t)).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    terms = flops.forward_flops_per_sequence(cfg, seq_len)
    analytic = sum(terms.values()) - terms["embedding"]
    assert abs(xla_flops / analytic - 1) < 0.10, (xla_flops, analytic)
