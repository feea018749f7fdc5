"""The quickstart: an IsoFLOP sweep of small LLaMA models on the default corpus (the stdlib), sized to
finish within 20 minutes on a 2-core CPU, then the fits and plots.

    scalax sweep --config=configs/sweeps/quickstart.py --workdir=runs/quickstart
"""

from ml_collections import ConfigDict

from scalax.config import load


def get_config(arg: str | None = None):
    cfg = ConfigDict()
    cfg.base = load("configs/llama.py:size=tiny")
    cfg.base.train.update(seq_len=256, eval_every=1_000_000, eval_windows=64, log_every=25, checkpoint_every=200)
    cfg.sweep = ConfigDict({
        "kind": "isoflop",
        "family": "llama",
        "budget_min": 3e11,  # FLOPs under sweep.flops
        "budget_max": 1.5e12,
        "n_budgets": 3,
        "sizes_per_budget": 5,
        "span": 4.0,  # sizes from N_opt / span to N_opt * span
        "tokens_per_param": 10.0,  # the expected optimum's D / N, which centres the sizes
        "params": "non_embedding",  # N for the fits: non_embedding | total
        "flops": "6n",  # C for budgets and fits
        "seed": 0,
        "bootstrap": 200,  # resamples for the fits' confidence intervals
        # unused by isoflop sweeps, kept so that --config.sweep.kind can switch kinds:
        "sizes": 5, "n_min": 5e4, "n_max": 1e6, "tokens": 1e7, "ratios": (5.0, 10.0, 20.0),
    })
    return cfg
