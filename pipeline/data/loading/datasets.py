"""Datasets yielding the sample dict of the data contract.

A sample is ``{"image": float32 (C, H, W), "mask": int64 (H, W), "case_id": str,
"slice_index": int, "index": int}`` with ``slice_index`` -1 for 2D images and ``index`` the
sample's position in its dataset (metrics use it to score each image once under DDP, where
DistributedSampler pads with repeats). ``CaseDataset`` yields whole volumes for validation, with
the labels and spacing of the case's own grid where it is scored.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.cache.slicing import in_slice_order
from pipeline.data.cache.store import MappedArray
from pipeline.data.normalization import IntensityStats, Normalization, fit_intensity, standardize, to_unit
from pipeline.data.reading.formats import read_image_2d, read_mask_2d
from pipeline.data.reading.layouts import Case
from pipeline.errors import DataError


@dataclass(frozen=True)
class OriginalGrid:
    """A volume's own grid, where it is scored: its labels and spacing.

    Attributes:
        labels: (X, Y, Z) class indices in RAS+ order (an array or a memory-mapped one).
        spacing: voxel size along X, Y, Z, mm.
        slice_axis: the axis the training grid is cut along.
    """

    labels: np.ndarray | MappedArray
    spacing: tuple[float, float, float]
    slice_axis: int

    def labels_in_slice_order(self) -> np.ndarray:
        """(S, H, W) labels, the slice axis first (as the training grid)."""
        return np.moveaxis(np.asarray(self.labels[...]), self.slice_axis, 0)

    def spacing_in_slice_order(self) -> tuple[float, ...]:
        return in_slice_order(self.spacing, self.slice_axis)


@dataclass
class CaseArrays:
    """One case in memory (or memory-mapped).

    Attributes:
        case_id: the case's name.
        image: (S, H, W, C) raw intensities, S slices (1 for a 2D image); an array, or a
            memory-mapped one (the volume cache's).
        mask: (S, H, W) uint8 class indices (likewise), or None for unlabelled cases.
        stats: intensity statistics of the whole case (see ``pipeline.data.normalization``).
        is_volume: False for 2D images (their ``slice_index`` is -1).
        class_slices: foreground class -> indices of the slices that show it (from the cache
            manifest); None reads it from ``mask``.
        original: a volume's own grid (labels, spacing), when ``image`` was resampled.
        where: (N, 4) int rows (class, s, h, w) of foreground voxels, for 3D foreground patches.
    """

    case_id: str
    image: np.ndarray | MappedArray
    mask: np.ndarray | MappedArray | None
    stats: IntensityStats
    is_volume: bool = False
    class_slices: dict[int, list[int]] | None = None
    original: OriginalGrid | None = None
    where: np.ndarray | MappedArray | None = None


def slices_per_class(mask: np.ndarray) -> dict[int, list[int]]:
    """Foreground class -> indices of the slices of ``mask`` (S, H, W) that show it."""
    flat = mask.reshape(len(mask), -1)
    return {
        int(label): np.flatnonzero((flat == label).any(axis=1)).tolist() for label in np.unique(flat) if label
    }


def check_labels(
    mask: np.ndarray, num_classes: int, path: str | os.PathLike, class_names: Sequence[str]
) -> None:
    """Raise a ``DataError`` for ``path`` when ``mask`` holds a value outside 0..num_classes-1."""
    if mask.size and mask.min() >= 0 and mask.max() < num_classes:
        return  # two passes, no copy: np.unique sorts a copy (about 1 s for a 512 x 512 x 120 CT mask)
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(
            path,
            f"label value(s) {bad.tolist()} not in the classes 0..{num_classes - 1} ({', '.join(class_names)})",
        )


def pair_problems(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    image_shape: Sequence[int],
    mask: np.ndarray,
    class_names: Sequence[str],
    affines: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[DataError]:
    """Everything wrong with a mask against its image, each a ``DataError`` naming the mask.

    Args:
        image_shape: the image's spatial shape, (H, W) or (X, Y, Z).
        mask: class indices, spatial shape only.
        affines: (image, mask) voxel -> world matrices of volumes in the same voxel order; they
            must agree to 1e-3 (mm), so the labels lie on the anatomy they were drawn on.
    """
    problems = []
    if mask.shape != tuple(image_shape):
        problems.append(
            DataError(
                mask_path,
                f"mask size {mask.shape} differs from image size {tuple(image_shape)} ({image_path})",
            )
        )
    elif affines is not None and not np.allclose(affines[0], affines[1], atol=1e-3):
        image_affine, mask_affine = affines
        spacing = [np.linalg.norm(a[:3, :3], axis=0).round(4).tolist() for a in affines]
        problems.append(
            DataError(
                mask_path,
                f"mask geometry differs from its image {image_path}: spacing {spacing[1]} vs {spacing[0]} mm, "
                f"origin {mask_affine[:3, 3].round(3).tolist()} vs {image_affine[:3, 3].round(3).tolist()} mm",
            )
        )
    try:
        check_labels(mask, len(class_names), mask_path, class_names)
    except DataError as err:
        problems.append(err)
    return problems


def require_one_size(cases: Sequence[CaseArrays], root: str | os.PathLike) -> None:
    """Whole images train only when they share one size: else a ``DataError`` asking for a patch."""
    sizes = sorted({tuple(c.image.shape[1:3]) for c in cases})
    if len(sizes) > 1:
        raise DataError(
            root, f"training slices differ in size ({sizes[0]} ... {sizes[-1]}); set data.patch_size"
        )


def apply_label_map(mask: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Relabel ``mask`` with ``{stored value: class index}``; values not in the map are kept."""
    if not label_map:
        return mask
    out = mask.copy()
    for source, target in label_map.items():
        out[mask == source] = target
    return out


def load_case_2d(
    case: Case,
    norm: Normalization | Sequence[Normalization],
    class_names: Sequence[str],
    label_map: dict[int, int] | None = None,
) -> CaseArrays:
    """Read one 2D image (and its mask), check them, and measure intensity statistics."""
    image = read_image_2d(case.images[0])
    if image.ndim == 2:
        image = image[..., None]
    mask = None
    if case.mask is not None:
        mask = apply_label_map(read_mask_2d(case.mask), label_map)
        for problem in pair_problems(case.images[0], case.mask, image.shape[:2], mask, class_names):
            raise problem
        mask = mask.astype(np.uint8)[None]
    if not np.isfinite(image).all():
        raise DataError(case.images[0], "image holds NaN or infinite intensities")
    return CaseArrays(case.case_id, image[None], mask, fit_intensity(image, norm))


class SliceDataset(Dataset):
    """2D samples from a list of cases; every slice of every case, or the given ``(case, slice)`` pairs.

    Args:
        cases: the cases, all with the same number of channels.
        transform: an albumentations ``Compose`` called as ``transform(image=..., mask=...)`` on the
            unit-range image (H, W, C) and the mask (H, W).
        slices: optional list of (case index, slice index) pairs; default every slice.
        foreground_transform: used instead of ``transform`` for the items a sampler asks for as
            ``(index, label)`` with a label > 0: drawn to show that class
            (``pipeline.data.loading.sampling``), so it is called with ``crop_class=label`` and crops its
            patch around the class (``pipeline.data.augment.transforms2d.ClassBalancedCrop``).
    """

    def __init__(
        self,
        cases: Sequence[CaseArrays],
        transform: Callable[..., dict[str, Any]],
        slices: Sequence[tuple[int, int]] | None = None,
        foreground_transform: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        self.cases = list(cases)
        self.transform = transform
        self.foreground_transform = foreground_transform or transform
        self.slices = (
            list(slices)
            if slices is not None
            else [(c, s) for c, case in enumerate(self.cases) for s in range(case.image.shape[0])]
        )

    def __len__(self) -> int:
        return len(self.slices)

    def class_items(self) -> dict[int, np.ndarray]:
        """Foreground class -> sorted indices of the items whose mask shows it."""
        per_case: dict[int, dict[int, set[int]]] = {}
        for c in {c for c, _ in self.slices}:
            case = self.cases[c]
            found = case.class_slices
            if found is None:  # not from the cache (2D images): read the mask
                found = slices_per_class(np.asarray(case.mask)) if case.mask is not None else {}
            per_case[c] = {label: set(slices) for label, slices in found.items()}
        items: dict[int, list[int]] = {}
        for index, (c, s) in enumerate(self.slices):
            for label, slices in per_case[c].items():
                if s in slices:
                    items.setdefault(label, []).append(index)
        return {label: np.array(found) for label, found in sorted(items.items())}

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, label = index if isinstance(index, tuple) else (index, 0)
        c, s = self.slices[index]
        case = self.cases[c]
        unit = to_unit(np.asarray(case.image[s]), case.stats)
        mask = np.asarray(case.mask[s]) if case.mask is not None else np.zeros(unit.shape[:2], np.uint8)
        if label:
            out = self.foreground_transform(image=unit, mask=mask, crop_class=label)
        else:
            out = self.transform(image=unit, mask=mask)
        image = standardize(out["image"], case.stats).transpose(2, 0, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(out["mask"].astype(np.int64)),
            "case_id": case.case_id,
            "slice_index": s if case.is_volume else -1,
            "index": index,
        }


def standardized_volume(case: CaseArrays) -> np.ndarray:
    """(C, S, H, W) float32 network input of a whole case, as validation and inference feed it."""
    image = standardize(to_unit(np.asarray(case.image[...]), case.stats), case.stats)
    return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)


class CaseDataset(Dataset):
    """Whole volumes, one sample per case, for validation and testing.

    A sample is ``{"image": float32 (C, S, H, W) on the training grid, "mask": uint8 (S, H, W)
    on that grid (for the loss), "target": uint8 (S0, H0, W0) the case's own labels in slice
    order, "spacing": float64 (3,) its own spacing in slice order (mm), "case_id", "slice_index":
    -1, "index"}``: the module predicts on the training grid and scores on the case's own. The
    labels stay uint8 (a whole case's int64 labels would be 8x larger: 630 MB for a 512 x 512 x
    300 CT, in every loader worker's prefetched sample); the module widens them where it must.
    """

    def __init__(self, cases: Sequence[CaseArrays]) -> None:
        if any(case.original is None or case.mask is None for case in cases):
            raise ValueError("CaseDataset needs labelled, cached volumes (with their own-grid labels)")
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        assert case.mask is not None and case.original is not None  # checked in __init__
        return {
            "image": torch.from_numpy(standardized_volume(case)),
            # a copy: the cache's uint8 grid is a read-only memory map (torch warns on those)
            "mask": torch.from_numpy(np.array(case.mask[...], dtype=np.uint8)),
            "target": torch.from_numpy(np.ascontiguousarray(case.original.labels_in_slice_order(), np.uint8)),
            "spacing": torch.tensor(case.original.spacing_in_slice_order(), dtype=torch.float64),
            "case_id": case.case_id,
            "slice_index": -1,
            "index": index,
        }
