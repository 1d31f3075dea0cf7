"""Intensity normalisation, split in two steps so that augmentation sees a fixed range.

1. ``to_unit``: map raw intensities to [0, 1] with per-case, per-channel bounds ``lo``/``hi``
   (clipping where the mode clips). Intensity augmentations (brightness, contrast, gamma, noise)
   run in this range, where all of them are defined.
2. ``standardize``: subtract ``mean`` and divide by ``std`` (per case and channel, measured on the
   unit-range image before augmentation), so an un-augmented image ends up exactly z-scored.

Modes: ``zscore`` (MR: per-case z-score, no clipping), ``percentile`` (clip to per-case
percentiles, then z-score), ``ct`` (clip to a fixed HU ``window``, then z-score with fixed
``mean``/``std`` in HU if given, else per case), ``rgb`` (/255 to [0, 1]) and ``none``.
The settings are stored in the checkpoint so inference reproduces them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("zscore", "percentile", "ct", "rgb", "none")


@dataclass(frozen=True)
class Normalization:
    """Normalisation settings (part of the data config).

    Args:
        mode: one of ``MODES``.
        percentiles: lower and upper percentile (0-100) for ``percentile``.
        window: (low, high) intensity window for ``ct``, in the image's units (HU).
        mean: fixed mean for ``ct`` in the image's units; None measures it per case.
        std: fixed standard deviation for ``ct``; None measures it per case.
    """

    mode: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown normalisation mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.mode == "ct" and self.window is None:
            raise ValueError("normalisation mode 'ct' needs a window, e.g. window: [-1000, 1000]")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel bounds and moments, each an array of shape (C,)."""

    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def fit_intensity(image: np.ndarray, norm: Normalization) -> IntensityStats:
    """Measure the statistics of one case. ``image``: (..., C) channels last, any dtype."""
    x = image.reshape(-1, image.shape[-1]).astype(np.float64)
    channels = x.shape[1]
    if norm.mode == "rgb":
        return IntensityStats(
            np.zeros(channels), np.full(channels, 255.0), np.zeros(channels), np.ones(channels)
        )
    if norm.mode == "none":
        return IntensityStats(np.zeros(channels), np.ones(channels), np.zeros(channels), np.ones(channels))
    if norm.mode == "ct":
        lo, hi = np.full(channels, norm.window[0], float), np.full(channels, norm.window[1], float)
    elif norm.mode == "percentile":
        lo, hi = np.percentile(x, norm.percentiles, axis=0)
    else:
        lo, hi = x.min(axis=0), x.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    mean, std = unit.mean(axis=0), unit.std(axis=0)
    if norm.mode == "ct" and norm.mean is not None:
        mean = np.full(channels, (norm.mean - norm.window[0]) / (hi[0] - lo[0]))
    if norm.mode == "ct" and norm.std is not None:
        std = np.full(channels, norm.std / (hi[0] - lo[0]))
    return IntensityStats(lo, hi, mean, np.maximum(std, 1e-8))


def to_unit(image: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """(..., C) raw -> float32 in [0, 1]."""
    unit = (image.astype(np.float32) - stats.lo.astype(np.float32)) / (stats.hi - stats.lo).astype(np.float32)
    return np.clip(unit, 0.0, 1.0, out=unit)


def standardize(unit: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """(..., C) unit-range -> float32 standardised with the case's own moments."""
    return (unit - stats.mean.astype(np.float32)) / stats.std.astype(np.float32)
