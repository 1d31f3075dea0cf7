"""3D training patches: seeded crop + augmentation of memory-mapped volumes, on the loader's CPU workers.

``PatchAugmenter3D`` turns a cached case (``pipeline.data.cache.facts``: raw (S, H, W, C) intensities
and an (S, H, W) mask, memory-mapped) into one standardised (C, D, H, W) patch and its mask, as
``SliceDataset`` does for 2D with albumentations (``pipeline.data.augment.transforms2d``); the settings
are the same ``Augmentation`` (``data.augmentation``). It reads only the box of the volume that
the augmented patch needs (for a patch rotated about every axis, the rotated patch's bounding
box), never the whole case, maps it to unit range (``to_unit``) and resamples it once: rotation,
scaling and the elastic displacement make one grid of source coordinates, interpolated
trilinearly for the image (``grid3d.sample_linear``: 8 taps a voxel where cubic takes 64 and a
spline prefilter of the box, and no overshoot out of the unit range, where gamma is defined)
and by nearest neighbour for the mask. Outside the volume the image is 0 in unit range (the
case's lower bound, like the clipped voxels) and the mask background. Without a spatial
transform the patch is a plain crop. Intensity transforms then run in unit range, as in 2D.

Randomness comes from one ``numpy.random.Generator``, reset by ``set_random_seed`` before each
sample (``pipeline.data.loading.order.SeededSamples``), so a patch depends only on its sample seed.

The design contract names MONAI for 3D augmentation; its transforms take the whole array as a
tensor and draw from their own ``RandomState``, where this reads a box of the memory map and
keeps one seeded generator (and resamples with the same ``grid_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.augment.transforms2d import Augmentation
from pipeline.data.augment.voxel_grid import (
    elastic_displacement,
    nearest_gather,
    resize_linear,
    rotation_matrix,
    sample_linear,
)
from pipeline.data.normalization import IntensityStats, standardize, to_unit

if TYPE_CHECKING:  # used in annotations only
    from pipeline.data.cache.store import MappedArray

Shape3 = tuple[int, int, int]


def class_locations(mask: np.ndarray, max_per_class: int = 10_000, seed: int = 0) -> dict[int, np.ndarray]:
    """Foreground class -> (N, 3) int32 voxel coordinates of up to ``max_per_class`` of its voxels.

    Drawn once per case (nnU-Net samples 10,000 per class likewise), so a foreground patch can be
    centred on a class without reading the mask. ``mask``: (S, H, W) class indices; the draw
    without replacement is seeded by ``seed``.
    """
    flat = np.flatnonzero(mask)
    labels = np.asarray(mask).ravel()[flat]
    rng = np.random.default_rng(seed)
    found = {}
    for label in np.unique(labels).tolist():
        where = flat[labels == label]
        if len(where) > max_per_class:
            where = np.sort(rng.choice(where, max_per_class, replace=False))
        found[int(label)] = np.stack(np.unravel_index(where, mask.shape), axis=1).astype(np.int32)
    return found


class PatchAugmenter3D:
    """Seeded 3D patch crop and augmentation: raw memory-mapped volume in, standardised patch out.

    Args:
        aug: the settings (``aug.enabled`` False: a deterministic crop, for validation).
        seed: seed until the first ``set_random_seed``.

    Example:
        >>> augment = PatchAugmenter3D(Augmentation())
        >>> augment.set_random_seed(7)
        >>> centre = augment.draw_center(locations[2])  # a voxel of class 2 (``class_locations``)
        >>> image, mask = augment(case.image, case.mask, case.stats, (64, 128, 128), centre, crop_class=2)
    """

    def __init__(self, aug: Augmentation = Augmentation(), seed: int = 0) -> None:
        self.aug = aug
        self.rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        """Draw everything from now on from ``seed`` (called before each sample)."""
        self.rng = np.random.default_rng(seed)

    def draw_center(self, locations: np.ndarray) -> Shape3:
        """One row of ``locations`` (N, 3) (a class's voxels, ``class_locations``), drawn uniformly."""
        x, y, z = (int(v) for v in locations[self.rng.integers(len(locations))])
        return x, y, z

    def __call__(
        self,
        image: np.ndarray | MappedArray,
        mask: np.ndarray | MappedArray,
        stats: IntensityStats,
        patch_size: Sequence[int],
        center: Sequence[int] | None = None,
        crop_class: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One patch of ``patch_size`` (D, H, W) voxels.

        Args:
            image: (S, H, W, C) raw intensities, e.g. a memory-mapped ``MappedArray``; only the
                box the patch needs is read.
            mask: (S, H, W) class indices, read likewise.
            stats: the case's intensity statistics: the patch is mapped to unit range, augmented
                there and standardised (``pipeline.data.normalization``).
            patch_size: output size; the patch's centre voxel is at index ``patch_size // 2``.
            center: the volume voxel at the patch's centre; None: drawn uniformly so the patch
                lies inside the volume where it fits (the volume's centre when ``aug.enabled``
                is False).
            crop_class: > 0 when ``center`` is a voxel of that class (``draw_center``): with
                augmentation it lands at a random place in the central half of the patch, the
                patch shifted to lie inside the volume as far as that allows.

        Returns:
            image (C, D, H, W) float32 standardised, mask (D, H, W) int64.
        """
        patch = tuple(int(n) for n in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size is three positive voxel counts (D, H, W), got {patch_size}")
        depth, height, width = (int(n) for n in image.shape[:3])
        shape = (depth, height, width)
        if center is not None and not all(0 <= v < n for v, n in zip(center, shape, strict=True)):
            raise ValueError(f"center {tuple(center)} is not a voxel of the volume of size {shape}")
        in_plane = max(patch) / patch[0] > self.aug.anisotropy_threshold
        spatial, displacement = None, None
        if self.aug.enabled and self.rng.random() < self.aug.affine_p:
            spatial = self._affine(in_plane)
        if self.aug.enabled and self.rng.random() < self.aug.elastic_3d_p:
            axes = (1, 2) if in_plane else (0, 1, 2)
            displacement = elastic_displacement(
                patch, self.aug.elastic_alpha, self.aug.elastic_sigma, self.rng, axes
            )
            spatial = np.eye(3) if spatial is None else spatial
        centre = self._place(shape, patch, center, crop_class, spatial, displacement)
        if spatial is None:
            unit, labels = self._crop(image, mask, stats, patch, centre.astype(np.intp))
        else:
            unit, labels = self._resample(image, mask, stats, patch, centre, spatial, displacement)
        if self.aug.enabled:
            unit = self._intensity(unit, in_plane)
            for axis in range(3):
                if self.rng.random() < self.aug.flip_p:
                    unit, labels = np.flip(unit, axis + 1), np.flip(labels, axis)
        out = np.moveaxis(standardize(np.moveaxis(unit, 0, -1), stats), -1, 0)
        return np.ascontiguousarray(out, np.float32), np.ascontiguousarray(labels, np.int64)

    def _affine(self, in_plane: bool) -> np.ndarray:
        """3x3 map from patch offsets to volume offsets: rotation about every axis (about axis 0
        only, for anisotropic patches) and zoom by a factor from ``scale_range`` (in-plane too)."""
        limit = np.deg2rad(self.aug.rotate_limit)
        angles = self.rng.uniform(-limit, limit, 3) * ([1, 0, 0] if in_plane else 1)
        zoom = self.rng.uniform(*self.aug.scale_range)
        matrix = rotation_matrix(angles) / zoom
        if in_plane:
            matrix[0, 0] = 1.0
        return matrix

    def _place(
        self,
        shape: Shape3,
        patch: Shape3,
        center: Sequence[int] | None,
        crop_class: int,
        spatial: np.ndarray | None,
        displacement: np.ndarray | None,
    ) -> np.ndarray:
        """The volume coordinates (3,) of the patch's centre voxel (``spatial``, ``displacement``:
        the patch's transform, so that a ``crop_class`` voxel is sampled where it is meant to land)."""
        half = np.array(patch) // 2
        lowest = np.minimum(0, np.subtract(shape, patch)) + half  # patch inside the volume where it fits
        highest = np.maximum(0, np.subtract(shape, patch)) + half
        if center is None:
            if not self.aug.enabled:
                return (lowest + highest) // 2
            return self.rng.integers(lowest, highest + 1).astype(np.float64)
        voxel = np.asarray(center, np.float64)
        if crop_class <= 0 or not self.aug.enabled:
            return voxel
        matrix = np.eye(3) if spatial is None else spatial
        reach = np.array(patch) // 4
        landing = self.rng.integers(-reach, reach + 1)  # where the voxel lands, from the patch centre
        centre = np.clip(voxel - matrix @ landing, lowest, highest)
        landing = np.clip(np.rint(np.linalg.solve(matrix, voxel - centre)), -reach, reach)  # keep the voxel
        # the index is built outside the brackets: mypy takes x[(a, *b)] for Python 3.11 syntax
        at = (slice(None), *(half + landing).astype(np.intp))
        shift = 0.0 if displacement is None else displacement[at]
        return voxel - matrix @ landing - shift

    def _crop(
        self,
        image: np.ndarray | MappedArray,
        mask: np.ndarray | MappedArray,
        stats: IntensityStats,
        patch: Shape3,
        centre: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit-range image (C, *patch) and mask (*patch) of the box around ``centre``, 0 outside."""
        start = centre - np.array(patch) // 2
        source, target = [], []
        for first, n, size in zip(start.tolist(), patch, image.shape[:3], strict=True):
            low = min(max(first, 0), size)
            high = max(min(first + n, size), low)
            source.append(slice(low, high))
            target.append(slice(low - first, high - first))
        unit = np.zeros((image.shape[3], *patch), np.float32)
        labels = np.zeros(patch, np.uint8)
        inside = (slice(None), *target)  # built outside the brackets, as in _place
        unit[inside] = np.moveaxis(to_unit(np.asarray(image[tuple(source)]), stats), -1, 0)
        labels[tuple(target)] = mask[tuple(source)]
        return unit, labels

    def _resample(
        self,
        image: np.ndarray | MappedArray,
        mask: np.ndarray | MappedArray,
        stats: IntensityStats,
        patch: Shape3,
        centre: np.ndarray,
        matrix: np.ndarray,
        displacement: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit-range image (C, *patch) and mask (*patch) at volume coordinates
        ``centre + matrix @ (g - patch // 2) + displacement(g)`` for every patch voxel g, 0 outside."""
        offsets = [np.arange(n, dtype=np.float32) - n // 2 for n in patch]
        coords = np.empty((3, *patch), np.float32)
        for i in range(3):
            plane = (centre[i] + matrix[i, 0] * offsets[0])[:, None] + matrix[i, 1] * offsets[1]
            np.add(plane[..., None], matrix[i, 2] * offsets[2], out=coords[i])
        if displacement is not None:
            coords += displacement
        flat, shape = coords.reshape(3, -1), np.array(image.shape[:3])
        low = np.clip(np.floor(flat.min(axis=1)).astype(np.intp), 0, shape - 1)
        high = np.clip(np.floor(flat.max(axis=1)).astype(np.intp) + 2, low + 1, shape)  # + linear's neighbour
        box = tuple(slice(a, b) for a, b in zip(low.tolist(), high.tolist(), strict=True))
        coords -= low.astype(np.float32)[:, None, None, None]
        region = np.moveaxis(to_unit(np.asarray(image[box]), stats), -1, 0)
        return sample_linear(region, coords), nearest_gather(np.asarray(mask[box]), coords)

    def _intensity(self, unit: np.ndarray, in_plane: bool) -> np.ndarray:
        """Low resolution, gamma, brightness/contrast and noise on the unit-range (C, *patch) image,
        each drawn with its probability; values stay in [0, 1] (clipped as albumentations does)."""
        aug, rng = self.aug, self.rng
        if rng.random() < aug.lowres_p:
            factor = rng.uniform(*aug.lowres_range)
            small = [
                n if in_plane and axis == 0 else max(1, round(n * factor))
                for axis, n in enumerate(unit.shape[1:])
            ]
            unit = resize_linear(resize_linear(unit, small), unit.shape[1:])
        if rng.random() < aug.gamma_p:
            unit = np.power(unit, rng.uniform(*aug.gamma_range), dtype=np.float32)
        if rng.random() < aug.brightness_contrast_p:
            contrast = 1.0 + rng.uniform(-aug.contrast_limit, aug.contrast_limit)
            brightness = rng.uniform(-aug.brightness_limit, aug.brightness_limit)
            unit = np.clip(unit * np.float32(contrast) + np.float32(brightness), 0.0, 1.0)
        if rng.random() < aug.noise_p:
            noise = rng.standard_normal(unit.shape, np.float32)
            noise *= rng.uniform(*aug.noise_std)
            unit = np.clip(unit + noise, 0.0, 1.0)
        return unit
