"""Where a data module's cases come from: 2D images read into memory, or volumes through the cache.

Both give the data module the input channel count, foreground intensities of the cases it names
(the training cases: for data-set normalisation statistics), and ``CaseArrays`` with (S, H, W, C)
images. 2D images are small and are simply read; volumes are decoded once into the
memory-mapped cache (``pipeline.data.cache.facts``): their facts (the plan's fingerprint) first, then
their arrays resampled to the plan's grid.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.cache import facts as cache
from pipeline.data.cache import grids
from pipeline.data.loading.datasets import CaseArrays, apply_label_map, load_case_2d
from pipeline.data.normalization import Normalization
from pipeline.data.planning.fingerprint import CaseFacts
from pipeline.data.reading.formats import read_image_2d, read_mask_2d
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.volumes import is_volume_case, probe
from pipeline.errors import DataError


class ImageSource:
    """2D images (one slice each), read into memory when loaded."""

    volumetric = False

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

    def foreground_sample(self, ids: Sequence[str]) -> np.ndarray:
        """(N, C) foreground intensities of the cases ``ids`` (reads each image once)."""
        parts = []
        for cid in ids:
            case = self.cases[cid]
            if case.mask is None:
                raise DataError(case.images[0], "has no mask: the foreground statistics need labelled cases")
            image = read_image_2d(case.images[0])
            mask = apply_label_map(read_mask_2d(case.mask), self.label_map)
            parts.append(cache.sample_foreground(image.reshape(*mask.shape, -1), mask, case.case_id))
        return np.concatenate(parts)

    def load(self, ids: Sequence[str], norms: Sequence[Normalization]) -> list[CaseArrays]:
        return [load_case_2d(self.cases[cid], norms, self.class_names, self.label_map) for cid in ids]


class VolumeSource:
    """Volumes read through the cache, which is built or updated on first use.

    Args:
        cases: the volume cases.
        class_names: the classes (labels outside them are an error).
        label_map: ``{stored value: class index}`` for masks.
        cache_dir: the cache folder.
        layout: the layout name, recorded in the manifest.
        workers: processes decoding cases side by side (a progress bar shows on a terminal).
    """

    volumetric = True

    def __init__(
        self,
        cases: Sequence[Case],
        class_names: Sequence[str],
        label_map: dict[int, int] | None,
        cache_dir: Path,
        layout: str,
        workers: int = 1,
    ) -> None:
        self.cases = {case.case_id: case for case in cases}
        self.class_names, self.label_map = list(class_names), label_map
        self.cache_dir, self.layout, self.workers = Path(cache_dir), layout, workers
        self._facts: dict[str, cache.FactsEntry] | None = None
        self.grid: str | None = None  # the key of the last grid loaded

    def channels(self) -> int:
        return probe(next(iter(self.cases.values())))[1]

    def facts_entries(self) -> dict[str, cache.FactsEntry]:
        """Every case's cache facts, after bringing them up to date (once per source)."""
        if self._facts is None:
            self._facts = cache.prepare_facts(
                list(self.cases.values()), self.cache_dir, self.class_names, self.label_map,
                self.layout, self.workers, progress=sys.stderr.isatty(),
            )  # fmt: skip
        return self._facts

    def prepare(self) -> None:
        self.facts_entries()

    def facts(self, ids: Sequence[str]) -> list[CaseFacts]:
        """The planner's facts of the cases ``ids``."""
        entries = self.facts_entries()
        return [cache.case_facts(cid, entries[cid]) for cid in ids]

    def foreground_sample(self, ids: Sequence[str]) -> np.ndarray | None:
        """(N, C) foreground intensities of the cases ``ids``, from the cache."""
        entries = self.facts_entries()
        return cache.foreground_sample(self.cache_dir, [entries[cid] for cid in ids])

    def load(
        self,
        ids: Sequence[str],
        norms: Sequence[Normalization],
        target_spacing: Sequence[float],
        slice_axis: int,
    ) -> list[CaseArrays]:
        """The cases ``ids`` resampled to ``target_spacing`` (RAS, mm) and cut along ``slice_axis``."""
        facts = self.facts_entries()
        key, grid = grids.prepare_grid(
            [self.cases[cid] for cid in ids], self.cache_dir, target_spacing, slice_axis,
            self.class_names, self.label_map, self.workers, progress=sys.stderr.isatty(),
        )  # fmt: skip
        self.grid = key
        return [
            grids.open_case(self.cache_dir, key, cid, facts[cid], grid[cid], norms, slice_axis) for cid in ids
        ]


def case_source(
    root: Path,
    cases: Sequence[Case],
    class_names: Sequence[str],
    label_map: dict[int, int] | None,
    cache_dir: Path,
    layout: str,
    workers: int = 1,
) -> ImageSource | VolumeSource:
    """The source for ``cases``, which must be all 2D images or all volumes."""
    if not cases:
        raise DataError(root, f"no cases found ({layout} layout): the data set is empty")
    kinds = {is_volume_case(case) for case in cases}
    if len(kinds) > 1:
        raise DataError(root, "mixes 2D images and volumes; keep one kind per data set")
    if kinds.pop():
        return VolumeSource(cases, class_names, label_map, cache_dir, layout, workers)
    return ImageSource(cases, class_names, label_map)
