"""The PNG figures of ``medseg compare`` (matplotlib's Agg canvas: no display, no pyplot state).

Every figure shows variants (runs grouped by name without the seed): the mean over their seeds
(geometric for log-scale quantities) and, where there are several seeds, the min-max range.
Variants without long skips are drawn dashed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from pipeline.experiments.runs import RunData
from pipeline.monitors.plots import figure, save_png  # the run directory's figures are drawn alike


def _groups(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    return groups


def _style(index: int, runs: Sequence[RunData]) -> dict:
    """A colour per variant (tab20's dark shades first, then the light ones); dashed without long skips."""
    skips = (runs[0].summary.get("variant") or {}).get("skips", True)
    shade = (2 * index) % 20 + (index // 10) % 2
    return {"color": colormaps["tab20"](shade), "linestyle": "-" if skips else "--"}


def _stats(stack: np.ndarray, geometric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (geometric: of the positive values) and min/max over axis 0 of (seeds, points)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: a layer never logged
        if geometric:
            stack = np.where(np.isfinite(stack) & (stack > 0), stack, np.nan)
            mean = np.exp(np.nanmean(np.log(stack), axis=0))
        else:
            mean = np.nanmean(stack, axis=0)
        return mean, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)


def best_dice_png(path: Path, groups: dict[str, list[RunData]], classes: Sequence[str]) -> Path:
    """Horizontal bars: best validation Dice (overall and per class) of each variant."""
    keys = ["val/dice", *(f"val/dice_{c}" for c in classes)]
    labels = ["mean", *classes]
    names = list(groups)
    fig = figure(8.0, 1.2 + 0.22 * len(names) * len(keys) ** 0.5)
    ax = fig.add_subplot()
    height = 0.8 / len(keys)
    for k, (key, label) in enumerate(zip(keys, labels, strict=True)):
        values = [[r.summary.get("best", {}).get(key, math.nan) for r in groups[n]] for n in names]
        mean = np.array([np.nanmean(v) if v else math.nan for v in values])
        low = mean - np.array([np.nanmin(v) for v in values])
        high = np.array([np.nanmax(v) for v in values]) - mean
        y = np.arange(len(names)) + (k - (len(keys) - 1) / 2) * height
        ax.barh(y, mean, height, xerr=[low, high], label=label, color=colormaps["tab10"](k))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("best validation Dice")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


def val_dice_png(path: Path, groups: dict[str, list[RunData]], classes: Sequence[str]) -> Path:
    """Validation Dice per epoch, one panel for the mean and one per class, a line per variant."""
    keys = ["val/dice", *(f"val/dice_{c}" for c in classes)]
    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = figure(11.0, 3.2 * rows + 0.2 * len(groups) / cols)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for i, (name, runs) in enumerate(groups.items()):
            epochs = sorted({e for r in runs for e, _ in r.curves.get(key, [])})
            if not epochs:
                continue
            stack = np.full((len(runs), len(epochs)), np.nan)
            for j, run in enumerate(runs):
                for epoch, value in run.curves.get(key, []):
                    stack[j, epochs.index(epoch)] = value
            mean, low, high = _stats(stack, geometric=False)
            style = _style(i, runs)
            ax.plot(epochs, mean, marker=".", label=name, **style)
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=style["color"], alpha=0.15)
        ax.set_title(key, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    return save_png(fig, path)


def profiles_png(path: Path, groups: dict[str, list[RunData]], attribute: str, ylabel: str) -> Path:
    """Small multiples, one panel per variant: a per-layer profile (``RunData.grad`` or ``.update``)
    at its two moments, against layer depth, on a shared log scale."""
    names = [n for n, runs in groups.items() if getattr(runs[0], attribute)]
    cols = min(5, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = figure(3.2 * cols, 2.4 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, name in zip(axes, names, strict=False):
        runs = groups[name]
        for moment, colour in zip(getattr(runs[0], attribute), ("tab:blue", "tab:red"), strict=False):
            stack = np.stack([getattr(r, attribute)[moment] for r in runs if moment in getattr(r, attribute)])
            mean, low, high = _stats(stack, geometric=True)
            x = np.arange(len(mean))
            ax.plot(x, mean, marker=".", markersize=3, color=colour, label=moment)
            if len(stack) > 1:
                ax.fill_between(x, low, high, color=colour, alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=7)
        ax.set_xlabel(f"layer (input → output, {len(runs[0].layers)})", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel, fontsize=7)
    return save_png(fig, path)


def dice_vs_gradient_png(path: Path, groups: dict[str, list[RunData]]) -> Path:
    """Best validation Dice against the first/last gradient ratio at the first log (log x axis)."""
    fig = figure(8.0, 5.5)
    ax = fig.add_subplot()
    for i, (name, runs) in enumerate(groups.items()):
        ratios = [
            ((r.summary.get("GradientFlowMonitor") or {}).get("first_last_ratio") or {}).get("start")
            for r in runs
        ]
        points = [
            (x, r.summary.get("best", {}).get("val/dice"))
            for x, r in zip(ratios, runs, strict=True)
            if x and x > 0
        ]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        style = _style(i, runs)
        marker = "o" if style["linestyle"] == "-" else "x"
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, color=style["color"], marker=marker, label=name)
        ax.annotate(name, (xs[0], ys[0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("grad first/last ratio at the first log (first conv layer / head)")
    ax.set_ylabel("best validation Dice")
    ax.grid(True, which="major", alpha=0.3)
    return save_png(fig, path)


def write_all(output: Path, runs: Sequence[RunData], classes: Sequence[str]) -> list[Path]:
    """Every figure of the report into ``output`` (the names ``pipeline.compare.PLOTS`` lists)."""
    groups = _groups(runs)
    return [
        best_dice_png(output / "best_dice.png", groups, classes),
        val_dice_png(output / "val_dice.png", groups, classes),
        profiles_png(output / "grad_depth.png", groups, "grad", "gradient L2 norm"),
        profiles_png(output / "weight_update.png", groups, "update", "relative weight update"),
        dice_vs_gradient_png(output / "dice_vs_gradient.png", groups),
    ]
