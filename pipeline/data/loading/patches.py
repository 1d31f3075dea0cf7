"""3D training patches of cached volumes, for 3D networks (``PatchAugmenter3D`` does the work).

One dataset item is one case; the training sampler (``pipeline.data.loading.sampling.ForegroundSampler``)
draws cases, and for a third of its draws (nnU-Net's share) a foreground class first, then a case
that shows it: the patch is then placed on a voxel of that class, drawn from the case's cached
class voxels (``pipeline.data.cache.grids.class_voxels``), so small structures are seen as often as
large ones, as in 2D.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.augment.transforms3d import PatchAugmenter3D
from pipeline.data.cache.grids import locations_by_class
from pipeline.data.loading.datasets import CaseArrays


class PatchDataset(Dataset):
    """Augmented 3D patches: ``dataset[case]`` a patch anywhere in the case, ``dataset[(case,
    label)]`` one placed on a voxel of class ``label``.

    A sample is ``{"image": float32 (C, D, H, W), "mask": int64 (D, H, W), "case_id", "slice_index":
    -1, "index"}``.

    Args:
        cases: cached cases with masks and class voxels (``CaseArrays.where``).
        patch_size: (D, H, W) voxels.
        augmenter: the seeded crop and augmentation (reseeded per sample by the loader).
    """

    def __init__(
        self, cases: Sequence[CaseArrays], patch_size: Sequence[int], augmenter: PatchAugmenter3D
    ) -> None:
        if any(case.mask is None or case.where is None for case in cases):
            raise ValueError("PatchDataset needs cached, labelled volumes (with their class voxels)")
        self.cases = list(cases)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.augmenter = augmenter
        self._locations: dict[int, dict[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def class_items(self) -> dict[int, np.ndarray]:
        """Foreground class -> sorted indices of the cases that show it."""
        items: dict[int, list[int]] = {}
        for index, case in enumerate(self.cases):
            for label in case.class_slices or {}:
                items.setdefault(int(label), []).append(index)
        return {label: np.array(found) for label, found in sorted(items.items())}

    def _class_locations(self, index: int) -> dict[int, np.ndarray]:
        if index not in self._locations:  # read once per case and process
            where = self.cases[index].where
            assert where is not None  # checked in __init__
            self._locations[index] = locations_by_class(where[...])
        return self._locations[index]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, label = key if isinstance(key, tuple) else (key, 0)
        case = self.cases[index]
        assert case.mask is not None  # checked in __init__
        center = None
        if label:
            center = self.augmenter.draw_center(self._class_locations(index)[label])
        image, mask = self.augmenter(case.image, case.mask, case.stats, self.patch_size, center, label)
        return {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "case_id": case.case_id,
            "slice_index": -1,
            "index": index,
        }
