"""Resampling volumes between a scan's own grid and the plan's target spacing.

One set of functions serves the cache (training and validation inputs) and ``medseg infer``, so
both see bit-identical network inputs, and both bring probabilities back the same way.

The grid: a side of n voxels at spacing s becomes ``round(n * s / t)`` voxels at target spacing t
(at least 1); voxel centres map with ``align_corners=False`` (the volume's extent is kept, the
voxels tile it). Interpolation (a choice, after nnU-Net's: a smooth interpolator for images, a
per-class one for labels):

- images: bicubic within each slice, linear across slices. On anisotropic data (slices more than
  3x thicker than the in-plane spacing) a cubic across slices would invent structure between
  distant samples, so the slice axis is always linear. Values may overshoot slightly at edges,
  as any cubic does.
- masks and probabilities: each class's indicator (or probability) linearly, then the arg max,
  class by class so that only two arrays of the output size are held: nearest neighbour would
  shift thin structures by up to half a voxel; per-class linear keeps their centre.

Arrays are in slice order, (S, H, W[, C]): the slice axis first (``pipeline.data.cache.slicing``).
``onto_training_grid`` takes a canonical volume there (the cache and inference call it), and
``labels_from_probabilities`` / ``resample_probabilities`` bring a prediction back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data.cache.slicing import in_slice_order, to_slices

ANISOTROPY = 3.0  # nnU-Net's threshold: a slice axis this much coarser than in-plane is anisotropic


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Voxels per axis after resampling ``shape`` at ``spacing`` (mm) to ``target`` (mm)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def _interpolate(volume: torch.Tensor, size: tuple[int, ...], cubic_in_plane: bool) -> torch.Tensor:
    """(N, S, H, W) float -> (N, *size), ``size`` (S', H', W'): bicubic or bilinear in plane, then
    linear across slices."""
    n, s, h, w = volume.shape
    if (h, w) != size[1:]:
        volume = F.interpolate(
            volume.reshape(n * s, 1, h, w), size=size[1:], mode="bicubic" if cubic_in_plane else "bilinear",
            align_corners=False,
        ).reshape(n, s, *size[1:])  # fmt: skip
    if s != size[0]:
        columns = volume.permute(0, 2, 3, 1).reshape(-1, 1, s)  # (N*H*W, 1, S)
        volume = F.interpolate(columns, size=size[0], mode="linear", align_corners=False)
        volume = volume.reshape(n, *size[1:], size[0]).permute(0, 3, 1, 2)
    return volume


def onto_training_grid(
    volume: np.ndarray, spacing: Sequence[float], target: Sequence[float], slice_axis: int
) -> np.ndarray:
    """(X, Y, Z, C) canonical RAS+ intensities at ``spacing`` (mm along X, Y, Z) -> (S, H, W, C)
    float32 on the training grid: cut along ``slice_axis`` and resampled to ``target`` (mm, X, Y, Z).
    The one way onto it: the cache (training and validation inputs) and ``medseg infer`` alike."""
    slices = to_slices(volume, slice_axis)
    return resample_image(slices, in_slice_order(spacing, slice_axis), in_slice_order(target, slice_axis))


def resample_image(image: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """(S, H, W, C) intensities at ``spacing`` (mm, slice order) -> float32 at ``target``.

    The input itself is returned (as float32) when the grid does not change.
    """
    size = resampled_shape(image.shape[:3], spacing, target)
    if size == image.shape[:3]:
        return np.asarray(image, dtype=np.float32)
    with torch.no_grad():
        volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32))
        out = _interpolate(volume, size, cubic_in_plane=True)
    return np.ascontiguousarray(out.permute(1, 2, 3, 0).numpy())


def _argmax_resampled(
    score: Callable[[int], torch.Tensor], num_classes: int, size: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """uint8 (*size): the arg max over classes of ``score(k)`` (1, S', H', W') resampled linearly,
    one class at a time (the first class wins ties, as ``argmax`` does)."""
    best = torch.full(size, -1.0, device=device)
    out = torch.zeros(size, dtype=torch.uint8, device=device)
    for k in range(num_classes):
        value = _interpolate(score(k), size, cubic_in_plane=False)[0]
        better = value > best
        best = torch.where(better, value, best)
        out[better] = k
    return out


def resample_labels(labels: np.ndarray, num_classes: int, size: Sequence[int]) -> np.ndarray:
    """(S, H, W) class indices -> uint8 (*size): per-class linear interpolation, then arg max."""
    size = tuple(int(n) for n in size)
    if size == labels.shape:
        return np.asarray(labels, dtype=np.uint8)
    source = torch.from_numpy(np.ascontiguousarray(labels))
    with torch.no_grad():
        out = _argmax_resampled(lambda k: (source == k).float()[None], num_classes, size, source.device)
    return out.numpy()


def labels_from_probabilities(probabilities: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(K, S', H', W') probabilities -> uint8 (*size) labels, on the probabilities' device:
    the arg max of ``resample_probabilities`` without holding all K resampled maps."""
    size = tuple(int(n) for n in size)
    if tuple(probabilities.shape[1:]) == size:
        return probabilities.argmax(0).to(torch.uint8)
    return _argmax_resampled(
        lambda k: probabilities[k : k + 1].float(), len(probabilities), size, probabilities.device
    )


def resample_probabilities(probabilities: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(K, S', H', W') -> (K, *size) float, linear on every axis (what ``labels_from_probabilities``
    takes the arg max of)."""
    size = tuple(int(n) for n in size)
    if tuple(probabilities.shape[1:]) == size:
        return probabilities.float()
    return _interpolate(probabilities.float(), size, cubic_in_plane=False)
