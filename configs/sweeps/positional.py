"""The quickstart's IsoFLOP grid for one positional scheme, to see how the scheme moves the law. One sweep
per scheme, each with its own workdir and fit:

    for p in learned sinusoidal rope alibi t5 none; do
      scalax sweep --config=configs/sweeps/positional.py:position=$p --workdir=runs/positional/$p
    done
"""

import os

from scalax.config import load, parse_arg
from scalax.errors import ConfigError
from scalax.models.config import POSITIONS


def get_config(arg: str | None = None):
    items = parse_arg(arg)
    position = items.pop("position", "rope")
    if items:
        raise ConfigError("--config", f"unknown config argument {next(iter(items))!r}; allowed: position")
    if position not in POSITIONS:
        raise ConfigError("position", f"unknown value {position!r}; allowed: {', '.join(POSITIONS)}")
    cfg = load(os.path.join(os.path.dirname(__file__), "quickstart.py"))
    cfg.base.model.position = position
    cfg.sweep.eval_lengths = (1, 2, 4, 8)  # each run's loss past its training length (ledger: eval_loss_2x, ...)
    return cfg
