"""The CPU-shaped sums (models/reductions.py) against float64 numpy and the plain forms, and what XLA compiles
them to."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalax.models import reductions
from scalax.models.layers import Norm
from scalax.train.program import step_compiler_options
from tests.conftest import small_config


def _compiled(f, *args, options: dict | None = None) -> str:
    """The optimised HLO of f as the train step is compiled (on CPU: YNNPACK's fusions off, XLA's tree-reduction
    rewrite off), or with the options given."""
    return jax.jit(f, compiler_options=options or step_compiler_options()).lower(*args).compile().as_text()


@pytest.mark.parametrize("n", [256, 48, 32])
def test_softmax_and_logsumexp_match_float64(n):
    x = np.random.default_rng(0).normal(size=(3, 5, n)) * 4
    z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    np.testing.assert_allclose(reductions.logsumexp(jnp.asarray(x, jnp.float32)), z, rtol=1e-6)
    np.testing.assert_allclose(reductions.softmax(jnp.asarray(x, jnp.float32)), np.exp(x - z[..., None]),
                               rtol=2e-6, atol=1e-7)


def _norm(x, split: bool):
    """models/layers.Norm (LayerNorm, d_model 256), with `split_rows` or the plain row in its place."""
    norm = Norm(small_config("gpt", d_model=256))
    params = norm.init(jax.random.key(0), x)
    if split:
        return norm.apply(params, x)
    with mock.patch.object(reductions, "split_rows", lambda x: (x, (-1,))):
        return norm.apply(params, x)


@pytest.mark.parametrize("name", ["norm", "softmax", "logsumexp"])
def test_split_rows_match_the_plain_form_and_compile_without_reduce_windows(name):
    """Compiled as the train step is (XLA's tree-reduction rewrite off), a gradient through split rows has no
    reduce-window, where the rewrite leaves some; and it matches the plain form's (a second code path)."""
    fs = {"norm": (functools.partial(_norm, split=True), functools.partial(_norm, split=False)),
          "softmax": (reductions.softmax, jax.nn.softmax),
          "logsumexp": (reductions.logsumexp, functools.partial(jax.nn.logsumexp, axis=-1))}[name]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 64, 256)), jnp.float32)
    grads = [jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x)))) for f in fs]
    options = step_compiler_options()
    if options is None:
        pytest.skip(f"no such option in this XLA ({jax.__version__}) or not a CPU")
    rewrite = {k: v for k, v in options.items() if k != "xla_disable_hlo_passes"}
    assert _compiled(grads[0], x).count("reduce-window(") == 0
    assert _compiled(grads[1], x, options=rewrite).count("reduce-window(") > 0  # what the option removes
    np.testing.assert_allclose(grads[0](x), grads[1](x), rtol=1e-4, atol=1e-5)


def test_a_rows_parameters_gradient_is_a_matmul_against_ones():
    rng = np.random.default_rng(1)
    p, y = rng.normal(size=(3, 64)), rng.normal(size=(4, 512, 3, 64))

    def loss(p, y):
        return jnp.sum(jnp.sin(y + reductions.broadcast_rows(p, y.shape)))

    grad = jax.grad(loss)
    np.testing.assert_allclose(grad(jnp.asarray(p, jnp.float32), jnp.asarray(y, jnp.float32)),
                               np.cos(y + p).sum(axis=(0, 1)), rtol=2e-5)
    text = _compiled(grad, jnp.zeros((3, 64)), jnp.zeros((4, 512, 3, 64)))
    assert "reduce-window" not in text and " dot(" in text
    plain = _compiled(jax.grad(lambda p, y: jnp.sum(jnp.sin(y + p))), jnp.zeros((3, 64)), jnp.zeros((4, 512, 3, 64)))
    assert " dot(" not in plain and "reduce(" in plain  # what the matmul replaces
