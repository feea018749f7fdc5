"""What a checkpoint may be resumed with: the same model, tokenizer and corpus; the same data order; and a
schedule that agrees with the checkpoint's over the steps already trained (or `--allow-changes`).

A resume is refused, naming the key, when the run it continues would not be the run the new config describes:
- another model (every `model.*` but `remat`, which changes how, not what, is computed), tokenizer or corpus;
- another `train.batch_size`, `train.seq_len` or `train.seed`: the data order depends on them (always refused);
- another optimizer (`optim.*` other than the schedule's keys), or a learning-rate schedule that differs from the
  checkpoint's at any step already trained (a new `train.steps` under a cosine schedule, a new `optim.lr`):
  refused unless `allow_changes`, when the new values apply from the restored step on, and the log says so.
A longer or shorter run whose schedule agrees over the steps done (a constant schedule past its warmup) is the
same run continued: it resumes with a line that says so.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from scalax.errors import ConfigError
from scalax.train import optim
from scalax.train.setup import total_steps

RESUMABLE_MODEL_KEYS = ("remat",)
DATA_ORDER_KEYS = ("batch_size", "seq_len", "seed")
SCHEDULE_KEYS = ("lr", "schedule", "warmup_steps", "warmup_tokens", "final_lr_fraction", "wsd_decay_fraction",
                 "wsd_decay_shape")


def _changed(saved: dict, current: dict, section: str, keys) -> list[str]:
    return [f"{section}.{k} ({saved[section].get(k)!r} in the checkpoint, {current[section].get(k)!r} now)"
            for k in keys if saved[section].get(k) != current[section].get(k)]


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Refuse to resume a checkpoint of another model or tokenizer, naming the keys that differ."""
    keys = sorted(k for k in set(saved["model"]) | set(current["model"]) if k not in RESUMABLE_MODEL_KEYS)
    differing = _changed(saved, current, "model", keys)
    differing += _changed(saved, current, "data", ("tokenizer", "tokenizer_hash", "corpus"))
    if differing:
        raise ConfigError(differing[0].split(" ")[0], f"{workdir} holds a checkpoint of a different config: "
                          f"{'; '.join(differing)}. Use another --workdir, or the checkpoint's config.")


def check_same_run(saved: dict, current: dict, workdir: str, step: int, allow_changes: bool, log) -> None:
    """Refuse a resume at `step` that would train another run than the checkpoint's (see the module doc)."""
    for key in DATA_ORDER_KEYS:
        if saved["train"].get(key) != current["train"].get(key):
            raise ConfigError(f"train.{key}", f"{workdir} holds a checkpoint trained with train.{key}="
                              f"{saved['train'].get(key)!r}, not {current['train'].get(key)!r}; the data order "
                              "depends on it. Use another --workdir, or the checkpoint's value")
    old_steps, new_steps = total_steps(ConfigDict(saved["train"])), total_steps(ConfigDict(current["train"]))
    length = _changed(saved, current, "train", ("steps", "tokens")) if old_steps != new_steps else []
    other_optim = sorted(k for k in set(saved["optim"]) | set(current["optim"]) if k not in SCHEDULE_KEYS)
    changed = _changed(saved, current, "optim", other_optim)
    tokens_per_step = current["train"]["batch_size"] * current["train"]["seq_len"]  # the same: DATA_ORDER_KEYS
    old_lr, new_lr = (np.asarray(optim.schedule(ConfigDict(cfg["optim"]), n, tokens_per_step)(np.arange(step + 1)))
                      for cfg, n in ((saved, old_steps), (current, new_steps)))
    if not np.allclose(old_lr[:step], new_lr[:step], rtol=1e-6, atol=0):
        changed = length + _changed(saved, current, "optim", SCHEDULE_KEYS) + changed
    if not changed:
        if length:
            log(f"{'; '.join(length)}: the schedule agrees with the checkpoint's over the {step} steps done; "
                f"going on to step {new_steps}")
        return
    if not allow_changes:
        raise ConfigError(changed[0].split(" ")[0], f"{workdir} holds a checkpoint of another run: "
                          f"{'; '.join(changed)}; its learning-rate schedule or optimizer would change mid-run. Use "
                          "another --workdir, the checkpoint's values, or --allow-changes to go on with the new ones")
    log(f"--allow-changes: {'; '.join(changed)}. After step {step} the run follows the new values: its "
        f"{current['optim']['schedule']} schedule is that of a {new_steps}-step run (the checkpoint's: {old_steps} "
        f"steps); lr of step {step + 1}: {float(new_lr[step]):.4g} (it would have been {float(old_lr[step]):.4g})")
