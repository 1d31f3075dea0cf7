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
so re-running on an unchanged data set writes nothing. Both passes spread cases over workers.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.planning.fingerprint import CaseFacts
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.volumes import load_volume_case
from pipeline.errors import DataError
from pipeline.files import atomic_write, read_json, write_json
from pipeline.parallel import map_with_progress

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: facts and resampled grids (2: slices per class)
MANIFEST = "manifest.json"
SAMPLE = 10_000  # foreground intensities per case; voxels per class per case for foreground patches


def default_cache_dir(root: str | Path) -> Path:
    """Where a data set's cache goes unless set: ``<root>/.medseg-cache``."""
    return Path(root) / ".medseg-cache"


class MappedArray:
    """A ``.npy`` file opened with ``np.load(mmap_mode="r")`` on first access in each process.

    It pickles as its path, so loader workers reopen the file instead of receiving a copy.
    """

    def __init__(self, path: str | Path, shape: Sequence[int]) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self._array: np.ndarray | None = None

    def open(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getitem__(self, index) -> np.ndarray:
        return self.open()[index]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def read_manifest(cache_dir: str | Path) -> dict | None:
    """The cache's facts manifest, or None when there is none (or it is unreadable: rebuilt then)."""
    return read_json(Path(cache_dir) / MANIFEST) or None


def signature(case: Case) -> dict[str, list[int]]:
    """Size and modification time (ns) of every input file of ``case`` (DICOM: every file)."""
    paths = [p for image in case.images for p in (sorted(image.iterdir()) if image.is_dir() else [image])]
    paths += [case.mask] if case.mask is not None else []
    found = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError as err:
            raise DataError(path, f"cannot read ({err.strerror})") from None
        found[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return found


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


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: np.save(tmp, array))


def fresh_entries(entries: dict, folder: Path, inputs: dict[str, dict], files: Sequence[str]) -> dict:
    """The entries whose inputs are unchanged and whose files all exist."""
    return {
        cid: entry
        for cid, entry in entries.items()
        if inputs.get(cid) == entry["inputs"]
        and all((folder / entry[k]).is_file() for k in files if entry[k])
    }


def drop_gone(old: dict, new: dict, folder: Path, files: Sequence[str]) -> None:
    """Delete the files of the entries of ``old`` that ``new`` no longer has."""
    for gone in set(old) - set(new):
        for key in files:
            if old[gone].get(key):
                (folder / old[gone][key]).unlink(missing_ok=True)


def _facts_entry(case: Case, cache_dir: Path, class_names, label_map, inputs: dict) -> dict:
    """Decode one case; write its own-grid labels and foreground sample; return its facts entry."""
    volume, mask = load_volume_case(case, class_names, label_map)
    entry = {
        "inputs": inputs,
        "spacing": list(volume.spacing),
        "shape": list(volume.array.shape[:3]),
        "channels": int(volume.array.shape[-1]),
        "label": None,
        "foreground_sample": None,
        "class_voxels": {},
    }
    if mask is not None:
        entry["label"] = f"cases/{case.case_id}.label.npy"
        entry["foreground_sample"] = f"cases/{case.case_id}.fg.npy"
        save_array(cache_dir / entry["label"], np.ascontiguousarray(mask))
        save_array(
            cache_dir / entry["foreground_sample"], sample_foreground(volume.array, mask, case.case_id)
        )
        labels, counts = np.unique(mask, return_counts=True)
        entry["class_voxels"] = {str(k): int(n) for k, n in zip(labels, counts, strict=True)}
    return entry


FACT_FILES = ("label", "foreground_sample")


def cache_folder(cache_dir: str | Path) -> Path:
    """``cache_dir`` (created), or a ``DataError`` saying how to choose another."""
    cache_dir = Path(cache_dir)
    try:
        (cache_dir / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            cache_dir, f"cannot create the cache ({err.strerror}); set data.cache_dir / --cache"
        ) from None
    return cache_dir


def prepare_facts(
    cases: Sequence[Case],
    cache_dir: str | Path,
    class_names: Sequence[str],
    label_map: dict[int, int] | None = None,
    layout: str = "",
    workers: int = 1,
    progress: bool = False,
) -> dict[str, dict]:
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
    old = read_manifest(cache_dir) or {}
    reusable = old.get("cases", {}) if old.get("settings") == settings else {}
    inputs = {case.case_id: signature(case) for case in cases}
    fresh = fresh_entries(reusable, cache_dir, inputs, FACT_FILES)
    stale = [case for case in cases if case.case_id not in fresh]
    if stale:
        log.info("cache %s: reading %d of %d cases", cache_dir, len(stale), len(cases))
    work = functools.partial(_decode_facts, cache_dir=cache_dir, class_names=class_names, label_map=label_map)
    decoded = map_with_progress(
        work, [(c, inputs[c.case_id]) for c in stale], workers, "reading cases", progress
    )
    entries = {**fresh, **{c.case_id: e for c, e in zip(stale, decoded, strict=True)}}
    entries = {case.case_id: entries[case.case_id] for case in cases}
    drop_gone(old.get("cases", {}), entries, cache_dir, FACT_FILES)
    manifest = {"settings": settings, "layout": layout, "cases": entries}
    if manifest != old:
        write_json(cache_dir / MANIFEST, manifest, indent=1)
    return entries


def _decode_facts(item: tuple[Case, dict], cache_dir: Path, class_names, label_map) -> dict:
    case, inputs = item
    return _facts_entry(case, cache_dir, class_names, label_map, inputs)


def case_facts(case_id: str, entry: dict) -> CaseFacts:
    """A facts entry as the planner's ``CaseFacts``."""
    voxels = {int(k): int(v) for k, v in entry["class_voxels"].items()}
    return CaseFacts(case_id, tuple(entry["spacing"]), tuple(entry["shape"]), voxels)


def foreground_sample(cache_dir: str | Path, entries: Sequence[dict]) -> np.ndarray | None:
    """(N, C) foreground intensities of the given cases, concatenated; None when none has any."""
    parts = [np.load(Path(cache_dir) / e["foreground_sample"]) for e in entries if e["foreground_sample"]]
    return np.concatenate(parts) if parts else None
