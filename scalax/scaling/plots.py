"""The figures of a sweep: IsoFLOP curves with their parabolas and minima; N_opt and D_opt against C with the
fitted lines and bootstrap bands; loss against compute with the fitted frontier; the parametric law's
contours with the runs on top. PNG and SVG, and the PNGs into TensorBoard as images."""

from __future__ import annotations

import os
from io import BytesIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from scalax import io
from scalax.scaling import fit as fit_lib
from scalax.scaling.analysis import MIN_PARABOLA_POINTS
from scalax.scaling.results import Approach3, FitResult, Intervals

# Text stays text in the SVGs (searchable, editable); every fitted line carries an SVG id starting with "fit-".
matplotlib.rcParams["svg.fonttype"] = "none"


def _ok(result: FitResult, name: str) -> bool:
    """Draw an approach's fitted lines only when its checks passed (analysis.check); its points always."""
    approach = getattr(result, name)
    return approach is not None and approach.ok


def _frontier_law(result: FitResult) -> Approach3 | None:
    """Approach 3's law when it passed its checks and has a compute-optimal frontier."""
    p = result.approach3
    return p if _ok(result, "approach3") and p.has_frontier() else None


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save_figure(fig, directory: str, name: str) -> str:
    """DIRECTORY/NAME.png and .svg, written atomically; the PNG's path."""
    for ax in fig.axes:  # on log axes spanning less than a decade matplotlib labels minor ticks, and they collide
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    for ext in ("png", "svg"):
        buffer = BytesIO()
        fig.savefig(buffer, format=ext, dpi=120)
        io.atomic_write_bytes(io.join(directory, f"{name}.{ext}"), buffer.getvalue())
    plt.close(fig)
    return io.join(directory, f"{name}.png")


def plot_all(result: FitResult, runs: fit_lib.Runs, directory: str) -> list[str]:
    """Every figure of a fit; figures from an earlier fit that no longer apply are removed."""
    for stale in ("law_contours.png", "law_contours.svg"):
        io.remove(io.join(directory, stale))
    paths = [isoflop(result, runs, directory), optimal_vs_compute(result, runs, directory),
             loss_vs_compute(result, runs, directory)]
    if _frontier_law(result):
        paths.append(contours(result, runs, directory))
    _to_tensorboard(paths, io.join(directory, "tensorboard"))
    return paths


def isoflop(result: FitResult, runs: fit_lib.Runs, directory: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    groups = fit_lib.budgets(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    fitted = {round(np.log(b.flops), 6): b for b in (result.approach2.budgets if result.approach2 else [])}
    for g, color in zip(groups, colors, strict=True):
        c = runs.flops[g].mean()
        ax.scatter(runs.params[g], runs.loss[g], color=color, label=f"C = {c:.2g}", zorder=3)
        b = fitted.get(round(np.log(c), 6))
        if b and b.points >= MIN_PARABOLA_POINTS:
            x = np.linspace(np.log(runs.params[g]).min(), np.log(runs.params[g]).max(), 100)
            ax.plot(np.exp(x), np.polyval(b.coefficients, x), color=color, lw=1, gid=f"fit-parabola-{c:.3g}")
            ax.scatter([b.n_star], [b.loss_star], color=color, marker="*", s=160, edgecolor="k", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("IsoFLOP curves (approach 2): parabolas in log N, minima starred")
    _legend(ax)
    return save_figure(fig, directory, "isoflop")


def _band(ax, flops, ci: Intervals | None, key: str, color: str) -> None:
    """The frontier's band from the bootstrap interval of its exponent, pivoting at the runs' mean log C."""
    exponent = ci.get("a" if key == "n_star" else "b") if ci else None
    if exponent is None:
        return
    line = ax.get_lines()[-1]
    y = line.get_ydata()
    pivot = np.exp(np.log(flops).mean())
    lo = y * (flops / pivot) ** (exponent.low - np.log(y[-1] / y[0]) / np.log(flops[-1] / flops[0]))
    hi = y * (flops / pivot) ** (exponent.high - np.log(y[-1] / y[0]) / np.log(flops[-1] / flops[0]))
    ax.fill_between(flops, np.minimum(lo, hi), np.maximum(lo, hi), color=color, alpha=0.2,
                    label=f"{ci.level:.0%} bootstrap band of the exponent")


def optimal_vs_compute(result: FitResult, runs: fit_lib.Runs, directory: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    c = np.geomspace(runs.flops.min() / 2, runs.flops.max() * 4, 50)
    for ax, key, label in ((axes[0], "n_star", "N_opt"), (axes[1], "d_star", "D_opt")):
        a2 = result.approach2
        if a2 and a2.budgets:
            pts = np.asarray([[b.flops, getattr(b, key)] for b in a2.budgets])
            ax.scatter(pts[:, 0], pts[:, 1], color="C0", label="approach 2 minima", zorder=3)
            law = a2.a if key == "n_star" else a2.b
            if law and _ok(result, "approach2"):
                ax.plot(c, law.coefficient * c**law.exponent, color="C0", gid=f"fit-approach2-{key}",
                        label=f"approach 2: {label} ∝ C^{law.exponent:.3f}")
        if p := _frontier_law(result):
            n_opt, d_opt = p.frontier(c)
            y = n_opt if key == "n_star" else d_opt
            exponent = p.a if key == "n_star" else p.b
            ax.plot(c, y, color="C3", ls="--", gid=f"fit-approach3-{key}",
                    label=f"approach 3: {label} ∝ C^{exponent:.3f}")
            _band(ax, c, p.ci, key, "C3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(label)
        _legend(ax)
    fig.suptitle("Compute-optimal allocation")
    return save_figure(fig, directory, "optimal_vs_compute")


def loss_vs_compute(result: FitResult, runs: fit_lib.Runs, directory: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    sc = ax.scatter(runs.flops, runs.loss, c=np.log10(runs.params), cmap="viridis", zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 N")
    if p := _frontier_law(result):
        c = np.geomspace(runs.flops.min() / 2, runs.flops.max() * 4, 100)
        n_opt, d_opt = p.frontier(c)
        ax.plot(c, p.loss(n_opt, d_opt), color="C3", label="fitted compute-optimal frontier",
                gid="fit-approach3-frontier")
        ax.axhline(p.E, color="gray", ls=":", label=f"E = {p.E:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Loss against compute")
    _legend(ax)
    return save_figure(fig, directory, "loss_vs_compute")


def contours(result: FitResult, runs: fit_lib.Runs, directory: str) -> str:
    p = result.approach3
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    n = np.geomspace(runs.params.min() / 3, runs.params.max() * 3, 200)
    d = np.geomspace(runs.tokens.min() / 3, runs.tokens.max() * 3, 200)
    nn, dd = np.meshgrid(n, d)
    # Levels over the losses the runs span (the law climbs steeply towards small N and D, where contours of its
    # whole range would crowd together with their labels piled on each other); every other one labelled.
    levels = np.linspace(runs.loss.min() * 0.98, runs.loss.max() * 1.02, 10)
    cs = ax.contour(nn, dd, p.loss(nn, dd), levels=levels, cmap="magma")
    ax.clabel(cs, cs.levels[::2], fontsize=7, fmt="%.3g", inline_spacing=8)
    ax.scatter(runs.params, runs.tokens, c="C0", s=18, zorder=3, label="runs")
    c = np.geomspace(runs.flops.min(), runs.flops.max(), 50)
    ax.plot(*p.frontier(c), color="C3", label="compute-optimal frontier", gid="fit-approach3-contour-frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title(f"L(N, D) = {p.E:.2f} + {p.A:.3g}/N^{p.alpha:.3f} + {p.B:.3g}/D^{p.beta:.3f}")
    _legend(ax)
    return save_figure(fig, directory, "law_contours")


def _to_tensorboard(paths: list[str], logdir: str) -> None:
    """PNG images as TensorBoard image summaries (written with tensorboard's own protos: no TensorFlow)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2  # tensorboard: only where a figure is written
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    mirrored = io.MirroredDir(logdir)
    writer = EventFileWriter(mirrored.local)
    for path in paths:
        png = io.read_bytes(path)
        height, width = plt.imread(BytesIO(png), format="png").shape[:2]
        image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=os.path.splitext(os.path.basename(path))[0], image=image)])
        writer.add_event(event_pb2.Event(step=0, summary=summary))
    writer.close()
    mirrored.sync()
