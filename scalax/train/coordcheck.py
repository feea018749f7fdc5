"""`scalax coordcheck`: the coordinate check of Yang et al. 2022 (Tensor Programs V): the mean |x| of every
activation after a few AdamW steps, at several widths. Under muP no activation grows with width; under sp the
logits grow about linearly (Adam moves each coordinate by O(lr), and a width-d dot product sums d of them).

Each width w is the config's model with d_model = w, its head_dim kept (heads, kv heads and d_ff scale with w),
and layers unrolled so each is seen; trained by the config's optimizer at a constant learning rate (no
warmup, no decay: the check is about one step size) on the same batches at every width: the first windows of the
training split. An activation is a module's output, named by its path ("layer_0/attn/q", "final_norm", "logits"),
measured on the first batch after `steps` updates and averaged over seeds. Its `slope` is the least-squares
slope of log mean|x| on log width: near 0 is width-independent.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from ml_collections import ConfigDict

from scalax import config as config_lib
from scalax.data import corpora, pipeline
from scalax.errors import ConfigError
from scalax.models import Decoder
from scalax.train import setup as setup_lib


def width_config(cfg: ConfigDict, width: int, seed: int, steps: int) -> ConfigDict:
    """`cfg` at d_model = width (head_dim kept, heads and d_ff scaled), unrolled, seeded, at a constant LR."""
    out = copy.deepcopy(cfg)
    base = cfg.model.d_model
    head_dim = cfg.model.head_dim or base // cfg.model.n_heads
    kv_ratio = cfg.model.n_heads // (cfg.model.n_kv_heads or cfg.model.n_heads)
    if width % (head_dim * kv_ratio):
        raise ConfigError("--widths", f"{width} is not a multiple of head_dim x (n_heads / n_kv_heads) = "
                          f"{head_dim * kv_ratio}")
    with out.unlocked():
        out.model.d_model, out.model.head_dim, out.model.scan_layers = width, head_dim, False
        out.model.n_heads, out.model.n_kv_heads = width // head_dim, width // head_dim // kv_ratio
        if cfg.model.d_ff:
            out.model.d_ff = max(1, round(cfg.model.d_ff * width / base))
        out.train.seed, out.train.steps = seed, steps + 1
        out.optim.schedule, out.optim.warmup_steps, out.optim.warmup_tokens = "constant", 0, 0
    return out


def activations(model: Decoder, params, tokens_BxT) -> dict[str, float]:
    """Mean |x| of every module's output (and the logits), by module path. A module whose output is its last
    submodule's (attn is attn/o, mlp is mlp/wo) is listed once, under the submodule's path."""
    logits, state = model.apply({"params": params}, tokens_BxT, capture_intermediates=True)
    outputs = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        names = [p.key for p in path if hasattr(p, "key")]
        if names[-1] != "__call__" or len(names) == 1 or not hasattr(x, "dtype"):
            continue  # the decoder's own output is the logits; a block's (x, None) leaves only x
        outputs["/".join(names[:-1])] = x
    same_as_a_child = {parent for parent, x in outputs.items() for child, y in outputs.items()
                       if child.startswith(parent + "/") and x.shape == y.shape and bool(jnp.array_equal(x, y))}
    out = {"logits": float(jnp.mean(jnp.abs(logits.astype(jnp.float32))))}
    out.update({name: float(jnp.mean(jnp.abs(x.astype(jnp.float32)))) for name, x in outputs.items()
                if name not in same_as_a_child})
    return out


def batches(cfg: ConfigDict, count: int, log) -> np.ndarray:
    """`count` batches [count, B, T + 1] of the training split's first windows, the same at every width."""
    data = corpora.load_splits(cfg.data, log)
    windows = pipeline.eval_windows(data.train, cfg.train.seq_len, count * cfg.train.batch_size)
    if len(windows) < count * cfg.train.batch_size:
        raise ConfigError("data.corpus", f"{len(windows)} windows of {cfg.train.seq_len + 1} tokens; the check "
                          f"needs {count * cfg.train.batch_size}")
    return windows.reshape(count, cfg.train.batch_size, -1)


def slope(widths: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of log value on log width."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def coordcheck(cfg: ConfigDict, widths: Sequence[int], seeds: int = 3, steps: int = 4, log=print) -> dict:
    """The check's JSON object: per activation, mean |x| per width (averaged over seeds) and its slope."""
    if len(widths) < 2 or min(widths) <= 0:
        raise ConfigError("--widths", f"needs at least two positive widths, got {list(widths)}")
    for key, value in (("--seeds", seeds), ("--steps", steps)):
        if value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value}")
    data = batches(cfg, steps, log)
    device = jax.devices()[:1]
    runs = [(w, s) for w in widths for s in range(seeds)]
    sums: dict[int, dict[str, float]] = {w: {} for w in widths}
    for width, seed in tqdm.tqdm(runs, desc="coordcheck", unit="run", disable=not sys.stderr.isatty()):
        run = setup_lib.setup_run(width_config(cfg, width, seed, steps), devices=device)
        state = run.program.init()
        for t in range(steps):
            state, _ = run.program.train_step(state, jnp.asarray(data[t]))
        for name, value in activations(Decoder(run.model), state.params, jnp.asarray(data[0][:, :-1])).items():
            sums[width][name] = sums[width].get(name, 0.0) + value / seeds
    per_width = [sums[w] for w in widths]
    names = sorted(per_width[0], key=lambda n: (n != "embed", n == "logits", n))
    model = config_lib.model_config(cfg)
    return {"parameterization": model.parameterization, "mup_base_width": model.mup_base_width,
            "widths": list(widths), "seeds": seeds, "steps": steps, "lr": cfg.optim.lr,
            "activations": {n: {"mean_abs": (sizes := [p[n] for p in per_width]), "slope": slope(widths, sizes)}
                            for n in names}}


def plot(result: dict) -> bytes:
    """mean |x| against width, log-log, a line per activation (the logits thick, red): a PNG."""
    import io as bytes_io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(result["activations"])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
    for name, color in zip(names, colors, strict=True):
        a = result["activations"][name]
        logits = name == "logits"
        ax.plot(result["widths"], a["mean_abs"], marker="o", ms=3, lw=2.5 if logits else 1,
                color="C3" if logits else color, label=f"{name} ({a['slope']:+.2f})", gid=f"coordcheck-{name}")
    ax.set(xscale="log", yscale="log", xlabel="width (d_model)", ylabel="mean |x|",
           title=f"coordinate check: {result['parameterization']}, {result['steps']} AdamW steps at lr "
                 f"{result['lr']:g}, {result['seeds']} seed(s)")
    ax.legend(fontsize=6, ncol=2, title="activation (slope)", title_fontsize=7, loc="best")
    fig.tight_layout()
    buffer = bytes_io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    return buffer.getvalue()
