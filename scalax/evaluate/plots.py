"""The figures of `scalax eval`: loss against evaluation length (the training length marked), and loss against
position within the window at each length. PNG and SVG."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from scalax.evaluate.lengths import AtLength
from scalax.scaling.plots import save_figure


def binned(position: np.ndarray, loss: np.ndarray, per_octave: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Means of the loss over positions in log-spaced bins (`per_octave` a doubling): the curve under the
    noise of a few windows."""
    edges = np.unique(np.round(np.geomspace(1, position[-1] + 1, int(np.log2(position[-1] + 1) * per_octave) + 2)))
    centres, means = [], []
    for lo, hi in itertools.pairwise(edges):
        inside = (position >= lo) & (position < hi)
        if inside.any():
            centres.append(float(np.exp(np.log(position[inside]).mean())))
            means.append(float(loss[inside].mean()))
    return np.asarray(centres), np.asarray(means)


def _finish(ax, train_length: int, xlabel: str, ylabel: str, title: str) -> None:
    """The training length marked, a log2 x axis, labels and legend."""
    ax.axvline(train_length, color="gray", ls=":", label=f"training length {train_length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_lengths(results: list[AtLength], train_length: int, title: str, directory: str) -> list[str]:
    """loss_vs_length.{png,svg} and loss_vs_position.{png,svg} in `directory`; their paths."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lengths = [r.length for r in results]
    ax.errorbar(lengths, [r.loss for r in results], yerr=[r.loss_se for r in results], marker="o", capsize=3,
                label="non-overlapping windows")
    strided = [(r.length, r.strided.loss) for r in results if r.strided]
    if strided:
        ax.plot(*zip(*strided, strict=True), marker="s", ls="--", label="sliding windows (new tokens only)")
    _finish(ax, train_length, "evaluation length (tokens)", "validation loss (nats/token)", title)
    paths = [save_figure(fig, directory, "loss_vs_length")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(results):
        position = np.arange(1, r.length + 1)
        ax.plot(position, r.per_position, lw=0.6, alpha=0.3, color=f"C{i}")
        ax.plot(*binned(position, np.asarray(r.per_position)), lw=1.8, marker=".", color=f"C{i}",
                label=f"length {r.length}")
    _finish(ax, train_length, "position in the window (tokens of context + 1)",
            "loss (nats/token), mean over windows (lines: binned)", title)
    paths.append(save_figure(fig, directory, "loss_vs_position"))
    return [p for png in paths for p in (png, png[: -len("png")] + "svg")]
