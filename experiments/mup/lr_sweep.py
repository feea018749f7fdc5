"""A learning-rate sweep at three widths under sp and under muP: the final eval loss against the peak learning
rate, a line per width (lr_sweep.png|svg, lr_sweep.md). Under sp the best learning rate moves with width; under
muP (base width 64) it should stay put.

    python experiments/mup/lr_sweep.py runs/mup        # resumable: a finished run is not trained again

Each run: `scalax train` of configs/gpt.py:size=tiny at d_model = w (heads of 32), 2 layers, float32, 120 steps
of 8 x 128 tokens, warmup 12, cosine; two runs at a time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

WIDTHS = (64, 128, 256)
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PARAMETERIZATIONS = ("sp", "mup")
BASE_WIDTH = 64
HERE = os.path.dirname(os.path.abspath(__file__))


def train(root: str, parameterization: str, width: int, lr: float) -> dict:
    workdir = os.path.join(root, f"{parameterization}-d{width}-lr{lr:g}")
    summary = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary):
        subprocess.run([sys.executable, "-m", "scalax", "train", "--config=configs/gpt.py:size=tiny",
                        f"--workdir={workdir}", f"--config.model.d_model={width}",
                        f"--config.model.n_heads={width // 32}",
                        "--config.model.n_layers=2", "--config.model.dtype=float32",
                        f"--config.model.parameterization={parameterization}",
                        f"--config.model.mup_base_width={BASE_WIDTH}", f"--config.optim.lr={lr}",
                        "--config.optim.warmup_steps=12", "--config.train.steps=120", "--config.train.batch_size=8",
                        "--config.train.seq_len=128", "--config.train.eval_every=120",
                        "--config.train.checkpoint_every=120", "--config.train.log_every=40"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(summary) as f:
        s = json.load(f)
    return {"parameterization": parameterization, "width": width, "lr": lr, "eval_loss": s.get("eval_loss"),
            "status": s.get("status")}


def main(root: str) -> None:
    jobs = [(p, w, lr) for p in PARAMETERIZATIONS for w in WIDTHS for lr in LRS]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda job: train(root, *job), jobs))
    with open(os.path.join(HERE, "lr_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    lines = ["| parameterization | width | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | best lr |",
             "|---|---|" + "---|" * (len(LRS) + 1)]
    for ax, p in zip(axes, PARAMETERIZATIONS, strict=True):
        for i, w in enumerate(WIDTHS):
            losses = [next(r["eval_loss"] for r in rows if (r["parameterization"], r["width"], r["lr"]) == (p, w, lr))
                      for lr in LRS]
            finite = [(loss if loss is not None and loss < 10 else float("nan")) for loss in losses]
            ax.plot(LRS, finite, marker="o", color=f"C{i}", label=f"d_model {w}")
            best = LRS[min(range(len(LRS)), key=lambda j: finite[j] if finite[j] == finite[j] else 1e9)]
            lines.append(f"| {p} | {w} | " + " | ".join("diverged" if x != x else f"{x:.4f}" for x in finite)
                         + f" | {best:g} |")
        title = p + (f" (base width {BASE_WIDTH})" if p == "mup" else "")
        ax.set(xscale="log", xlabel="peak learning rate", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval loss (nats/token) after 120 steps")
    axes[1].legend()
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(HERE, f"lr_sweep.{ext}"))
    with open(os.path.join(HERE, "lr_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mup")
