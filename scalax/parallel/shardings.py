"""Shardings of the model's parameters and of the whole train state, from the logical names and the rules.

The parameters' shardings come from `init` under `jax.eval_shape` (nothing is allocated): each parameter's
logical names -> mesh axes by the rules. Optimizer state leaves that mirror a parameter (Adam's mu and nu, ...)
get that parameter's sharding; everything else (step, counters, the PRNG key) is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding

from scalax.models import Decoder
from scalax.parallel.mesh import Layout


def logical_specs(model: Decoder) -> Any:
    """The parameters' logical PartitionSpecs (names like ('layers', 'embed', 'mlp')), without allocating."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]
    return nn.get_partition_spec(boxed)


def param_shardings(model: Decoder, layout: Layout) -> Any:
    """NamedShardings of the (unboxed) parameters on the layout's mesh."""
    return nn.logical_to_mesh_sharding(logical_specs(model), layout.mesh, layout.rules)


def state_shardings(abstract_state: Any, params_sharding: Any, layout: Layout) -> Any:
    """Shardings for a whole state pytree whose `.params` mirror `params_sharding`: any leaf whose key path ends
    with a parameter's path (and has its shape) is sharded like it; the rest is replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params_sharding)[0]
    for path, sharding in flat_params:
        by_path[_keys(path)] = sharding
    longest = max((len(k) for k in by_path), default=0)
    shapes = {_keys(p): leaf.shape for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}

    def pick(path, leaf):
        keys = _keys(path)
        for n in range(min(longest, len(keys)), 0, -1):
            suffix = keys[-n:]
            if suffix in by_path and shapes.get(suffix) == getattr(leaf, "shape", None):
                return by_path[suffix]
        return layout.replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the target that restores a checkpoint onto this mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree under its shardings (the largest shard of each leaf)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings, is_leaf=_is_sharding), strict=True):
        shard = s.shard_shape(a.shape) if isinstance(s, NamedSharding) else a.shape
        total += int(jnp.dtype(a.dtype).itemsize) * _prod(shard)
    return total


def _is_sharding(x) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
