"""Compare the positional-scheme sweeps: a table of each scheme's fits and one figure.

    python experiments/positional/compare.py DIR_WITH_ONE_SWEEP_PER_SCHEME [--out experiments/positional]

Each sub-directory NAME of DIR is a finished `scalax sweep` of `configs/sweeps/positional.py:position=NAME`
(its runs.jsonl and fit.json). Writes OUT/table.md and OUT/positional.png|svg.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")


def load(directory: str) -> tuple[list[dict], dict]:
    with open(os.path.join(directory, "runs.jsonl")) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(directory, "fit.json")) as f:
        return runs, json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    schemes = [s for s in ORDER if os.path.isfile(os.path.join(args.root, s, "fit.json"))]
    rows = ["| scheme | best loss per budget (nats/token) | N* per budget (approach 2; edge: dropped) | "
            "a (approach 2) | E | alpha | beta | a (approach 3) | prediction error at 1.6e12 | flagged fits |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    fig, (ax_loss, ax_n) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, scheme in enumerate(schemes):
        runs, fit = load(os.path.join(args.root, scheme))
        budgets = sorted({r["budget"] for r in runs if r["status"] == "finished"})
        best = [min(r["eval_loss"] for r in runs if r["budget"] == b and r["status"] == "finished") for b in budgets]
        a2, a3 = fit.get("approach2", {}), fit.get("approach3", {})
        kept = {g["flops"]: g["n_star"] for g in a2.get("budgets", [])}
        n_star = [f"{kept[b] / 1e3:.1f}k" if b in kept else "edge" for b in budgets]
        exponent = f"{a2['a']['exponent']:.2f}" if "a" in a2 else "(one budget)"
        pred = fit.get("prediction") or {}
        error = f"{100 * pred['relative_error']:+.1f}%" if "relative_error" in pred else pred.get("reason", "")
        flagged = ", ".join(name.replace("approach", "") for name in ("approach1", "approach2", "approach3", "kaplan")
                            if not fit.get(name, {}).get("ok", True)) or "none"
        rows.append(f"| {scheme} | {', '.join(f'{x:.3f}' for x in best)} | {', '.join(n_star)} | {exponent} | "
                    f"{a3['E']:.2f} | {a3['alpha']:.2f} | {a3['beta']:.2f} | {a3['a']:.2f} | {error} | {flagged} |")
        style = dict(color=f"C{i}", marker="o", label=scheme)
        ax_loss.plot(budgets, best, **style)
        if kept:
            ax_n.plot(list(kept), list(kept.values()), **style)
    for ax, ylabel in ((ax_loss, "best eval loss at the budget (nats/token)"), (ax_n, "N* (approach 2)")):
        ax.set_xscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_n.set_yscale("log")
    fig.suptitle("The quickstart grid under each positional scheme")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(args.out, f"positional.{ext}"), dpi=120)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
