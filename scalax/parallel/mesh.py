"""The device mesh (`data`, `fsdp`, `tensor`) from the config's `mesh` section, and multi-host start-up.

`mesh.data`, `mesh.fsdp`, `mesh.tensor` are axis sizes; one of them may be -1, meaning the devices left over.
Their product must be the device count (all processes' devices together). Axes are explicitly `Auto` (linen's
logical partitioning needs GSPMD's automatic mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from scalax.errors import ConfigError
from scalax.models import ModelConfig
from scalax.parallel import rules as rules_lib
from scalax.parallel.rules import AXES, BATCH_AXES


def axis_sizes(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor) with a -1 resolved; a clear error when they cannot tile n_devices."""
    sizes = {axis: int(mesh_cfg.get(axis, -1 if axis == "data" else 1)) for axis in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(free) > 1:
        key = bad[0] if bad else free[1]
        raise ConfigError(f"mesh.{key}", f"axis sizes are positive integers, at most one of them -1 (the devices "
                          f"left over); got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh.{free[0]}", f"the other axes ({fixed} devices) do not divide the {n_devices} "
                              "devices")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError("mesh", f"data x fsdp x tensor = {sizes['data']} x {sizes['fsdp']} x {sizes['tensor']} = "
                          f"{math.prod(sizes.values())}, but there are {n_devices} devices; allowed: sizes whose "
                          "product is the device count (one of them may be -1)")
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = axis_sizes(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical rules to use on it for one model (kv heads replicated when `tensor` does not
    divide them)."""

    mesh: Mesh
    rules: tuple

    @property
    def batch_sharding(self) -> NamedSharding:
        """[B, ...] arrays split over data x fsdp along B."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))

    @property
    def stacked_batch_sharding(self) -> NamedSharding:
        """[K, B, ...] stacks of batches: each batch split like batch_sharding."""
        return NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @contextlib.contextmanager
    def context(self):
        """This mesh and these rules in context: the model's logical constraints on activations bind while a
        step is traced. (Parameter init stays outside: it gets its shardings from out_shardings.)"""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def traced_in(self, jitted: Callable) -> InContext:
        return InContext(jitted, self)


@dataclasses.dataclass(frozen=True)
class InContext:
    """A jitted function called (or lowered) inside its layout's context."""

    jitted: Any
    layout: Layout

    def __call__(self, *args):
        with self.layout.context():
            return self.jitted(*args)

    def lower(self, *args):
        with self.layout.context():
            return self.jitted.lower(*args)


def layout(mesh_cfg, model: ModelConfig, batch_size: int | None = None, devices=None) -> Layout:
    """The mesh for `mesh_cfg`, checked against the model's shapes (and the global batch, when given)."""
    mesh = make_mesh(mesh_cfg, devices)
    rules = rules_lib.normalise(mesh_cfg.get("rules", rules_lib.DEFAULT_RULES))
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor > 1:
        for key, value in (("n_heads", model.n_heads), ("d_ff", model.d_ff), ("vocab_size", model.vocab_size)):
            if value % tensor:
                allowed = ("a vocabulary padded to a multiple of it (model.vocab_size may exceed the tokenizer's)"
                           if key == "vocab_size" else "a mesh.tensor that divides both model.n_heads and model.d_ff")
                raise ConfigError(f"model.{key}", f"{value} is not divisible by mesh.tensor={tensor}; allowed: "
                                  f"{allowed}")
        if model.n_kv_heads % tensor:  # GQA with fewer kv heads than shards: each shard keeps all kv heads
            rules = rules_lib.without(rules, ("kv_heads", "act_kv_heads"))
    if fsdp > 1 and model.d_model % fsdp:
        raise ConfigError("model.d_model", f"{model.d_model} is not divisible by mesh.fsdp={fsdp}; allowed: a "
                          "mesh.fsdp that divides d_model")
    out = Layout(mesh, rules)
    if batch_size is not None and batch_size % out.batch_shards:
        raise ConfigError("train.batch_size", f"{batch_size} is not divisible by mesh.data x mesh.fsdp = "
                          f"{out.batch_shards}; allowed: a multiple of {out.batch_shards}")
    return out


# ---------------------------------------------------------------------- multi-host
ENV = {"coordinator": "SCALAX_COORDINATOR", "num_processes": "SCALAX_NUM_PROCESSES",
       "process_id": "SCALAX_PROCESS_ID"}


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
    """`jax.distributed.initialize`, from flags or the environment (SCALAX_COORDINATOR=host:port,
    SCALAX_NUM_PROCESSES, SCALAX_PROCESS_ID). With none of them (Cloud TPU, SLURM), JAX detects the cluster.
    On CPU the collectives go over gloo."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"])
    num_processes = num_processes if num_processes is not None else _env_int("num_processes")
    process_id = process_id if process_id is not None else _env_int("process_id")
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--coordinator", "a multi-process run needs all of --coordinator=HOST:PORT, "
                          "--num_processes=N and --process_id=I (or SCALAX_COORDINATOR, SCALAX_NUM_PROCESSES, "
                          "SCALAX_PROCESS_ID); give none of them on Cloud TPU")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives; GPUs use NCCL
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError("--process_id", f"must be in [0, {num_processes}), got {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s)


def _env_int(name: str) -> int | None:
    value = os.environ.get(ENV[name])
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(ENV[name], f"must be an integer, got {value!r}") from None

