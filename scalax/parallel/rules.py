"""Logical axis rules: the only place that knows how the model's named axes map onto the mesh.

Parameters and activations carry logical names (models/layers.py); a rule maps a name to mesh axes, or to None
(replicated). The table is config data (`mesh.rules`, a list of [logical name, mesh axes]) and defaults to:

- FSDP (ZeRO-3): every parameter's `embed` dimension is sharded over `fsdp`; XLA gathers each layer's weights
  for its matmuls and reduce-scatters their gradients.
- Tensor parallelism (Megatron): `heads`, `kv_heads`, `mlp` and `vocab` over `tensor`, so Q/K/V and the MLP's
  input projections are column-parallel, the attention output and MLP output projections row-parallel, and the
  logits vocab-parallel (see loss.py).
- The batch (`act_batch`) over `data` and `fsdp`; activations' `embed` dimension unsharded.

Norm scales and biases over `embed` alone are tiny; under tensor parallelism alone they stay replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

from scalax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("position", None),
    ("relpos_buckets", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

def normalise(rules: Sequence) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Rules from config data (lists after a JSON round trip) as tuples; each mesh axis must exist."""
    out = []
    for item in rules:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ConfigError("mesh.rules", f"each rule is [logical name, mesh axes], got {item!r}")
        name, axes = item
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            unknown = [a for a in axes if a not in AXES]
        else:
            unknown = [] if axes is None or axes in AXES else [axes]
        if unknown:
            raise ConfigError("mesh.rules", f"rule for {name!r} names unknown mesh axes {unknown}; allowed: "
                              f"{', '.join(AXES)} or null")
        out.append((name, axes))
    return tuple(out)


def without(rules: Sequence, names: Sequence[str]) -> tuple:
    """The rules with the logical `names` replicated (mapped to None)."""
    return tuple((name, None if name in names else axes) for name, axes in rules)
