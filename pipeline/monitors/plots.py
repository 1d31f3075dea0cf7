"""PNG figures for the run directory, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from pipeline.files import atomic_write


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def _positive(values: np.ndarray) -> np.ndarray:
    """Zeros and non-finite values as NaN, so log scales leave them blank."""
    values = np.asarray(values, dtype=float)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def depth_profile_png(
    path: Path, layers: Sequence[str], profiles: Sequence[tuple[int, np.ndarray]], label: str
) -> Path:
    """One line per epoch: ``label`` (log scale) against layer depth, layer names on the x axis.

    Args:
        path: the PNG to write (atomically).
        layers: layer names, shallow to deep.
        profiles: ``(epoch, values)`` pairs, ``values`` shaped (len(layers),).
        label: the y-axis label.
    """
    fig = figure(max(6.0, 0.22 * len(layers)), 4.5)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for i, (epoch, values) in enumerate(profiles):
        ax.plot(
            _positive(values), marker=".", color=cmap(i / max(1, len(profiles) - 1)), label=f"epoch {epoch}"
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_xlabel("layer (input -> output)")
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)
    if len(profiles) <= 12:
        ax.legend(fontsize=7)
    return save_png(fig, path)


def heatmap_png(
    path: Path, layers: Sequence[str], steps: Sequence[int], values: np.ndarray, label: str
) -> Path:
    """Layer x step heatmap of ``values`` (len(layers), len(steps)), log colour scale."""
    values = _positive(values)
    fig = figure(8.0, max(3.0, 0.16 * len(layers) + 1.5))
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    norm = LogNorm(finite.min(), finite.max()) if finite.size and finite.min() < finite.max() else None
    half = float(np.median(np.diff(steps))) / 2 if len(steps) > 1 else 0.5  # logs are evenly spaced
    extent = (steps[0] - half, steps[-1] + half, len(layers) - 0.5, -0.5) if len(steps) else None
    image = ax.imshow(values, aspect="auto", interpolation="nearest", norm=norm, cmap="magma", extent=extent)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("training step")
    fig.colorbar(image, ax=ax, label=label)
    return save_png(fig, path)


def confusion_png(path: Path, confusion: np.ndarray, class_names: Sequence[str]) -> Path:
    """Confusion matrix (rows: ground truth, columns: prediction), coloured by row fraction, counts written."""
    confusion = np.asarray(confusion, dtype=np.int64)
    fractions = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig = figure(1.2 * n + 2.5, 1.1 * n + 1.5)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, vmin=0, vmax=1, cmap="Blues")
    for i in range(n):
        for j in range(n):
            colour = "white" if fractions[i, j] > 0.5 else "black"
            text = f"{fractions[i, j]:.3f}\n({confusion[i, j]:,})"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(image, ax=ax, label="fraction of the ground-truth pixels")
    return save_png(fig, path)
