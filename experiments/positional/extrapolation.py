"""Length extrapolation per positional scheme at the quickstart scale: one run of the positional sweep's grid
(default C1.60e+12-d64-l2: 2 layers, d_model 64, trained at 128 tokens) per scheme, then `scalax eval` at 1, 2,
4 and 8 times the training length. Writes OUT/extrapolation.md (the table) and OUT/extrapolation.png|svg.

    python experiments/positional/extrapolation.py --workdir runs/extrapolation --out experiments/positional
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from scalax import config as config_lib
from scalax.evaluate.plots import binned
from scalax.models import positions
from scalax.scaling import sweep as sweep_lib

MULTIPLES = (1, 2, 4, 8)


def scalax(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "scalax", *argv], check=True)


def train_and_eval(scheme: str, run_name: str, workdir: str) -> dict:
    """Train the named run of configs/sweeps/positional.py:position=SCHEME (unless done) and evaluate it."""
    cfg = config_lib.load(f"configs/sweeps/positional.py:position={scheme}")
    run = next(r for r in sweep_lib.plan(cfg) if r.name == run_name)
    run_dir = os.path.join(workdir, scheme)
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "run_config.json")
    with open(config_path, "w") as f:
        json.dump(sweep_lib.run_config(cfg, run).to_dict(), f)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        scalax("train", f"--config={config_path}", f"--workdir={run_dir}")
    seq_len = cfg.base.train.seq_len
    model = config_lib.model_config(config_lib.load(config_path))
    limit = positions.scheme_of(model).length_limit(model)
    lengths = [k * seq_len for k in MULTIPLES if limit is None or k * seq_len <= limit]
    scalax("eval", f"--checkpoint={run_dir}", f"--lengths={','.join(map(str, lengths))}")
    with open(os.path.join(run_dir, "eval", "lengths.json")) as f:
        return json.load(f)


def late_positions(at: dict, lo: float, hi: float) -> float:
    """Mean loss over window positions (lo, hi] (1-based) of one length's per-position curve."""
    per_position = np.asarray(at["per_position"])
    return float(per_position[int(lo) : int(hi)].mean())


def table(results: dict[str, dict], seq_len: int) -> list[str]:
    rows = ["| scheme | " + " | ".join(f"loss at {k}x ({k * seq_len})" for k in MULTIPLES)
            + " | 8x / 1x | late positions at 8x / 1x | sliding windows at 8x |",
            "|---|" + "---|" * (len(MULTIPLES) + 3)]
    for scheme, written in results.items():
        at = {r["length"] // seq_len: r for r in written["lengths"]}
        losses = [f"{at[k]['loss']:.3f}" if k in at else "refused" for k in MULTIPLES]
        if 8 in at:
            ratio = f"{at[8]['loss'] / at[1]['loss']:.3f}"
            # positions 4L..8L of the 8x windows against positions L/2..L of the 1x windows: the same late
            # context depth relative to the window, past the training length against within it
            late_8x = late_positions(at[8], 4 * seq_len, 8 * seq_len)
            late = f"{late_8x / late_positions(at[1], seq_len / 2, seq_len):.3f}"
            strided = f"{at[8]['strided']['loss']:.3f}"
        else:
            ratio = late = strided = "n/a"
        rows.append(f"| {scheme} | {' | '.join(losses)} | {ratio} | {late} | {strided} |")
    return rows


def figure(results: dict[str, dict], seq_len: int, out: str) -> None:
    fig, (ax_len, ax_pos) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (scheme, written) in enumerate(results.items()):
        rows = written["lengths"]
        ax_len.plot([r["length"] for r in rows], [r["loss"] for r in rows], marker="o", color=f"C{i}", label=scheme)
        longest = rows[-1]
        ax_pos.plot(*binned(np.arange(1, longest["length"] + 1), np.asarray(longest["per_position"])),
                    color=f"C{i}", label=f"{scheme} (length {longest['length']})")
    for ax, xlabel in ((ax_len, "evaluation length (tokens)"), (ax_pos, "position in the window")):
        ax.axvline(seq_len, color="gray", ls=":", label=f"training length {seq_len}" if ax is ax_len else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.legend(fontsize=7)
    ax_len.set_title("loss against evaluation length")
    ax_pos.set_title("loss by position, longest length (binned)")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out, f"extrapolation.{ext}"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/extrapolation")
    parser.add_argument("--out", default="experiments/positional")
    parser.add_argument("--run", default="C1.60e+12-d64-l2", help="which run of the grid")
    parser.add_argument("--schemes", default=",".join(positions.SCHEMES))
    args = parser.parse_args()
    results = {s: train_and_eval(s, args.run, args.workdir) for s in args.schemes.split(",")}
    seq_len = next(iter(results.values()))["train_seq_len"]
    lines = table(results, seq_len)
    with open(os.path.join(args.out, "extrapolation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(results, seq_len, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
