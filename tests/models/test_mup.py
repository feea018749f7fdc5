"""muP (models/mup.py) against the practitioner's table, checked independently: the init's empirical standard
deviations, the optimizer's per-parameter update ratios against sp's on the same gradients, and the forward
multipliers against an sp model whose parameters carry them."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalax import config as config_lib
from scalax.errors import ConfigError
from scalax.models import Decoder, ModelConfig, mup
from scalax.train import optim

BASE, WIDTH = 32, 128  # m = 4


def llama(parameterization: str, width: int = WIDTH, **changes) -> tuple[ModelConfig, object]:
    cfg = config_lib.load("configs/llama.py:size=tiny", [
        f"--config.model.parameterization={parameterization}", f"--config.model.mup_base_width={BASE}",
        f"--config.model.d_model={width}", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
        "--config.model.d_ff=256", "--config.model.n_layers=2", "--config.model.dtype=float32",
        "--config.model.vocab_size=256", "--config.model.scan_layers=false", "--config.optim.weight_decay=0.1",
        *[f"--config.model.{k}={v}" for k, v in changes.items()]])
    return config_lib.model_config(cfg), cfg


def init(model_cfg: ModelConfig, seed: int = 0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.meta.unbox(Decoder(model_cfg).init(jax.random.PRNGKey(seed), tokens)["params"])


def leaves(params) -> dict[tuple[str, ...], jax.Array]:
    return {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def hidden(path: tuple[str, ...]) -> bool:
    """The table's hidden weights, by name: the kernels of attention and MLP projections."""
    return len(path) >= 3 and path[-1] == "kernel" and path[-3] in ("attn", "mlp") and path[-2] in (
        "q", "k", "v", "o", "wi", "wg", "wo")


def test_init_std_per_the_table():
    model_cfg, _ = llama("mup")
    sigma = model_cfg.init_std
    checked = 0
    for path, x in leaves(init(model_cfg)).items():
        if x.ndim < 2:
            continue
        want = sigma / np.sqrt(WIDTH / BASE) if hidden(path) else sigma  # embedding and head: sigma
        assert float(jnp.std(x)) == pytest.approx(want, rel=0.08), path
        checked += 1
    assert checked == 2 * 7 + 2  # q k v o wi wg wo per layer, the embedding table, the head


def test_adamw_update_ratios_per_the_table():
    model_cfg, cfg = llama("mup")
    params = init(model_cfg)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    updates = {}
    for name, multiplier in (("sp", None), ("mup", functools.partial(mup.lr_multiplier, model_cfg))):
        tx = optim.optimizer(cfg.optim, 100, lr_multiplier=multiplier)
        updates[name] = leaves(tx.update(grads, tx.init(params), params)[0])
    for path, u in updates["mup"].items():
        ratio = np.asarray(u) / np.asarray(updates["sp"][path])
        assert np.allclose(ratio, 1 / 4 if hidden(path) else 1.0, rtol=1e-6), path
    # under sp every multiplier is 1
    sp_cfg, _ = llama("sp")
    assert {mup.lr_multiplier(sp_cfg, p) for p in updates["sp"]} == {1.0}


def test_adam_epsilon_is_scaled_by_one_over_m():
    """First AdamW step on a constant gradient g (no decay): the update is -lr g / (|g| + eps'), so a gradient
    the size of eps tells eps' = eps / m apart from eps."""
    model_cfg, cfg = llama("mup")
    cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.schedule, cfg.optim.warmup_steps = 0.0, 0.0, "constant", 0
    params = {"embed": {"embedding": jnp.zeros((4, 4))}}
    g = cfg.optim.eps
    tx = optim.optimizer(cfg.optim, 10, eps_multiplier=mup.adam_eps_multiplier(model_cfg))
    update = tx.update({"embed": {"embedding": jnp.full((4, 4), g)}}, tx.init(params), params)[0]
    m = WIDTH / BASE
    want = -cfg.optim.lr * g / (g + g / m)
    np.testing.assert_allclose(np.asarray(update["embed"]["embedding"]), want, rtol=1e-5)
    assert mup.adam_eps_multiplier(llama("sp")[0]) == 1.0


def test_forward_multipliers_equal_an_sp_model_that_carries_them():
    """muP's logits x 1/m and q.k / K equal sp's after folding them into the parameters: the final RMSNorm's scale
    times 1/m, the query kernel times 1/sqrt(K) (sp divides by sqrt(K) once more)."""
    mup_cfg, _ = llama("mup")
    sp_cfg, _ = llama("sp")
    params = init(mup_cfg)
    K = mup_cfg.head_dim
    folded = jax.tree.map(lambda x: x, params)
    folded["final_norm"]["scale"] = params["final_norm"]["scale"] / (WIDTH / BASE)
    for i in range(2):
        folded[f"layer_{i}"]["attn"]["q"]["kernel"] = params[f"layer_{i}"]["attn"]["q"]["kernel"] * K**-0.5
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 256)
    want = Decoder(sp_cfg).apply({"params": folded}, tokens)
    got = Decoder(mup_cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert not np.allclose(np.asarray(Decoder(sp_cfg).apply({"params": params}, tokens)), np.asarray(got))


def test_mup_needs_its_base_width():
    with pytest.raises(ConfigError, match=r"model\.mup_base_width"):
        ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, parameterization="mup")


def test_hf_export_refuses_mup():
    from scalax.interop import hf

    mup_cfg, _ = llama("mup")
    with pytest.raises(hf.ConversionError, match="parameterization"):
        hf.config_to_hf(mup_cfg)
    assert hf.config_to_hf(llama("sp")[0])["architectures"] == ["LlamaForCausalLM"]
