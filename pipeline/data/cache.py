"""Decode volumes once into a per-case array cache, read back with memory mapping.

Training reads 2D slices; decompressing a ``.nii.gz`` for every slice would dominate the loop.
``prepare_cache`` writes, for each case, its canonical (RAS+) arrays already cut along the slice
axis, so one slice is one contiguous block of a ``.npy`` file::

    <cache>/manifest.json               settings, resolved slice axis, one entry per case
    <cache>/cases/<case>.image.npy      (S, H, W, C) raw intensities (float32 for float inputs)
    <cache>/cases/<case>.mask.npy       (S, H, W) uint8 class indices
    <cache>/cases/<case>.fg.npy         (N, C) float32: up to 10,000 foreground intensities, for
                                        data-set statistics (CT normalisation)

A case entry records its inputs' sizes and modification times; a case whose inputs and settings
are unchanged is not decoded again, so re-running on an unchanged data set writes nothing.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.dataset import CaseArrays, slices_per_class
from pipeline.data.layouts import Case
from pipeline.data.normalization import Normalization, case_stats, intensity_moments
from pipeline.data.slicing import resolve_slice_axis, to_slices
from pipeline.data.volumes import load_volume_case, probe
from pipeline.errors import DataError
from pipeline.files import atomic_write

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: slices per class (class_slices) instead of foreground_slices
MANIFEST = "manifest.json"
FOREGROUND_SAMPLE = 10_000
ARRAYS = ("image", "mask", "foreground_sample")  # manifest entry keys naming the case's files


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
    """The cache's manifest, or None when there is none (or it is unreadable: rebuilt then)."""
    try:
        return json.loads((Path(cache_dir) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _signature(case: Case) -> dict[str, list[int]]:
    """Size and modification time (ns) of every input file of ``case`` (DICOM: every file)."""
    paths = [p for image in case.images for p in (sorted(image.iterdir()) if image.is_dir() else [image])]
    paths += [case.mask] if case.mask is not None else []
    signature = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError as err:
            raise DataError(path, f"cannot read ({err.strerror})") from None
        signature[str(path)] = [stat.st_size, stat.st_mtime_ns]
    return signature


def sample_foreground(image: np.ndarray, mask: np.ndarray, case_id: str) -> np.ndarray:
    """(N, C) float32 intensities of up to ``FOREGROUND_SAMPLE`` foreground voxels, drawn with a
    seed derived from ``case_id``. ``image``: (..., C); ``mask``: its spatial shape."""
    foreground = image[mask > 0]
    if len(foreground) > FOREGROUND_SAMPLE:
        rng = np.random.default_rng(zlib.crc32(case_id.encode()))
        foreground = foreground[np.sort(rng.choice(len(foreground), FOREGROUND_SAMPLE, replace=False))]
    return foreground.astype(np.float32)


def _save(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))


def _write_case(case: Case, cache_dir: Path, axis: int, class_names, label_map, inputs: dict) -> dict:
    """Decode, check and cache one case; returns its manifest entry."""
    volume, mask = load_volume_case(case, class_names, label_map)
    array = volume.array if np.issubdtype(volume.array.dtype, np.integer) else volume.array.astype(np.float32)
    image = np.ascontiguousarray(to_slices(array, axis))
    _save(cache_dir / "cases" / f"{case.case_id}.image.npy", image)
    entry = {
        "inputs": inputs,
        "image": f"cases/{case.case_id}.image.npy",
        "mask": None,
        "foreground_sample": None,
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "spacing": list(volume.spacing),
        "affine": volume.affine.tolist(),
        "slice_axis": axis,
        "moments": intensity_moments(image),
        "class_slices": {},
        "labels": [],
    }
    if mask is not None:
        slices = np.ascontiguousarray(to_slices(mask, axis))
        _save(cache_dir / "cases" / f"{case.case_id}.mask.npy", slices)
        _save(cache_dir / "cases" / f"{case.case_id}.fg.npy", sample_foreground(image, slices, case.case_id))
        entry["mask"] = f"cases/{case.case_id}.mask.npy"
        entry["foreground_sample"] = f"cases/{case.case_id}.fg.npy"
        entry["labels"] = np.unique(slices).tolist()
        entry["class_slices"] = {str(label): found for label, found in slices_per_class(slices).items()}
    return entry


def prepare_cache(
    cases: Sequence[Case],
    cache_dir: str | Path,
    class_names: Sequence[str],
    slice_axis: int | str = "auto",
    label_map: dict[int, int] | None = None,
    layout: str = "",
) -> tuple[dict, int]:
    """Bring the cache of ``cases`` up to date; returns the manifest and how many cases were decoded.

    Args:
        cases: volume cases (NIfTI or DICOM), with masks for training.
        cache_dir: the cache folder (created if needed).
        class_names: classes of the data set (labels outside them are an error).
        slice_axis: 0, 1, 2 or ``"auto"`` (the coarsest median spacing over ``cases``).
        label_map: ``{stored value: class index}`` applied to masks.
        layout: the layout name, recorded in the manifest.

    Raises:
        DataError: an input cannot be read or is inconsistent (naming the file), or the cache
            folder cannot be written.
    """
    cache_dir = Path(cache_dir)
    try:
        (cache_dir / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            cache_dir, f"cannot create the cache ({err.strerror}); set data.cache_dir / --cache"
        ) from None
    settings = {
        "version": CACHE_VERSION,
        "slice_axis_setting": slice_axis,
        "label_map": {str(k): int(v) for k, v in (label_map or {}).items()},
        "class_names": list(class_names),
    }
    old = read_manifest(cache_dir) or {}
    reusable = old.get("cases", {}) if old.get("settings") == settings else {}
    inputs = {case.case_id: _signature(case) for case in cases}
    fresh = {
        cid: e
        for cid, e in reusable.items()
        if inputs.get(cid) == e["inputs"] and all((cache_dir / e[k]).is_file() for k in ARRAYS if e[k])
    }
    spacings = [fresh[c.case_id]["spacing"] if c.case_id in fresh else probe(c)[0] for c in cases]
    axis = resolve_slice_axis(slice_axis, spacings) if cases else 2
    stale = [c.case_id for c in cases if c.case_id not in fresh or fresh[c.case_id]["slice_axis"] != axis]
    if stale:
        log.info("cache %s: decoding %d of %d cases (slice axis %d)", cache_dir, len(stale), len(cases), axis)
    entries = {
        case.case_id: _write_case(case, cache_dir, axis, class_names, label_map, inputs[case.case_id])
        if case.case_id in stale
        else fresh[case.case_id]
        for case in cases
    }
    for gone in set(old.get("cases", {})) - set(entries):
        for key in ARRAYS:
            if old["cases"][gone].get(key):
                (cache_dir / old["cases"][gone][key]).unlink(missing_ok=True)
    manifest = {"settings": settings, "layout": layout, "slice_axis": axis, "cases": entries}
    if manifest != old:
        atomic_write(cache_dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    return manifest, len(stale)


def open_case(cache_dir: str | Path, case_id: str, entry: dict, norms: Sequence[Normalization]) -> CaseArrays:
    """A cached case as memory-mapped ``CaseArrays``, with its intensity statistics for ``norms``
    (from the manifest's moments where they suffice, else measured on the cached image)."""
    cache_dir = Path(cache_dir)
    image = MappedArray(cache_dir / entry["image"], entry["shape"])
    mask = MappedArray(cache_dir / entry["mask"], entry["shape"][:3]) if entry["mask"] else None
    stats = case_stats(image.open(), norms, entry["moments"])
    class_slices = {int(label): slices for label, slices in entry["class_slices"].items()}
    return CaseArrays(case_id, image, mask, stats, is_volume=True, class_slices=class_slices)


def foreground_sample(cache_dir: str | Path, entries: Sequence[dict]) -> np.ndarray | None:
    """(N, C) foreground intensities of the given cases, concatenated; None when none has any."""
    parts = [np.load(Path(cache_dir) / e["foreground_sample"]) for e in entries if e["foreground_sample"]]
    return np.concatenate(parts) if parts else None
