"""Checkpoints: an orbax CheckpointManager (async) under `workdir/checkpoints`, one step per directory.

Each step holds `state` (the TrainState), `data` (the grain iterator's state) and `meta` (the resolved
config and the counters: tokens seen, FLOPs seen under each convention, wall seconds). orbax raises on a
corrupt or truncated step instead of falling back, so `restore_latest` tries the steps newest first and warns
about each one it must skip.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import orbax.checkpoint as ocp

from scalax.errors import ScalaxError

ITEMS = ("state", "data", "meta")


class Checkpointer:
    def __init__(self, workdir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
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
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                return step, restored.state, restored.data, restored.meta
            except Exception as e:  # orbax raises many types for a damaged step; any of them means "skip it"
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                aside = self._set_aside(step)
                warn(f"warning: checkpoint step {step} is unreadable ({reason}); moved it to {aside} and "
                     "trying the one before")
        return None

    def _set_aside(self, step: int) -> str:
        """Move a damaged step out of the manager's way (kept, not deleted) so the step can be saved again."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable", f"{step}-{time.time_ns()}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------- parameters alone (convert, generate)
PARAMS_DIR = "params"


def save_params(directory: str, config: dict, params) -> None:
    """A converted checkpoint: `directory/config.json` (a scalax config) and `directory/params` (orbax)."""
    from scalax.io import atomic_write_json

    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise CheckpointError(f"{directory} already holds a checkpoint ({PARAMS_DIR}/); choose another --to")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params)
    atomic_write_json(os.path.join(directory, "config.json"), config)


def load_params(directory: str) -> tuple[dict, Any, str]:
    """(config, parameters, where they came from) of a converted checkpoint or of a training workdir's latest
    readable step."""
    import json

    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory}: no config.json; expected a training workdir (scalax train) or a "
                              "converted checkpoint (scalax convert)")
    with open(config_path) as f:
        config = json.load(f)
    if os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        with ocp.StandardCheckpointer() as checkpointer:
            return config, checkpointer.restore(os.path.join(directory, PARAMS_DIR)), f"{directory}/{PARAMS_DIR}"
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        manager = Checkpointer(directory, keep=1_000_000, async_save=False)
        try:
            for step in reversed(manager.steps()):
                try:
                    restored = manager.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                except Exception:  # a damaged step: try the one before, as training does
                    continue
                return config, restored.state["params"], f"{directory} step {step}"
        finally:
            manager.manager.close()
    raise CheckpointError(f"{directory}: no readable checkpoint (neither {PARAMS_DIR}/ nor checkpoints/)")


class CheckpointError(ScalaxError):
    """A checkpoint directory that cannot be read or written as asked."""
