"""Vocab-parallel cross-entropy (Megatron): the logits stay sharded over `tensor` along the vocabulary.

Each device holds logits_BxTxV/t for its slice of the vocabulary. The log-partition needs the global max and
sum of exponentials (one pmax and one psum over `tensor`, of [B, T] values each), and the target's logit lives
on exactly one shard (a psum of a masked pick). Nothing of size V leaves a device, so the full logits are never
gathered. With tensor = 1 the collectives are over one device and this is the plain loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from scalax.parallel.mesh import Layout
from scalax.parallel.rules import BATCH_AXES


def _local_cross_entropy(logits_BxTxv: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """On one shard: (cross-entropy, log Z), both float32 [B, T], with the reductions over `tensor`."""
    logits_BxTxv = logits_BxTxv.astype(jnp.float32)
    v_local = logits_BxTxv.shape[-1]
    offset = jax.lax.axis_index("tensor") * v_local
    # The max only keeps exp() in range; log Z does not depend on it, so no gradient flows through it.
    max_BxT = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits_BxTxv, axis=-1)), "tensor")
    sum_exp_BxT = jax.lax.psum(jnp.sum(jnp.exp(logits_BxTxv - max_BxT[..., None]), axis=-1), "tensor")
    log_z_BxT = max_BxT + jnp.log(sum_exp_BxT)
    local_BxT = targets_BxT - offset
    here_BxT = (local_BxT >= 0) & (local_BxT < v_local)
    picked_BxT = jnp.take_along_axis(logits_BxTxv, jnp.clip(local_BxT, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit_BxT = jax.lax.psum(jnp.where(here_BxT, picked_BxT, 0.0), "tensor")
    return log_z_BxT - target_logit_BxT, log_z_BxT


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, layout: Layout) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition, float32 [B, T], for logits sharded (batch over data x fsdp,
    vocab over tensor) on the layout's mesh."""
    fn = jax.shard_map(_local_cross_entropy, mesh=layout.mesh,
                       in_specs=(P(BATCH_AXES, None, "tensor"), P(BATCH_AXES, None)),
                       out_specs=(P(BATCH_AXES, None), P(BATCH_AXES, None)), check_vma=False)
    return fn(logits_BxTxV, targets_BxT)
