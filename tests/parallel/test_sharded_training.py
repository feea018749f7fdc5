"""Training on 8 fake CPU devices under every mesh equals training on one device; parameters really are
sharded; the vocab-parallel loss equals the plain one and never gathers the logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scalax.errors import ConfigError
from scalax.models import Decoder
from scalax.parallel import loss as parallel_loss
from scalax.parallel import mesh as mesh_lib
from scalax.parallel import shardings
from scalax.train.program import run_once_compiler_options
from tests.conftest import small_config
from tests.parallel import helpers

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope="module")
def single_device_runs():
    out = {}
    for family in ("gpt", "llama"):
        cfg = helpers.model_config(family)
        out[family] = helpers.run_steps(cfg, helpers.mesh_cfg(1, 1, 1), helpers.batches(cfg, 6),
                                        devices=jax.devices()[:1])[:2]
    return out


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(family, sizes, single_device_runs):
    assert len(jax.devices()) == 8
    cfg = helpers.model_config(family)
    losses, params, state, _ = helpers.run_steps(cfg, helpers.mesh_cfg(*sizes), helpers.batches(cfg, 6))
    ref_losses, ref_params = single_device_runs[family]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert losses[-2:].mean() < losses[:2].mean() - 0.05  # it trained: not a comparison of two untouched models
    # Within 1e-4 element by element. (Absolute, not relative: GPT's key bias has an exactly zero gradient, since
    # softmax ignores a per-query constant, so Adam turns rounding noise of ~1e-12 into updates of ~1e-5 there.)
    diff2 = norm2 = 0.0
    for (path, p), r in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params),
                            strict=True):
        np.testing.assert_allclose(p, r, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))
        diff2, norm2 = diff2 + np.sum((p - r) ** 2), norm2 + np.sum(r**2)
    assert np.sqrt(diff2 / norm2) < 1e-5  # and all parameters together agree far closer than that
    # The state lives on all 8 devices under the mesh's shardings.
    leaf = state.params["embed"]["embedding"]
    assert len(leaf.sharding.device_set) == 8


def _bytes_on_device0(tree) -> dict[str, int]:
    device = jax.devices()[0]
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return out


@pytest.mark.parametrize("axis", ["fsdp", "tensor"])
def test_parameters_are_really_sharded(axis):
    # A model whose proportions resemble a real one: vocab 256, D 128, 2 layers, 8 heads, F 512.
    cfg = small_config("llama", vocab_size=256, d_model=128, n_heads=8, n_kv_heads=8, d_ff=512)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, axis: 8}
    layout = mesh_lib.layout(helpers.mesh_cfg(**sizes), cfg, 8)
    model = Decoder(cfg)
    sharding = shardings.param_shardings(model, layout)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"]),
                     out_shardings=sharding, compiler_options=run_once_compiler_options())()
    total = {jax.tree_util.keystr(p): leaf.nbytes for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    on_device = _bytes_on_device0(params)
    replicated = sorted(k for k in total if on_device[k] == total[k])
    # Replicated on purpose: under fsdp nothing; under tensor the norm scales (their only axis is `embed`).
    expected = [] if axis == "fsdp" else sorted(k for k in total if "norm" in k)
    assert replicated == expected
    assert sum(total[k] for k in replicated) < 0.01 * sum(total.values())
    sharded_total = sum(v for k, v in total.items() if k not in replicated)
    sharded_here = sum(v for k, v in on_device.items() if k not in replicated)
    assert abs(sharded_here - sharded_total / 8) <= 0.1 * sharded_total / 8
    # ... and the analytic count of scalax plan agrees with the arrays' real shards.
    abstract = jax.eval_shape(lambda: params)
    assert shardings.bytes_per_device(abstract, sharding) == sum(on_device.values())


def _logits_and_targets(mesh, V=64, B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return (jax.device_put(logits, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))),
            jax.device_put(targets, NamedSharding(mesh, P(("data", "fsdp"), None))))


@pytest.mark.parametrize("sizes", [(1, 1, 8), (2, 1, 4), (2, 2, 2)])
def test_vocab_parallel_loss_equals_plain_loss(sizes):
    cfg = helpers.model_config("gpt")
    layout = mesh_lib.layout(helpers.mesh_cfg(*sizes), cfg, 8)
    logits, targets = _logits_and_targets(layout.mesh)

    def parallel(lg):
        ce, log_z = parallel_loss.cross_entropy(lg, targets, layout)
        return ce.mean(), (ce, log_z)

    def plain(lg):
        log_z = jax.nn.logsumexp(lg, axis=-1)
        ce = log_z - jnp.take_along_axis(lg, targets[..., None], axis=-1)[..., 0]
        return ce.mean(), (ce, log_z)

    (lp, (ce_p, z_p)), g_p = jax.jit(jax.value_and_grad(parallel, has_aux=True))(logits)
    (lr, (ce_r, z_r)), g_r = jax.jit(jax.value_and_grad(plain, has_aux=True))(logits)
    np.testing.assert_allclose(lp, lr, rtol=1e-6)
    np.testing.assert_allclose(ce_p, ce_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z_p, z_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_p, g_r, rtol=1e-6, atol=1e-9)
    # float64 numpy, independently
    x = np.asarray(logits, np.float64)
    t = np.asarray(targets)
    m = x.max(-1, keepdims=True)
    ref = (np.log(np.exp(x - m).sum(-1)) + m[..., 0] - np.take_along_axis(x, t[..., None], -1)[..., 0]).mean()
    np.testing.assert_allclose(float(lp), ref, rtol=1e-6)


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    shapes = []
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            m = re.search(r"=\s*\(?\w+\[([\d,]*)\]", line)
            if m:
                shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def test_no_all_gather_of_the_full_logits():
    # The loss alone, and the whole train step under tensor 8 (logits [8, 16, 64], 8 rows per batch).
    cfg = helpers.model_config("gpt")
    layout = mesh_lib.layout(helpers.mesh_cfg(1, 1, 8), cfg, 8)
    logits, targets = _logits_and_targets(layout.mesh)
    loss_hlo = jax.jit(lambda lg: parallel_loss.cross_entropy(lg, targets, layout)[0].mean()).lower(
        logits).compile().as_text()
    _, _, state, prog = helpers.run_steps(cfg, helpers.mesh_cfg(1, 1, 8), helpers.batches(cfg, 1))
    batch = jax.device_put(helpers.batches(cfg, 1)[0], layout.batch_sharding)
    step_hlo = prog.train_step.lower(state, batch).compile().as_text()
    V = cfg.vocab_size
    for hlo in (loss_hlo, step_hlo):
        gathered = _all_gather_shapes(hlo)
        assert not any(len(s) >= 2 and s[-1] == V and np.prod(s) >= helpers.SEQ_LEN * V for s in gathered), gathered
    # The reductions over the vocabulary are there (max and sum-exp and the target pick: all-reduces).
    assert "all-reduce" in loss_hlo


@pytest.mark.parametrize("sizes,key", [((3, 1, 1), "mesh"), ((1, 2, 4), "model.n_heads"),
                                       ((-1, -1, 1), "mesh.fsdp")])
def test_mesh_errors(sizes, key):
    cfg = small_config("llama", vocab_size=64, n_heads=6, d_ff=64, n_kv_heads=2, d_model=48)
    with pytest.raises(ConfigError) as e:
        mesh_lib.layout(helpers.mesh_cfg(*sizes), cfg, 8)
    assert e.value.key == key


def test_batch_and_d_ff_errors():
    cfg = helpers.model_config("gpt")
    with pytest.raises(ConfigError) as e:
        mesh_lib.layout(helpers.mesh_cfg(2, 2, 2), cfg, 6)
    assert e.value.key == "train.batch_size" and "multiple of 4" in str(e.value)
    with pytest.raises(ConfigError) as e:
        mesh_lib.layout(helpers.mesh_cfg(1, 1, 8), small_config("gpt", vocab_size=64, n_heads=8, d_ff=60), 8)
    assert e.value.key == "model.d_ff"
    with pytest.raises(ConfigError) as e:
        mesh_lib.layout(helpers.mesh_cfg(1, 1, 8), small_config("gpt", vocab_size=61, n_heads=8, d_ff=64), 8)
    assert e.value.key == "model.vocab_size"


def test_gqa_kv_heads_replicated_only_when_tensor_does_not_divide_them():
    cfg = helpers.model_config("llama")  # 2 kv heads
    rules = dict(mesh_lib.layout(helpers.mesh_cfg(1, 1, 8), cfg, 8).rules)
    assert rules["kv_heads"] is None and rules["heads"] == "tensor"
    rules = dict(mesh_lib.layout(helpers.mesh_cfg(4, 1, 2), cfg, 8).rules)
    assert rules["kv_heads"] == "tensor"
