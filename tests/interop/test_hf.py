"""Hugging Face interop: logit parity with transformers (PyTorch, CPU) on tiny random models built here, both
ways; refusals with one clear line. Needs the `hf` extra (torch, transformers); skipped without it."""

import json
import os

import numpy as np
import pytest

from scalax.interop import hf
from scalax.models import apply

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 61
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
             max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=V, n_positions=48, bos_token_id=0, eos_token_id=0)),
    "llama-mha": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, num_key_value_heads=4)),
    "llama-gqa-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-theta-500k": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=2, rope_theta=500000.0)),
    "llama3.1-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE)),
    "llama-rope-linear": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-rope-dynamic": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**LLAMA, "max_position_embeddings": 16}, num_key_value_heads=2,
        rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "llama-rope-yarn": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=2, rope_theta=500.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-rope-yarn-deepseek-mscale": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, num_key_value_heads=2, rope_theta=500.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                      "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0})),
}
SEQ = 40  # longer than the scaled cases' original context (16), so their frequency scaling matters


def hf_model(name: str, directory) -> "torch.nn.Module":
    torch.manual_seed(0)
    model = CASES[name]()
    with torch.no_grad():  # move every parameter off its trivial init (unit norms, zero biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def tokens(batch=2, seq=SEQ, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (batch, seq))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_logit_parity_load_and_export(name, scan_layers, tmp_path):
    model = hf_model(name, tmp_path / "hf")
    cfg, params = hf.load(str(tmp_path / "hf"), scan_layers=scan_layers)
    x = tokens()
    ours = np.asarray(apply(cfg, params, x))
    theirs = torch_logits(model, x)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(theirs).max() > 1.0  # the comparison is between real, non-trivial logits
    # Export and reload in transformers: the same logits.
    hf.save(cfg, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert np.abs(torch_logits(reloaded, x) - ours).max() <= 1e-4
    cfg2, params2 = hf.load(str(tmp_path / "out"), scan_layers=scan_layers)
    assert cfg2 == cfg  # and the round trip is exact
    import jax

    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,read", [
    ("llama3.1-rope", ("llama3", 8.0, 16, 500000.0)),
    ("llama-rope-linear", ("linear", 4.0, 8192, 10000.0)),  # (linear scaling has no original context)
    ("llama-rope-dynamic", ("ntk", 4.0, 16, 10000.0)),
    ("llama-rope-yarn", ("yarn", 4.0, 16, 500.0)),
])
def test_rope_scaling_is_read_and_matters(name, read, tmp_path):
    """The scaling's keys are read, and the scaling changes the logits of a sequence past its original context
    (so the parity above is a parity of the scaling, not of plain RoPE)."""
    hf_model(name, tmp_path / "hf")
    cfg, params = hf.load(str(tmp_path / "hf"))
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_context, cfg.rope_theta) == read
    import dataclasses

    plain = dataclasses.replace(cfg, rope_scaling="none")
    x = tokens()
    assert np.abs(np.asarray(apply(plain, params, x)) - np.asarray(apply(cfg, params, x))).max() > 1e-3


def test_sharded_safetensors_are_read(tmp_path):
    model = hf_model("llama-gqa-tied", tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    cfg, params = hf.load(str(tmp_path / "sharded"))
    assert np.abs(np.asarray(apply(cfg, params, tokens())) - torch_logits(model, tokens())).max() <= 1e-4


def test_refusals(tmp_path):
    with pytest.raises(hf.ConversionError, match=r"no config\.json"):
        hf.load(str(tmp_path))
    hf_model("llama-mha", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(hf.ConversionError, match="unsupported architecture 'BertForMaskedLM'; allowed: GPT2"):
        hf.load(str(tmp_path / "bert"))
    bad = {**config, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}, "rope_parameters": None}
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(hf.ConversionError, match="unsupported rope type 'longrope'"):
        hf.load(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(hf.ConversionError, match=r"gate_proj.weight has shape \(64, 32\), but config.json implies "
                                                 r"\(96, 32\)"):
        hf.load(str(tmp_path / "m"))
