"""The quickstart: an IsoFLOP sweep of small LLaMA models on the default corpus (the stdlib), then the fits and
plots: about 6 minutes on a 2-core CPU (experiments/quickstart/README.md).

    scalax sweep --config=configs/sweeps/quickstart.py --workdir=runs/quickstart
"""

from ml_collections import ConfigDict

from scalax.config import load


def get_config(arg: str | None = None):
    cfg = ConfigDict()
    cfg.base = load("configs/llama.py:size=tiny")
    # Byte-level models this small learn mostly local statistics: a context of 128 is enough and twice as cheap.
    cfg.base.model.max_seq_len = 128
    # float32 compute: on a CPU bfloat16 buys no speed (these steps ran within 5% either way) and its casts cost
    # compile time (a run's train step compiled 0.6-1.8 s sooner in float32: 2.8-4.5 s against 3.9-5.6 s).
    cfg.base.model.dtype = "float32"
    # A checkpoint every 2,000 steps (10-60 s of these runs): each save costs about 0.2 s here. Ten steps per
    # compiled call: these steps take 5-90 ms, and a call's dispatch about 1 ms. One evaluation batch for every
    # budget's batch size: runs of one model at several budgets share the compiled evaluation (about 1 s each).
    cfg.base.train.update(seq_len=128, eval_every=1_000_000, eval_windows=512, eval_batch_size=32, log_every=50,
                          checkpoint_every=2000, steps_per_call=10)
    cfg.sweep = ConfigDict({
        "kind": "isoflop",
        "family": "llama",
        "budget_min": 4e11,  # FLOPs under sweep.flops
        "budget_max": 1.6e12,
        "n_budgets": 3,
        "sizes_per_budget": 5,
        "span": 4.0,  # sizes from N_opt / span to N_opt * span
        # The expected optimum's D / N, which centres the sizes. Models this small on bytes want far more than
        # Chinchilla's 20: a trial at 1.6e12 FLOPs found the best of 13k, 53k and 107k parameters at 53k (D/N 95).
        "tokens_per_param": 100.0,
        # A finer grid than the default 64 (heads of 64): models from 3k parameters up, which CPU budgets need.
        "d_model_step": 16,
        "head_dim": 16,
        "params": "non_embedding",  # N for the fits: non_embedding | total
        "flops": "6n",  # C for budgets and fits
        "seed": 0,
        # Runs trained at once, each pinned to its share of the CPUs (--parallel overrides): one per core here.
        "parallel": 2,
        "bootstrap": 200,  # resamples for the fits' confidence intervals
        # Skip runs whose train step would not fit a device (v4, v5e, v5p, v6e, h100, h200 or a size such as
        # 16GiB; "" checks nothing), planned for a slice of fit_devices devices (scalax plan):
        "fit_device": "",
        "batch_multiple": 1,  # round batches to a multiple of this: data x fsdp on a multi-device host
        "fit_devices": 1,
        # Each finished run's loss at these multiples of its training length (scalax eval; () for none):
        "eval_lengths": (),
        # kind wsd_branch (scalax/scaling/sweep.py): the grid whose points are trained as cooldowns branched from
        # one constant-LR trunk per shape; isoflop | fixed_tokens | tokens_per_param
        "branch_grid": "isoflop",
        # unused by isoflop sweeps, kept so that --config.sweep.kind can switch kinds:
        "sizes": 5, "n_min": 5e4, "n_max": 1e6, "tokens": 1e7, "ratios": (5.0, 10.0, 20.0),
    })
    return cfg
