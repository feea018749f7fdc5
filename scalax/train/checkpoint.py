"""Checkpoints: an orbax CheckpointManager (async) under `workdir/checkpoints`, one step per directory.

Which steps stay: the newest `keep` step saves (steps that are multiples of `train.checkpoint_every`), the
newest save of any kind, and every step of `train.checkpoint_steps` (a wsd_branch trunk's branch points); a
save at another step (a wall-clock save, a preemption save, the last step of a run that does not end on a
multiple) is replaced by the next save.

Each step holds `state` (the TrainState), `data` (the grain iterator's state) and `meta` (the resolved
config and the counters: tokens seen, FLOPs seen under each convention, wall seconds). orbax raises on a
corrupt or truncated step instead of falling back, so `restore_latest` tries the steps newest first and warns
about each one it must skip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from scalax import io
from scalax.errors import ScalaxError

ITEMS = ("state", "data", "meta")


class KeepStepSavesAndNewest(ocp.checkpoint_managers.PreservationPolicy):
    """orbax preservation: the newest `keep` saves at multiples of `every`, the newest save of any kind, and
    the `pinned` steps."""

    def __init__(self, keep: int, every: int, pinned=()):
        self.keep, self.every, self.pinned = keep, every, set(pinned)

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        steps = [c.step for c in checkpoints]
        kept = {s for s in steps if s % self.every == 0}
        kept = set(sorted(kept)[-self.keep:]) | {max(steps, default=None)} | self.pinned
        return [s in kept for s in steps]


def _one_replica_writes_on_one_host() -> None:
    """On CPU devices of one process, each array is written from one replica, as orbax already does on GPUs.
    Replica-parallel saving (orbax's default elsewhere) cuts a replicated array into a slice per replica, each by
    a dispatched op, for device-to-host copies that are memcpys here: on 8 CPU devices it took 0.55 of a 0.6 s
    save of the tiny GPT (0.05 s without). TPUs and several processes keep orbax's default."""
    if jax.default_backend() == "cpu" and jax.process_count() == 1:
        with _silenced("absl"):  # orbax warns of every override
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True, every: int = 1, pinned=()):
        """`keep` step saves at multiples of `every` (every=1: the newest `keep` saves, whatever their step), and
        the saves at the `pinned` steps."""
        self.directory = io.join(io.abspath(workdir), "checkpoints")  # orbax writes gs:// itself (tensorstore)
        _one_replica_writes_on_one_host()
        options = ocp.CheckpointManagerOptions(preservation_policy=KeepStepSavesAndNewest(keep, every, pinned),
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_latest(self, abstract_state, warn=None) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable step, or None when there is none."""
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        for step in reversed(self.steps()):
            try:
                with quiet_orbax():
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                return step, restored.state, restored.data, restored.meta
            except Exception as e:  # orbax raises many types for a damaged step; any of them means "skip it"
                reason = _first_line(e)
                aside = self._set_aside(step)
                warn(f"warning: checkpoint step {step} is unreadable ({reason}); moved it to {aside} and "
                     "trying the one before")
        return None

    def _set_aside(self, step: int) -> str:
        """Move a damaged step out of the manager's way (kept, not deleted) so the step can be saved again."""
        source = io.join(self.directory, str(step))
        target = io.join(self.directory + "_unreadable", f"{step}-{time.time_ns()}")
        io.move(source, target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------- parameters alone (convert, generate)
PARAMS_DIR = "params"


def save_params(directory: str, config: dict, params, overwrite: bool = False) -> None:
    """A converted checkpoint: `directory/config.json` (a scalax config) and `directory/params` (orbax)."""
    directory = io.abspath(directory)
    target = io.join(directory, PARAMS_DIR)
    if io.exists(target) and not overwrite:
        raise CheckpointError(f"{directory} already holds a checkpoint ({PARAMS_DIR}/); choose another --to")
    io.makedirs(directory)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params, force=overwrite)
    io.atomic_write_json(io.join(directory, "config.json"), config)


def load_params(directory: str, warn=None) -> tuple[dict, Any, str]:
    """(config, parameters, where they came from) of a converted checkpoint or of a training workdir's latest
    readable step. A damaged step is reported through `warn`, one line, and the one before is read (nothing is
    moved: reading a workdir never changes it)."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    io.check_input(directory, "checkpoint")
    directory = io.abspath(directory)
    config_path = io.join(directory, "config.json")
    if not io.isfile(config_path):
        raise CheckpointError(f"{directory}: no config.json; expected a training workdir (scalax train) or a "
                              "converted checkpoint (scalax convert)")
    try:
        config = json.loads(io.read_text(config_path))
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    if io.isdir(io.join(directory, PARAMS_DIR)):
        try:
            with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(io.join(directory, PARAMS_DIR))
        except Exception as e:
            raise CheckpointError(f"{directory}/{PARAMS_DIR} is unreadable ({_first_line(e)})") from e
        return config, params, f"{directory}/{PARAMS_DIR}"
    if io.isdir(io.join(directory, "checkpoints")):
        manager = Checkpointer(directory, keep=1_000_000, async_save=False)
        try:
            for step in reversed(manager.steps()):
                try:
                    with quiet_orbax():
                        restored = manager.manager.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore()))
                except Exception as e:  # a damaged step: try the one before, as training does
                    warn(f"warning: checkpoint step {step} in {manager.directory} is unreadable ({_first_line(e)}); "
                         "reading the one before")
                    continue
                return config, restored.state["params"], f"{directory} step {step}"
        finally:
            manager.manager.close()
    raise CheckpointError(f"{directory}: no readable checkpoint (neither {PARAMS_DIR}/ nor checkpoints/)")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _drop_closed_loop_noise(unraisable) -> None:
    """After a failed restore, tensorstore's pending reads call back into orbax's closed event loop, once per
    array, each printing a traceback ('Event loop is closed'); the failure itself is reported in one line."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax's and absl's logging of a failed restore, and the callbacks of its abandoned reads that
    arrive later: the caller reports the failure in one line."""
    sys.unraisablehook = _drop_closed_loop_noise  # stays: the callbacks arrive after the restore returns
    with _silenced("absl", "orbax", "asyncio", "jax"):
        yield


@contextlib.contextmanager
def _silenced(*names: str):
    """The named loggers log nothing below CRITICAL inside the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class CheckpointError(ScalaxError):
    """A checkpoint directory that cannot be read or written as asked."""
