"""The quickstart's IsoFLOP grid trained as WSD cooldowns branched from one constant-LR trunk per model shape
(Hägele et al. 2024: a 20% cooldown of 1-sqrt shape matches cosine), to compare with the cosine quickstart:

    scalax sweep --config=configs/sweeps/wsd.py --workdir=runs/wsd

The points (names, N, D, budgets) are the quickstart's; a shape's branches share its trunk's batch, learning rate
(the ladder's for its largest budget) and warmup (5% of its longest branch). `sweep.branch_grid` picks another
grid (tokens_per_param with ratios (r, 2r, 4r, 8r) trains four token counts of each size for 9.4 r N tokens).
"""

import os

from scalax.config import load, parse_arg
from scalax.errors import ConfigError


def get_config(arg: str | None = None):
    items = parse_arg(arg)
    if items:
        raise ConfigError("--config", f"unknown config argument {next(iter(items))!r}; this config takes none")
    cfg = load(os.path.join(os.path.dirname(__file__), "quickstart.py"))
    cfg.sweep.kind = "wsd_branch"
    cfg.sweep.branch_grid = "isoflop"
    cfg.base.optim.update(wsd_decay_shape="1-sqrt", wsd_decay_fraction=0.2)
    return cfg
