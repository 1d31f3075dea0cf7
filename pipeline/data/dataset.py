"""Slice datasets yielding the sample dict of the data contract.

A sample is ``{"image": float32 (C, H, W), "mask": int64 (H, W), "case_id": str,
"slice_index": int}`` with ``slice_index`` -1 for 2D images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.io import DataError, read_image_2d, read_mask_2d
from pipeline.data.layouts import Case
from pipeline.data.normalization import IntensityStats, Normalization, fit_intensity, standardize, to_unit


@dataclass
class CaseArrays:
    """One case in memory (or memory-mapped).

    Attributes:
        case_id: the case's name.
        image: (S, H, W, C) raw intensities, S slices (1 for a 2D image).
        mask: (S, H, W) uint8 class indices, or None for unlabelled cases.
        stats: intensity statistics of the whole case (see ``pipeline.data.normalization``).
        is_volume: False for 2D images (their ``slice_index`` is -1).
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    stats: IntensityStats
    is_volume: bool = False


def check_labels(mask: np.ndarray, num_classes: int, path: object, class_names: Sequence[str]) -> None:
    """Raise a ``DataError`` for ``path`` when ``mask`` holds a value outside 0..num_classes-1."""
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(
            path,
            f"label value(s) {bad.tolist()} not in the classes 0..{num_classes - 1} ({', '.join(class_names)})",
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
    case: Case, norm: Normalization, class_names: Sequence[str], label_map: dict[int, int] | None = None
) -> CaseArrays:
    """Read one 2D image (and its mask), check them, and measure intensity statistics."""
    image = read_image_2d(case.images[0])
    if image.ndim == 2:
        image = image[..., None]
    mask = None
    if case.mask is not None:
        mask = apply_label_map(read_mask_2d(case.mask), label_map)
        if mask.shape != image.shape[:2]:
            raise DataError(
                case.mask,
                f"mask size {mask.shape} differs from image size {image.shape[:2]} ({case.images[0]})",
            )
        check_labels(mask, len(class_names), case.mask, class_names)
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
    """

    def __init__(
        self, cases: Sequence[CaseArrays], transform, slices: Sequence[tuple[int, int]] | None = None
    ):
        self.cases = list(cases)
        self.transform = transform
        self.slices = (
            list(slices)
            if slices is not None
            else [(c, s) for c, case in enumerate(self.cases) for s in range(case.image.shape[0])]
        )

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict:
        c, s = self.slices[index]
        case = self.cases[c]
        unit = to_unit(np.asarray(case.image[s]), case.stats)
        mask = np.asarray(case.mask[s]) if case.mask is not None else np.zeros(unit.shape[:2], np.uint8)
        out = self.transform(image=unit, mask=mask)
        image = standardize(out["image"], case.stats).transpose(2, 0, 1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(out["mask"].astype(np.int64)),
            "case_id": case.case_id,
            "slice_index": s if case.is_volume else -1,
        }
