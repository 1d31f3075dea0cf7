"""Volumes as stacks of 2D slices along one axis of the canonical (RAS+) voxel grid.

Training and inference both go through these functions, so a volume is cut and reassembled
the same way in both. Axis 0, 1, 2 = sagittal, coronal, axial slices of the RAS+ array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


def resolve_slice_axis(axis: int | str, spacings: Sequence[Sequence[float]]) -> int:
    """The slicing axis: an explicit 0/1/2, or ``"auto"`` = the axis with the coarsest median
    spacing over the data set (nnU-Net's choice for 2D: slices keep the finest in-plane grid).
    Ties go to the axial axis (2).

    Args:
        axis: 0, 1, 2 or ``"auto"``.
        spacings: per-case voxel sizes (mm) along X, Y, Z of the canonical arrays.
    """
    if axis in (0, 1, 2):
        return int(axis)
    if axis != "auto":
        raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {axis!r}")
    median = np.median(np.asarray(spacings, dtype=float), axis=0)
    coarsest = np.flatnonzero(np.isclose(median, median.max()))
    return 2 if 2 in coarsest else int(coarsest[0])


def to_slices(array: np.ndarray, axis: int) -> np.ndarray:
    """(X, Y, Z, ...) -> (S, H, W, ...) with S the size along ``axis`` (a view, no copy)."""
    return np.moveaxis(array, axis, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``to_slices``: (S, H, W, ...) -> (X, Y, Z, ...)."""
    return np.moveaxis(slices, 0, axis)


def in_slice_order(values: Sequence[float], axis: int) -> tuple[float, ...]:
    """Per-axis values (X, Y, Z) of the RAS+ array in slice order: the slice axis first."""
    return (values[axis], *(v for a, v in enumerate(values) if a != axis))
