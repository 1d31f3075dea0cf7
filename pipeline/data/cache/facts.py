"""Volumes decoded once into a memory-mapped cache, in two passes.

Facts (per case, whatever the plan): the case's spacing, shape, class voxel counts and a sample of
foreground intensities (the fingerprint the plan is made from), and its labels on its own grid
(where validation scores it)::

    <cache>/manifest.json              settings and one entry per case (inputs' sizes and mtimes)
    <cache>/cases/<case>.label.npy     (X, Y, Z) uint8 labels, RAS+ order, the case's own grid
    <cache>/cases/<case>.fg.npy        (N, C) float32: up to 10,000 foreground intensities

Grids (per target spacing and slice axis, ``pipeline.data.cache.grids``): the case resampled to the
plan's spacing (``pipeline.data.cache.resample``) and cut along the slice axis, so a slice, or a 3D
patch, is a small contiguous read::

    <cache>/grids/<key>/manifest.json
    <cache>/grids/<key>/<case>.image.npy      (S, H, W, C) float32 intensities
    <cache>/grids/<key>/<case>.mask.npy       (S, H, W) uint8 class indices
    <cache>/grids/<key>/<case>.where.npy      (N, 4) int32 (class, s, h, w): up to 10,000 voxels
                                              of each foreground class, for foreground patches

An entry records its inputs' sizes and modification times; unchanged cases are not decoded again,
so re-running on an unchanged data set writes nothing (``pipeline.data.cache.store.refresh``). Both
passes spread cases over workers.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, cast

import numpy as np

from pipeline.data.cache.store import CACHE_VERSION, cache_folder, refresh, save_array
from pipeline.data.planning.fingerprint import CaseFacts
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.volumes import load_volume_case

SAMPLE = 10_000  # foreground intensities per case; voxels per class per case for foreground patches
FACT_FILES = ("label", "foreground_sample")


class FactsEntry(TypedDict):
    """A case's facts in ``<cache>/manifest.json``; ``store.refresh`` adds the case's ``inputs``.

    Attributes:
        spacing: voxel size along X, Y, Z of the RAS+ array, mm.
        shape: voxels along X, Y, Z.
        channels: image channels.
        label: the own-grid labels' file, relative to the cache folder; None for an unlabelled case.
        foreground_sample: the foreground intensities' file, likewise.
        class_voxels: class index (a string: JSON keys) -> voxels; absent classes omitted.
    """

    spacing: list[float]
    shape: list[int]
    channels: int
    label: str | None
    foreground_sample: str | None
    class_voxels: dict[str, int]


def case_rng(case_id: str) -> np.random.Generator:
    """A generator seeded by the case id: samples drawn for a case do not depend on the others."""
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def sample_foreground(image: np.ndarray, mask: np.ndarray, case_id: str) -> np.ndarray:
    """(N, C) float32 intensities of up to ``SAMPLE`` foreground voxels, drawn with a seed derived
    from ``case_id``. ``image``: (..., C); ``mask``: its spatial shape."""
    foreground = image[mask > 0]
    if len(foreground) > SAMPLE:
        foreground = foreground[np.sort(case_rng(case_id).choice(len(foreground), SAMPLE, replace=False))]
    return foreground.astype(np.float32)


def _facts_entry(
    case: Case, cache_dir: Path, class_names: Sequence[str], label_map: dict[int, int] | None
) -> FactsEntry:
    """Decode one case; write its own-grid labels and foreground sample; return its facts entry."""
    volume, mask = load_volume_case(case, class_names, label_map)
    entry: FactsEntry = {
        "spacing": list(volume.spacing),
        "shape": list(volume.array.shape[:3]),
        "channels": int(volume.array.shape[-1]),
        "label": None,
        "foreground_sample": None,
        "class_voxels": {},
    }
    if mask is not None:
        label, sample = f"cases/{case.case_id}.label.npy", f"cases/{case.case_id}.fg.npy"
        entry["label"], entry["foreground_sample"] = label, sample
        save_array(cache_dir / label, np.ascontiguousarray(mask))
        save_array(cache_dir / sample, sample_foreground(volume.array, mask, case.case_id))
        counts = np.bincount(mask.ravel(order="K"), minlength=len(class_names))  # uint8: no sort
        entry["class_voxels"] = {str(k): int(n) for k, n in enumerate(counts) if n}
    return entry


def prepare_facts(
    cases: Sequence[Case],
    cache_dir: str | Path,
    class_names: Sequence[str],
    label_map: dict[int, int] | None = None,
    layout: str = "",
    workers: int = 1,
    progress: bool = False,
) -> dict[str, FactsEntry]:
    """Bring the facts of ``cases`` up to date; returns the entry of each case (by case id).

    Raises:
        DataError: an input cannot be read or is inconsistent (naming the file), or the cache
            folder cannot be written.
    """
    cache_dir = cache_folder(cache_dir)
    settings = {
        "version": CACHE_VERSION,
        "label_map": {str(k): int(v) for k, v in (label_map or {}).items()},
        "class_names": list(class_names),
    }
    make = functools.partial(_facts_entry, cache_dir=cache_dir, class_names=class_names, label_map=label_map)
    return refresh(
        cache_dir, settings, cases, make, FACT_FILES, workers, "reading cases", progress,
        extra={"layout": layout},
    )  # fmt: skip


def case_facts(case_id: str, entry: FactsEntry) -> CaseFacts:
    """A facts entry as the planner's ``CaseFacts``."""
    voxels = {int(k): int(v) for k, v in entry["class_voxels"].items()}
    spacing, shape = tuple(entry["spacing"]), tuple(entry["shape"])
    # three values each: _facts_entry writes the volume's X, Y, Z
    return CaseFacts(
        case_id, cast(tuple[float, float, float], spacing), cast(tuple[int, int, int], shape), voxels
    )


def foreground_sample(cache_dir: str | Path, entries: Sequence[FactsEntry]) -> np.ndarray | None:
    """(N, C) foreground intensities of the given cases, concatenated; None when none has any."""
    parts = [np.load(Path(cache_dir) / e["foreground_sample"]) for e in entries if e["foreground_sample"]]
    return np.concatenate(parts) if parts else None
