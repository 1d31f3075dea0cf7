"""Voxel-grid primitives of 3D augmentation (``pipeline.data.augment.transforms3d``).

Trilinear sampling at arbitrary coordinates, a nearest-voxel gather, separable linear resizing,
smooth random displacement fields and rotation matrices, each chosen for speed on one CPU core
(a loader worker); the times quoted are for a 64 x 128 x 128 patch on the 2-core development
machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional


def resize_linear(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(C, *shape) float32: ``array`` (C, D, H, W) resized linearly, voxel centres aligned and
    edges clamped (``zoom(order=1, grid_mode=True, mode="nearest")``'s values).

    Through ``torch.nn.functional.interpolate``: 6 ms down and back up for a 64 x 128 x 128
    patch where the same with ``scipy.ndimage.zoom`` takes 45.
    """
    source = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None]
    return functional.interpolate(source, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


def elastic_displacement(
    shape: Sequence[int],
    alpha: float,
    sigma: float,
    rng: np.random.Generator,
    axes: Sequence[int] = (0, 1, 2),
) -> np.ndarray:
    """(3, *shape) float32 random displacement in voxels along ``axes`` (0 along the others).

    The 2D meaning of ``alpha`` and ``sigma`` (albumentations, batchgenerators): uniform noise in
    [-1, 1] per voxel, smoothed by a Gaussian of ``sigma`` voxels, times ``alpha``. Computed on a
    grid ``sigma / 2`` voxels coarse, where each node stands for the mean of the voxels it covers
    (noise std / sqrt(voxels per node)), then resized to ``shape``: the same field in size and
    smoothness for a fraction of the cost (about 20 ms for three components). Its std is roughly
    ``alpha * 0.577 / (2 sqrt(pi) sigma) ** (d / 2)`` in d dimensions: smaller in 3D than in 2D.
    """
    step = max(1.0, sigma / 2)
    coarse = tuple(max(2, int(np.ceil(n / step)) + 1) for n in shape)
    scale = alpha * step ** (-len(shape) / 2)
    noise = rng.uniform(-scale, scale, (len(axes), *coarse))
    smooth = ndimage.gaussian_filter(noise, (0, *[sigma / step] * len(coarse)), mode="reflect")
    field = np.zeros((3, *shape), np.float32)
    field[list(axes)] = resize_linear(smooth, shape)
    return field


def rotation_matrix(angles: Sequence[float] | np.ndarray) -> np.ndarray:
    """3x3 rotation by ``angles`` (radians) about axes 0, 1 and 2, in that order."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[[i, i, j, j], [i, j, i, j]] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
        matrix = matrix @ turn
    return matrix


def sample_linear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(C, *out) float32 trilinear interpolation of ``volume`` (C, S, H, W) at voxel coordinates
    ``coords`` (3, *out), 0 outside (``map_coordinates(order=1, mode="grid-constant")``'s values).

    Through ``torch.nn.functional.grid_sample``, as nnU-Net v2's batchgeneratorsv2 resamples:
    40 ms for a rotated patch where ``scipy.ndimage.map_coordinates`` takes 70 (74 and 148 on
    the machine under load).
    """
    grid = np.empty((*coords.shape[1:], 3), np.float32)  # grid_sample's (x, y, z): axes 2, 1, 0
    for k, axis in enumerate((2, 1, 0)):
        size = volume.shape[axis + 1]
        np.multiply(coords[axis], 2.0 / size, out=grid[..., k])  # voxel centre i -> (2i + 1) / n - 1
        grid[..., k] += 1.0 / size - 1.0
    source = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None]
    sampled = functional.grid_sample(
        source, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled[0].numpy()


def nearest_gather(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``volume`` at the voxels nearest to ``coords`` (3, *out), 0 outside
    (``map_coordinates(order=0, mode="grid-constant")``'s values but at exact half-voxel ties):
    rounding and one gather, 10 ms for a 64 x 128 x 128 patch where ``map_coordinates`` takes 50."""
    padded = np.pad(volume, 1)  # the zero border stands for everything outside the volume
    flat = np.zeros(coords.shape[1:], np.int32 if padded.size < 2**31 else np.intp)
    index = np.empty(coords.shape[1:], np.float32)
    for axis in range(3):
        np.rint(coords[axis], out=index)
        index += 1
        np.clip(index, 0, padded.shape[axis] - 1, out=index)
        flat *= padded.shape[axis]
        np.add(flat, index, out=flat, casting="unsafe")
    return padded.ravel().take(flat)
