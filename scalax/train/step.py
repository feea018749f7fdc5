"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

A batch is int32 tokens [B, T + 1]: inputs are [:, :-1], targets [:, 1:]. The loss is the mean cross-entropy
in nats per token, computed in float32 from the logits of the compute dtype, plus z_loss · mean(log Z)^2.
With k microbatches the batch is split into k equal parts whose gradients are averaged (a lax.scan), which
equals one step on the whole batch. `make_train_steps` runs up to K such steps in one compiled call (a loop
over a stack of K batches), which saves the per-call dispatch of models whose steps take milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from scalax.models import Decoder, reductions
from scalax.parallel import loss as parallel_loss
from scalax.parallel.mesh import Layout
from scalax.train.state import TrainState


def token_losses(model: Decoder, params, tokens_BxT1: jax.Array, layout: Layout | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition, both float32 [B, T]. With a layout, the vocab-parallel loss
    (parallel/loss.py) on its mesh: the logits are never gathered."""
    logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1])
    if layout is not None:
        return parallel_loss.cross_entropy(logits_BxTxV, tokens_BxT1[:, 1:], layout)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    log_z_BxT = reductions.logsumexp(logits_BxTxV)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]
    return log_z_BxT - target_logit_BxT, log_z_BxT


def make_train_step(model: Decoder, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    microbatches: int = 1, z_loss: float = 0.0, layout: Layout | None = None) -> Callable:
    def loss_fn(params, tokens_BxT1):
        ce_BxT, log_z_BxT = token_losses(model, params, tokens_BxT1, layout)
        ce = jnp.mean(ce_BxT)
        return ce + z_loss * jnp.mean(jnp.square(log_z_BxT)), ce

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch_BxT1: jax.Array) -> tuple[TrainState, dict]:
        if microbatches == 1:
            (_, ce), grads = grad_fn(state.params, batch_BxT1)
        else:
            micro_MxBxT1 = batch_BxT1.reshape(microbatches, -1, batch_BxT1.shape[-1])

            def accumulate(carry, tokens):
                (_, ce), grads = grad_fn(state.params, tokens)
                return jax.tree.map(jnp.add, carry, (ce, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (ce, grads), _ = jax.lax.scan(accumulate, zeros, micro_MxBxT1)
            ce, grads = jax.tree.map(lambda x: x / microbatches, (ce, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.split(state.rng)[0])
        return new_state, metrics

    return train_step


def make_train_steps(train_step: Callable, k: int) -> Callable:
    """`train_steps(state, batches_KxBxT1, n) -> (state, metrics)`: train_step on batches[0], ..., batches[n - 1]
    in order (1 <= n <= K, a traced count: one compiled program for every n); each metric a [K] array whose
    entries from n on are zero."""

    def train_steps(state: TrainState, batches_KxBxT1: jax.Array, n: jax.Array) -> tuple[TrainState, dict]:
        metrics_shape = jax.eval_shape(train_step, state, batches_KxBxT1[0])[1]
        metrics_K = jax.tree.map(lambda m: jnp.zeros((k, *m.shape), m.dtype), metrics_shape)

        def body(i, carry):
            state, metrics_K = carry
            state, metrics = train_step(state, batches_KxBxT1[i])
            return state, jax.tree.map(lambda buf, m: buf.at[i].set(m), metrics_K, metrics)

        return jax.lax.fori_loop(0, n, body, (state, metrics_K))

    return train_steps


def make_eval_step(model: Decoder, layout: Layout | None = None) -> Callable:
    """Mean loss of each window: [N, T + 1] -> [N] float32 nats per token."""

    def eval_step(params, windows_NxT1: jax.Array) -> jax.Array:
        ce_NxT, _ = token_losses(model, params, windows_NxT1, layout)
        return jnp.mean(ce_NxT, axis=-1)

    return eval_step
