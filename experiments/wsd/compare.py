"""The quickstart's IsoFLOP grid under cosine (experiments/quickstart) and as WSD cooldowns branched from one
trunk per shape (experiments/wsd/sweep, `scalax sweep --config=configs/sweeps/wsd.py`): the loss at each
point, N* per budget (approach 2's parabola) with 80% bootstrap intervals, approach 3's frontier, and the
compute each spent. Writes compare.json, compare.md and compare.png|svg beside this file.

    python experiments/wsd/compare.py [COSINE_DIR] [WSD_DIR]

The intervals resample as each sweep's own fit does: runs for cosine, whole trunks for WSD (its branches of
one trunk share their noise), 1000 resamples, seed 0; a resample whose parabola for a budget has no interior
minimum gives no N* for that budget.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from scalax import io
from scalax.scaling import analysis
from scalax.scaling import fit as fit_lib
from scalax.scaling import sweep as sweep_lib
from scalax.scaling.runner import Ledger

HERE = os.path.dirname(os.path.abspath(__file__))
RESAMPLES, LEVEL = 1000, 0.8


def load(directory: str) -> tuple[dict, list[dict], fit_lib.Runs]:
    sweep = io.read_json(os.path.join(directory, "sweep.json"))["sweep"]
    records = list(Ledger(directory).records.values())
    return sweep, records, analysis.runs_of_ledger(records, sweep)


def n_star_by_budget(runs: fit_lib.Runs) -> dict[str, float]:
    """Approach 2's N* by budget, the budget as '%.3g' (a budget's C is the mean of its runs' nominal C)."""
    return {f"{p.flops:.3g}": p.n_star for p in fit_lib.fit_approach2(runs).budgets}


def intervals(runs: fit_lib.Runs) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    draws: dict[str, list[float]] = {}
    for _ in range(RESAMPLES):
        for c, n in n_star_by_budget(runs.take(runs.resample(rng))).items():
            draws.setdefault(c, []).append(n)
    q = [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100]
    return {c: [float(x) for x in np.percentile(v, q)] + [len(v)] for c, v in draws.items()}


def summarise(name: str, directory: str) -> dict:
    sweep, records, runs = load(directory)
    fitted = io.read_json(os.path.join(directory, "fit.json"))
    law = fitted["approach3"]
    flops_key = analysis.conventions(sweep).flops
    costs = sweep_lib.branch_costs(records, flops_key)
    spent = sum(c["spent"] for c in costs) if costs else sum(r[flops_key] for r in records if fit_lib.is_point(r))
    points = {r["name"]: {"loss": r["eval_loss"], "params": r[analysis.conventions(sweep).params],
                          "tokens": r["tokens"], "budget": r["budget"]} for r in records if fit_lib.is_point(r)}
    frontier = {c: _frontier(law, c) for c in sorted({p["budget"] for p in points.values()})}
    ci = intervals(runs)
    return {"name": name, "directory": os.path.relpath(directory),
            "n_star": n_star_by_budget(runs), "n_star_interval": ci,
            "approach3": {k: law[k] for k in ("E", "A", "B", "alpha", "beta", "a")},
            "approach3_n_opt": {f"{c:.3g}": n for c, n in frontier.items()},
            "flops_spent": spent, "flops_key": flops_key, "points": points}


def _frontier(law: dict, c: float) -> float:
    """N_opt(C) of L = E + A/N^alpha + B/D^beta under C = 6 N D (Hoffmann et al.'s closed form)."""
    g = (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / (law["alpha"] + law["beta"]))
    return g * (c / 6) ** law["a"]


def figure(cos: dict, wsd: dict, path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({p["budget"] for p in cos["points"].values()})
    colours = plt.cm.viridis(np.linspace(0.1, 0.8, len(budgets)))
    for c, colour in zip(budgets, colours, strict=True):
        for result, style, label in ((cos, "-o", "cosine"), (wsd, "--s", "WSD branch")):
            pts = sorted((p["params"], p["loss"]) for p in result["points"].values() if p["budget"] == c)
            left.plot(*zip(*pts, strict=True), style, color=colour, ms=4, label=f"{label}, C={c:.1e}")
    left.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="eval loss (nats/token)",
             title="IsoFLOP curves: cosine (solid) and WSD branches (dashed)")
    left.legend(fontsize=7)
    for c, colour in zip(budgets, colours, strict=True):
        names = [n for n, p in cos["points"].items() if p["budget"] == c and n in wsd["points"]]
        right.plot([cos["points"][n]["params"] for n in names],
                   [wsd["points"][n]["loss"] - cos["points"][n]["loss"] for n in names], "o", color=colour,
                   label=f"C={c:.1e}")
    right.axhline(0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="WSD loss - cosine loss (nats/token)",
              title="the same (N, D): WSD branch minus cosine")
    right.legend(fontsize=7)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(f"{path}.{ext}", dpi=120)
    plt.close(fig)


def table(cos: dict, wsd: dict) -> str:
    lines = ["| budget C | N* cosine (80% interval) | N* WSD branches (80% interval) | approach 3 N_opt cosine | "
             "approach 3 N_opt WSD |", "|---|---|---|---|---|"]
    for c in sorted(cos["n_star_interval"], key=float):
        cells = []
        for r in (cos, wsd):
            n, ci = r["n_star"].get(c), r["n_star_interval"].get(c)
            if n is None:
                cells.append("no interior minimum")
            else:
                cells.append(f"{n / 1e3:.1f}k" + (f" [{ci[0] / 1e3:.1f}k, {ci[1] / 1e3:.1f}k]" if ci else ""))
        cells += [f"{r['approach3_n_opt'][c] / 1e3:.1f}k" for r in (cos, wsd)]
        lines.append(f"| {float(c):.1e} | " + " | ".join(cells) + " |")
    saved = 1 - wsd["flops_spent"] / cos["flops_spent"]
    lines += ["", f"Compute ({cos['flops_key']}): cosine {cos['flops_spent']:.3g} FLOPs, WSD branches "
              f"{wsd['flops_spent']:.3g} ({saved:.0%} less)."]
    diffs = [wsd["points"][n]["loss"] - p["loss"] for n, p in cos["points"].items() if n in wsd["points"]]
    lines += [f"Loss at the same point, WSD minus cosine: mean {np.mean(diffs):+.4f}, from {min(diffs):+.4f} to "
              f"{max(diffs):+.4f} nats/token over {len(diffs)} points."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(HERE))
    cosine_dir = argv[0] if argv else os.path.join(root, "experiments", "quickstart")
    wsd_dir = argv[1] if len(argv) > 1 else os.path.join(HERE, "sweep")
    cos, wsd = summarise("cosine", cosine_dir), summarise("wsd_branch", wsd_dir)
    with open(os.path.join(HERE, "compare.json"), "w") as f:
        json.dump({"cosine": cos, "wsd_branch": wsd}, f, indent=1)
    with open(os.path.join(HERE, "compare.md"), "w") as f:
        f.write(table(cos, wsd))
    figure(cos, wsd, os.path.join(HERE, "compare"))
    print(table(cos, wsd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
