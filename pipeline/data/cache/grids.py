"""The cache's grids: cases resampled to a plan's target spacing and cut along its slice axis.

Per target spacing and slice axis (``grid_key``), ``<cache>/grids/<key>/`` holds, for each case,
``<case>.image.npy`` (S, H, W, C) float32 intensities, ``<case>.mask.npy`` (S, H, W) uint8 class
indices and ``<case>.where.npy`` (N, 4) int32 rows (class, s, h, w): up to 10,000 voxels of each
foreground class, for foreground patches; and a manifest with each case's intensity moments and
the slices that show each class (``pipeline.data.cache.facts`` describes the facts pass before it).
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, cast

import numpy as np

from pipeline.data.augment.transforms3d import class_locations
from pipeline.data.cache.facts import SAMPLE, FactsEntry
from pipeline.data.cache.resample import onto_training_grid, resample_labels
from pipeline.data.cache.slicing import to_slices
from pipeline.data.cache.store import CACHE_VERSION, MappedArray, cache_folder, refresh, save_array
from pipeline.data.loading.datasets import CaseArrays, OriginalGrid, slices_per_class
from pipeline.data.normalization import Normalization, case_stats, intensity_moments
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.volumes import load_volume_case

log = logging.getLogger(__name__)
GRID_FILES = ("image", "mask", "where")


class GridEntry(TypedDict):
    """A case's entry in ``<cache>/grids/<key>/manifest.json``; ``store.refresh`` adds its ``inputs``.

    Attributes:
        image: the (S, H, W, C) intensities' file, relative to the grid's folder.
        mask: the (S, H, W) labels' file, likewise; None for an unlabelled case.
        where: the (N, 4) class voxels' file, likewise; None for an unlabelled case.
        shape: (S, H, W, C) of the image.
        moments: per-channel intensity moments (``intensity_moments``).
        class_slices: foreground class (a string: JSON keys) -> slices that show it.
    """

    image: str
    mask: str | None
    where: str | None
    shape: list[int]
    moments: dict[str, list[float]]
    class_slices: dict[str, list[int]]


def class_voxels(mask: np.ndarray, case_id: str) -> np.ndarray:
    """(N, 4) int32 rows (class, s, h, w): up to ``SAMPLE`` voxels of each foreground class of the
    (S, H, W) ``mask`` (``class_locations``), seeded by ``case_id``."""
    found = class_locations(mask, SAMPLE, zlib.crc32(case_id.encode()))
    rows = [np.column_stack([np.full(len(where), label), where]) for label, where in found.items()]
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def locations_by_class(rows: np.ndarray) -> dict[int, np.ndarray]:
    """``class_voxels`` rows back as class -> (N, 3) voxel coordinates."""
    rows = np.asarray(rows)
    return {int(label): rows[rows[:, 0] == label, 1:] for label in np.unique(rows[:, 0])}


def grid_key(target_spacing: Sequence[float], slice_axis: int) -> str:
    """The folder name of a grid: slice axis and target spacing (RAS, mm)."""
    return f"axis{slice_axis}_" + "x".join(f"{s:.5g}" for s in target_spacing)


def _grid_entry(
    case: Case,
    folder: Path,
    target: Sequence[float],
    axis: int,
    class_names: Sequence[str],
    label_map: dict[int, int] | None,
) -> GridEntry:
    """Decode, resample and cut one case onto the grid; return its grid entry."""
    volume, mask = load_volume_case(case, class_names, label_map)
    image = onto_training_grid(volume.array, volume.spacing, target, axis)
    entry: GridEntry = {
        "image": f"{case.case_id}.image.npy",
        "mask": None,
        "where": None,
        "shape": list(image.shape),
        "moments": intensity_moments(image),
        "class_slices": {},
    }
    save_array(folder / entry["image"], image)
    if mask is not None:
        labels = resample_labels(to_slices(mask, axis), len(class_names), image.shape[:3])
        mask_file, where_file = f"{case.case_id}.mask.npy", f"{case.case_id}.where.npy"
        entry["mask"], entry["where"] = mask_file, where_file
        save_array(folder / mask_file, labels)
        save_array(folder / where_file, class_voxels(labels, case.case_id))
        entry["class_slices"] = {str(k): found for k, found in slices_per_class(labels).items()}
    return entry


def prepare_grid(
    cases: Sequence[Case],
    cache_dir: str | Path,
    target_spacing: Sequence[float],
    slice_axis: int,
    class_names: Sequence[str],
    label_map: dict[int, int] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> tuple[str, dict[str, GridEntry]]:
    """Bring the cases' arrays on the grid (``target_spacing`` RAS mm, ``slice_axis``) up to date.

    Returns:
        The grid key (its folder under ``<cache>/grids``) and each case's grid entry.
    """
    cache_dir = cache_folder(cache_dir)
    key = grid_key(target_spacing, slice_axis)
    folder = cache_dir / "grids" / key
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "version": CACHE_VERSION,
        "target_spacing": [float(s) for s in target_spacing],
        "slice_axis": int(slice_axis),
        "label_map": {str(k): int(v) for k, v in (label_map or {}).items()},
        "class_names": list(class_names),
    }
    work = functools.partial(
        _grid_entry, folder=folder, target=tuple(target_spacing), axis=slice_axis,
        class_names=class_names, label_map=label_map,
    )  # fmt: skip
    entries = refresh(
        folder, settings, cases, work, GRID_FILES, workers, "resampling", progress, keep_others=True
    )
    return key, entries


def open_case(
    cache_dir: str | Path,
    key: str,
    case_id: str,
    facts: FactsEntry,
    grid: GridEntry,
    norms: Sequence[Normalization],
    slice_axis: int,
) -> CaseArrays:
    """A cached case as memory-mapped ``CaseArrays`` on the grid ``key``, with its intensity
    statistics for ``norms`` and its own-grid labels and spacing (where validation scores it)."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / "grids" / key
    image = MappedArray(folder / grid["image"], grid["shape"])
    mask = MappedArray(folder / grid["mask"], grid["shape"][:3]) if grid["mask"] else None
    where = MappedArray(folder / grid["where"], (0, 4)) if grid["where"] else None
    original = None
    if facts["label"]:
        labels = MappedArray(cache_dir / facts["label"], facts["shape"])
        spacing = cast(tuple[float, float, float], tuple(facts["spacing"]))  # X, Y, Z (facts._facts_entry)
        original = OriginalGrid(labels, spacing, slice_axis)
    stats = case_stats(image.open(), norms, grid["moments"])
    class_slices = {int(label): slices for label, slices in grid["class_slices"].items()}
    return CaseArrays(
        case_id, image, mask, stats, is_volume=True, class_slices=class_slices, original=original, where=where
    )
