"""What both passes of the cache share: memory-mapped arrays, atomic array writes, the cache
folder, and one way to bring a manifest up to date (``refresh``).

A manifest (``manifest.json``) holds the settings it was made with and one entry per case; an
entry records its inputs' sizes and modification times and the files it wrote, so an unchanged
case is never decoded again and a re-run on an unchanged data set writes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any, TypeVar, cast

import numpy as np

from pipeline.data.reading.layouts import Case
from pipeline.errors import DataError
from pipeline.files import atomic_write, read_json, write_json
from pipeline.parallel import map_with_progress

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: facts and resampled grids (2: slices per class)
MANIFEST = "manifest.json"
Index = int | slice | EllipsisType | tuple[int | slice | EllipsisType, ...]  # what MappedArray takes
Entry = TypeVar("Entry", bound=Mapping[str, Any])  # a manifest's entry for one case (a JSON object)


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

    def __getitem__(self, index: Index) -> np.ndarray:
        return self.open()[index]

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
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


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: np.save(tmp, array))


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


def _fresh_entries(
    entries: dict[str, dict[str, Any]],
    folder: Path,
    inputs: dict[str, dict[str, list[int]]],
    files: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """The entries whose inputs are unchanged and whose files all exist."""
    return {
        cid: entry
        for cid, entry in entries.items()
        if inputs.get(cid) == entry["inputs"]
        and all((folder / entry[k]).is_file() for k in files if entry[k])
    }


def _drop_gone(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]], folder: Path, files: Sequence[str]
) -> None:
    """Delete the files of the entries of ``old`` that ``new`` no longer has."""
    for gone in set(old) - set(new):
        for key in files:
            if old[gone].get(key):
                (folder / old[gone][key]).unlink(missing_ok=True)


def _made_entry(
    item: tuple[Case, dict[str, list[int]]], make: Callable[[Case], Mapping[str, Any]]
) -> dict[str, Any]:
    case, inputs = item
    return {"inputs": inputs, **make(case)}


def refresh(
    folder: Path,
    settings: dict[str, Any],
    cases: Sequence[Case],
    make: Callable[[Case], Entry],
    files: Sequence[str],
    workers: int = 1,
    description: str = "",
    progress: bool = False,
    keep_others: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Entry]:
    """Bring ``folder``'s manifest up to date for ``cases``; returns their entries by case id.

    An entry is reused when the manifest's settings equal ``settings`` and the case's inputs and
    ``files`` (the entry keys that name files in ``folder``) are unchanged; ``make(case)`` (picklable:
    it runs in ``workers`` processes) decodes the other cases and returns their entries. Entries
    of cases not given are kept with ``keep_others`` (a grid serves every split), else dropped
    with their files. The manifest (``settings``, the ``extra`` keys, ``cases``) is written only
    when it changed.
    """
    old = read_json(folder / MANIFEST)
    reusable = old.get("cases", {}) if old.get("settings") == settings else {}
    inputs = {case.case_id: signature(case) for case in cases}
    fresh = _fresh_entries(reusable, folder, inputs, files)
    stale = [case for case in cases if case.case_id not in fresh]
    if stale:
        log.info("cache %s: %s %d of %d cases", folder, description, len(stale), len(cases))
    work = functools.partial(_made_entry, make=make)
    made = map_with_progress(work, [(c, inputs[c.case_id]) for c in stale], workers, description, progress)
    others = {k: v for k, v in reusable.items() if k not in inputs} if keep_others else {}
    entries = {**others, **fresh, **{c.case_id: e for c, e in zip(stale, made, strict=True)}}
    if not keep_others:
        _drop_gone(old.get("cases", {}), entries, folder, files)
    manifest = {"settings": settings, **(extra or {}), "cases": entries}
    if manifest != old:
        write_json(folder / MANIFEST, manifest, indent=1)
    # make's entries with their inputs, or such entries read back from a manifest made with these
    # settings (the cache version among them)
    return {case.case_id: cast(Entry, entries[case.case_id]) for case in cases}
