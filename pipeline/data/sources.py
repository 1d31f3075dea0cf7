"""Where a data module's cases come from: 2D images read into memory, or volumes through the cache.

Both give the data module the same three things: the input channel count, a sample of
foreground intensities (for data-set normalisation statistics), and ``CaseArrays`` with
(S, H, W, C) images. 2D images are small and are simply read; volumes are decoded once into the
memory-mapped slice cache (``pipeline.data.cache``) and read from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data import cache
from pipeline.data.dataset import CaseArrays, apply_label_map, load_case_2d
from pipeline.data.io import read_image_2d, read_mask_2d
from pipeline.data.layouts import Case
from pipeline.data.normalization import Normalization
from pipeline.data.volumes import is_volume_case, probe
from pipeline.errors import DataError


class ImageSource:
    """2D images (one slice each), read into memory when loaded."""

    volumetric = False
    slice_axis: int | None = None

    def __init__(
        self, cases: Sequence[Case], class_names: Sequence[str], label_map: dict[int, int] | None
    ) -> None:
        self.cases = {case.case_id: case for case in cases}
        self.class_names, self.label_map = list(class_names), label_map

    def channels(self) -> int:
        image = read_image_2d(next(iter(self.cases.values())).images[0])
        return 1 if image.ndim == 2 else image.shape[-1]

    def prepare(self) -> None:
        """Nothing to prepare for 2D images."""

    def foreground_sample(self) -> np.ndarray:
        """(N, C) foreground intensities of every case (reads every image once)."""
        parts = []
        for case in self.cases.values():
            image = read_image_2d(case.images[0])
            mask = apply_label_map(read_mask_2d(case.mask), self.label_map)
            parts.append(cache.sample_foreground(image.reshape(*mask.shape, -1), mask, case.case_id))
        return np.concatenate(parts)

    def load(self, ids: Sequence[str], norms: Sequence[Normalization]) -> list[CaseArrays]:
        return [load_case_2d(self.cases[cid], norms, self.class_names, self.label_map) for cid in ids]


class VolumeSource:
    """Volumes read through the slice cache, which is built or updated on first use.

    Args:
        cases: the volume cases.
        class_names: the classes (labels outside them are an error).
        label_map: ``{stored value: class index}`` for masks.
        cache_dir: the cache folder.
        slice_axis: 0, 1, 2 or ``"auto"``.
        layout: the layout name, recorded in the manifest.
    """

    volumetric = True

    def __init__(
        self,
        cases: Sequence[Case],
        class_names: Sequence[str],
        label_map: dict[int, int] | None,
        cache_dir: Path,
        slice_axis: int | str,
        layout: str,
    ) -> None:
        self.cases = list(cases)
        self.class_names, self.label_map = list(class_names), label_map
        self.cache_dir, self.slice_axis_setting, self.layout = Path(cache_dir), slice_axis, layout
        self._manifest: dict | None = None

    def channels(self) -> int:
        return probe(self.cases[0])[1]

    def manifest(self) -> dict:
        """The cache manifest, after bringing the cache up to date (once per source)."""
        if self._manifest is None:
            self._manifest = cache.prepare_cache(
                self.cases,
                self.cache_dir,
                self.class_names,
                self.slice_axis_setting,
                self.label_map,
                self.layout,
            )[0]
        return self._manifest

    prepare = manifest

    @property
    def slice_axis(self) -> int:
        """The resolved slicing axis (0, 1, 2 of the RAS+ array)."""
        return self.manifest()["slice_axis"]

    def foreground_sample(self) -> np.ndarray | None:
        """(N, C) foreground intensities of every case, from the cache."""
        return cache.foreground_sample(self.cache_dir, list(self.manifest()["cases"].values()))

    def load(self, ids: Sequence[str], norms: Sequence[Normalization]) -> list[CaseArrays]:
        entries = self.manifest()["cases"]
        return [cache.open_case(self.cache_dir, cid, entries[cid], norms) for cid in ids]


def case_source(
    root: Path,
    cases: Sequence[Case],
    class_names: Sequence[str],
    label_map: dict[int, int] | None,
    cache_dir: Path,
    slice_axis: int | str,
    layout: str,
) -> ImageSource | VolumeSource:
    """The source for ``cases``, which must be all 2D images or all volumes."""
    if not cases:
        raise DataError(root, f"no cases found ({layout} layout): the data set is empty")
    kinds = {is_volume_case(case) for case in cases}
    if len(kinds) > 1:
        raise DataError(root, "mixes 2D images and volumes; keep one kind per data set")
    if kinds.pop():
        return VolumeSource(cases, class_names, label_map, cache_dir, slice_axis, layout)
    return ImageSource(cases, class_names, label_map)
