"""A run's setup, from its config to its compiled program: the one sequence that `scalax train` (train/loop.py)
and the memory plan (`scalax plan`, train/memory.py) share.

    config -> validated ModelConfig -> run length in steps -> mesh layout -> optimizer and schedule
           -> Program (sharded initialiser, jitted train and eval steps)

The data come next, in the loop (the memory plan needs none).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import optax
from ml_collections import ConfigDict

from scalax import config as config_lib
from scalax.errors import ConfigError
from scalax.models import Decoder, ModelConfig, mup
from scalax.parallel import mesh as mesh_lib
from scalax.train import optim, program

AUTO_STEPS_PER_CALL = 10  # train.steps_per_call = 0 on CPU (steps_per_call below)


@dataclasses.dataclass(frozen=True)
class RunSetup:
    model: ModelConfig
    steps: int  # the run's length in optimizer steps
    layout: mesh_lib.Layout
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    program: program.Program


def total_steps(train_cfg) -> int:
    """Run length in optimizer steps: train.steps, or ceil(train.tokens / tokens per step) when tokens > 0."""
    if train_cfg.tokens < 0:
        raise ConfigError("train.tokens", f"must be >= 0 (0: use train.steps), got {train_cfg.tokens}")
    if train_cfg.tokens > 0:
        return math.ceil(train_cfg.tokens / (train_cfg.batch_size * train_cfg.seq_len))
    return train_cfg.steps


def validate(cfg: ConfigDict) -> None:
    """The `train` and `data` keys that no later step checks."""
    train_cfg = cfg.train
    for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "eval_every", "eval_windows",
                "checkpoint_every", "keep_checkpoints"):
        if train_cfg[key] <= 0:
            raise ConfigError(f"train.{key}", f"must be a positive integer, got {train_cfg[key]}")
    if train_cfg.batch_size % train_cfg.microbatches:
        raise ConfigError("train.microbatches", f"must divide train.batch_size={train_cfg.batch_size}, got "
                          f"{train_cfg.microbatches}")
    if train_cfg.batch_size % jax.process_count():
        raise ConfigError("train.batch_size", f"{train_cfg.batch_size} is not divisible by the process count "
                          f"{jax.process_count()}")
    if train_cfg.get("eval_batch_size", 0) < 0:  # .get: resolved configs written before the key existed
        raise ConfigError("train.eval_batch_size", f"must be >= 0 (0: train.batch_size), got "
                          f"{train_cfg.eval_batch_size}")
    if train_cfg.get("steps_per_call", 1) < 0:  # .get: resolved configs written before the key existed
        raise ConfigError("train.steps_per_call", f"must be a positive integer or 0 (auto: {AUTO_STEPS_PER_CALL} on "
                          f"CPU, 1 on GPU and TPU), got {train_cfg.steps_per_call}")
    if train_cfg.get("checkpoint_minutes", 0) < 0:  # .get: resolved configs written before the key existed
        raise ConfigError("train.checkpoint_minutes", f"must be >= 0 (0: off), got {train_cfg.checkpoint_minutes}")
    if any(not isinstance(s, int) or s <= 0 for s in train_cfg.get("checkpoint_steps", ())):
        raise ConfigError("train.checkpoint_steps", f"must be positive step numbers, got "
                          f"{tuple(train_cfg.checkpoint_steps)}")
    if train_cfg.z_loss < 0:
        raise ConfigError("train.z_loss", f"must be >= 0, got {train_cfg.z_loss}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")


def steps_per_call(train_cfg: ConfigDict, platform: str) -> int:
    """The steps of one compiled call on `platform` (cpu, gpu, tpu): train.steps_per_call, or for 0 (auto)
    AUTO_STEPS_PER_CALL on CPU, where each call pays its dispatch and the first touch of its temporaries' pages,
    and 1 on GPU and TPU, where calls are dispatched ahead of the device and profiles show one step a call."""
    k = train_cfg.get("steps_per_call", 1)  # .get: resolved configs written before the key existed
    return k if k > 0 else AUTO_STEPS_PER_CALL if platform == "cpu" else 1


def setup_run(cfg: ConfigDict, devices=None, platform: str | None = None) -> RunSetup:
    """Validate `cfg` and build its program on a mesh over `devices` (default: every device of every process);
    `platform` (default: the devices') resolves train.steps_per_call = 0 (a plan on CPU for a TPU passes tpu)."""
    validate(cfg)
    model_cfg = config_lib.model_config(cfg)
    train_cfg = cfg.train
    config_lib.check_seq_len(train_cfg.seq_len, model_cfg)
    steps = total_steps(train_cfg)
    layout = mesh_lib.layout(cfg.mesh, model_cfg, train_cfg.batch_size, devices=devices)
    microbatch = train_cfg.batch_size // train_cfg.microbatches
    if microbatch % layout.batch_shards:
        raise ConfigError("train.microbatches", f"each microbatch of {microbatch} sequences must divide over "
                          f"mesh.data x mesh.fsdp = {layout.batch_shards}")
    if train_cfg.get("eval_batch_size", 0) % layout.batch_shards:
        raise ConfigError("train.eval_batch_size", f"must divide over mesh.data x mesh.fsdp = {layout.batch_shards}"
                          f", got {train_cfg.eval_batch_size}")
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    multiplier = functools.partial(mup.lr_multiplier, model_cfg) if model_cfg.parameterization == "mup" else None
    tx = optim.optimizer(cfg.optim, steps, tokens_per_step, lr_multiplier=multiplier,
                         eps_multiplier=mup.adam_eps_multiplier(model_cfg))
    schedule = optim.schedule(cfg.optim, steps, tokens_per_step)
    prog = program.compile_program(Decoder(model_cfg), tx, schedule, layout, train_cfg.seed, train_cfg.seq_len,
                                   train_cfg.microbatches, train_cfg.z_loss,
                                   steps_per_call(train_cfg, platform or layout.mesh.devices.flat[0].platform))
    return RunSetup(model_cfg, steps, layout, tx, schedule, prog)
