"""Intensity normalisation, split in two steps so that augmentation sees a fixed range.

1. ``to_unit``: map raw intensities to [0, 1] with per-case, per-channel bounds ``lo``/``hi``
   (clipping where the mode clips). Intensity augmentations (brightness, contrast, gamma, noise)
   run in this range, where all of them are defined.
2. ``standardize``: subtract ``mean`` and divide by ``std`` (per case and channel, measured on the
   unit-range image before augmentation), so an un-augmented image ends up exactly z-scored.

Modes: ``zscore`` (MR: per-case z-score, no clipping), ``percentile`` (clip to per-case
percentiles, then z-score), ``ct`` (clip to a fixed HU ``window``, then z-score with fixed
``mean``/``std`` in HU if given, else per case; without a window, nnU-Net's CT scheme: clip to
the ``percentiles`` of the foreground voxels of the whole data set, then z-score with their
mean/std), ``rgb`` (/255 to [0, 1]), ``none``, and ``auto``: per channel by modality (from
``dataset.json`` or ``data.modalities``): CT -> ``ct``, RGB -> ``rgb``, noNorm -> ``none``,
anything else (MR sequences, unknown) -> ``zscore``.

``resolve_channels`` turns the configured settings into one concrete ``Normalization`` per input
channel, data-set statistics filled in; those are stored in the checkpoint
(``pipeline.data.preprocessing.Preprocessing``) so inference reproduces them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MODES = ("auto", "zscore", "percentile", "ct", "rgb", "none")
# modality names (MSD "modality", nnU-Net "channel_names") -> mode; anything else is zscore
MODALITY_MODES = {"ct": "ct", "rgb": "rgb", "rgb_to_0_1": "rgb", "nonorm": "none", "none": "none"}


@dataclass(frozen=True)
class Normalization:
    """Normalisation settings (part of the data config).

    Args:
        mode: one of ``MODES``.
        percentiles: lower and upper percentile (0-100) for ``percentile`` (of the case), and for
            ``ct`` without a window (of the data set's foreground voxels).
        window: (low, high) intensity window for ``ct``, in the image's units (HU); None
            measures it on the data set's foreground (``resolve_channels``).
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


STATS_FIELDS = ("lo", "hi", "mean", "std")


def fit_intensity(image: np.ndarray, norm: Normalization | Sequence[Normalization]) -> IntensityStats:
    """Measure the statistics of one case. ``image``: (..., C) channels last, any dtype.

    ``norm`` is one ``Normalization`` for every channel, or one per channel (``resolve_channels``).
    """
    if not isinstance(norm, Normalization):
        if len(norm) != image.shape[-1]:
            raise ValueError(
                f"{len(norm)} channel normalisations for an image with {image.shape[-1]} channels"
            )
        if len(set(norm)) > 1:
            parts = [fit_intensity(image[..., c : c + 1], n) for c, n in enumerate(norm)]
            return IntensityStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in STATS_FIELDS))
        norm = norm[0]
    if norm.mode == "auto" or (norm.mode == "ct" and norm.window is None):
        raise ValueError(f"{norm} needs data-set information: resolve it with resolve_channels first")
    x = image.reshape(-1, image.shape[-1]).astype(np.float64)
    channels = x.shape[1]
    if norm.mode == "rgb":
        return IntensityStats(
            np.zeros(channels), np.full(channels, 255.0), np.zeros(channels), np.ones(channels)
        )
    if norm.mode == "none":
        return IntensityStats(np.zeros(channels), np.ones(channels), np.zeros(channels), np.ones(channels))
    if norm.mode == "ct":
        assert norm.window is not None  # a ct mode without a window raised above
        lo, hi = np.full(channels, norm.window[0], float), np.full(channels, norm.window[1], float)
    elif norm.mode == "percentile":
        lo, hi = np.percentile(x, norm.percentiles, axis=0)
    else:
        lo, hi = x.min(axis=0), x.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    mean, std = unit.mean(axis=0), unit.std(axis=0)
    if norm.mode == "ct" and norm.mean is not None:
        mean = np.full(channels, (norm.mean - lo[0]) / (hi[0] - lo[0]))  # lo: the window's low end
    if norm.mode == "ct" and norm.std is not None:
        std = np.full(channels, norm.std / (hi[0] - lo[0]))
    return IntensityStats(lo, hi, mean, np.maximum(std, 1e-8))


def stats_from_moments(
    moments: Mapping[str, Sequence[float]], norm: Normalization | Sequence[Normalization]
) -> IntensityStats | None:
    """What ``fit_intensity`` would measure, from a case's raw per-channel ``min``, ``max``,
    ``mean`` and ``std`` (each (C,)), where those determine it exactly (modes zscore, rgb, none,
    and ct with a window and fixed mean/std); None where the voxels are needed.
    """
    channels = len(moments["min"])
    norms = [norm] * channels if isinstance(norm, Normalization) else list(norm)
    parts = []
    for c, n in enumerate(norms):
        lo, hi, mean, std = (float(moments[k][c]) for k in ("min", "max", "mean", "std"))
        if n.mode in ("rgb", "none"):
            parts.append(fit_intensity(np.zeros((1, 1)), n))
            continue
        if n.mode == "ct" and n.window is not None and n.mean is not None and n.std is not None:
            lo, hi = n.window
            mean, std = n.mean, n.std
        elif n.mode != "zscore":
            return None
        hi = hi if hi > lo else lo + 1.0
        unit_mean, unit_std = (mean - lo) / (hi - lo), max(std / (hi - lo), 1e-8)
        parts.append(IntensityStats(*(np.array([v], float) for v in (lo, hi, unit_mean, unit_std))))
    return IntensityStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in STATS_FIELDS))


def intensity_moments(image: np.ndarray) -> dict[str, list[float]]:
    """Per-channel raw ``min``, ``max``, ``mean`` and ``std`` of (..., C) intensities (float64 sums).

    The one place they are computed: the volume cache stores them at build time and inference
    computes them on the scan it reads, so both derive identical statistics from them.
    """
    axes = tuple(range(image.ndim - 1))
    return {
        "min": image.min(axis=axes).astype(float).tolist(),
        "max": image.max(axis=axes).astype(float).tolist(),
        "mean": image.mean(axis=axes, dtype=np.float64).tolist(),
        "std": image.std(axis=axes, dtype=np.float64).tolist(),
    }


def case_stats(
    image: np.ndarray,
    norm: Normalization | Sequence[Normalization],
    moments: Mapping[str, Sequence[float]] | None = None,
) -> IntensityStats:
    """The statistics of one case (..., C): from its ``intensity_moments`` where they determine
    them (``stats_from_moments``), else measured on the voxels (``fit_intensity``)."""
    stats = stats_from_moments(moments or intensity_moments(image), norm)
    return stats if stats is not None else fit_intensity(image, norm)


def to_unit(image: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """(..., C) raw -> float32 in [0, 1]."""
    unit = (image.astype(np.float32) - stats.lo.astype(np.float32)) / (stats.hi - stats.lo).astype(np.float32)
    return np.clip(unit, 0.0, 1.0, out=unit)


def standardize(unit: np.ndarray, stats: IntensityStats) -> np.ndarray:
    """(..., C) unit-range -> float32 standardised with the case's own moments."""
    return (unit - stats.mean.astype(np.float32)) / stats.std.astype(np.float32)


def modality_mode(modality: str | None) -> str:
    """The ``auto`` mode for a modality name (``CT``, ``T2``, ``rgb_to_0_1``, ...; None: zscore)."""
    return MODALITY_MODES.get((modality or "").lower().replace("-", "_"), "zscore")


def needs_foreground(norm: Normalization, modalities: Sequence[str | None]) -> bool:
    """Whether ``resolve_channels`` needs foreground intensities of the data set."""
    modes = [modality_mode(m) for m in modalities] if norm.mode == "auto" else [norm.mode]
    return "ct" in modes and norm.window is None


def resolve_channels(
    norm: Normalization, modalities: Sequence[str | None], foreground: np.ndarray | None = None
) -> list[Normalization]:
    """One concrete ``Normalization`` per channel: ``auto`` resolved by modality, and a ``ct``
    channel without a window given nnU-Net's data-set statistics: the window is the
    ``norm.percentiles`` of the foreground intensities, and mean/std (unless set) theirs.

    Args:
        norm: the configured settings.
        modalities: one modality name (or None) per channel.
        foreground: (N, C) raw intensities sampled from foreground voxels of the data set;
            needed when ``needs_foreground`` says so.
    """
    resolved = []
    for c, modality in enumerate(modalities):
        mode = modality_mode(modality) if norm.mode == "auto" else norm.mode
        channel = Normalization(mode, norm.percentiles, norm.window, norm.mean, norm.std)
        if mode == "ct" and norm.window is None:
            if foreground is None or len(foreground) == 0:
                raise ValueError(
                    "CT normalisation without a window measures the foreground of the data set, but it has "
                    "no labelled foreground voxels; set data.normalization.window, e.g. [-1000, 1000]"
                )
            values = foreground[:, c].astype(np.float64)
            lo, hi = (float(v) for v in np.percentile(values, norm.percentiles))
            channel = Normalization(
                "ct",
                norm.percentiles,
                (lo, hi),
                float(values.mean()) if norm.mean is None else norm.mean,
                float(values.std()) if norm.std is None else norm.std,
            )
        resolved.append(channel)
    return resolved


def to_plain(norm: Normalization) -> dict[str, Any]:
    """A ``Normalization`` as plain types (lists for tuples), for checkpoints and JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(norm).items()}


def from_plain(stored: Mapping[str, Any]) -> Normalization:
    """Inverse of ``to_plain``."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    return Normalization(**fields)
