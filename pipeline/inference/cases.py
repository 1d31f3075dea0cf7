"""Inputs of ``medseg infer``: find the cases, name them safely, load and preprocess each one.

An input is a volume file (NIfTI ``.nii``/``.nii.gz``, ``.mha``/``.mhd``, ``.nrrd``/``.nhdr``), a DICOM
series (a folder holding DICOM files: one folder, one series), or a 2D image (PNG/TIFF/JPEG/...):
the reader registry (``pipeline.data.reading.registry``) decides by file ending. A folder that is
not a DICOM series holds many inputs (its sub-folders are searched the same way). With a
multi-channel model, nnU-Net-style channel files ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``,
... (any volume ending) form one case.

Preprocessing is the validation path of training: the same readers, the same slicing of the
canonical RAS+ volume, the same resampling to the training spacing, and ``standardize(to_unit(x))``
with the case's own statistics.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.cache.resample import onto_training_grid
from pipeline.data.cache.slicing import in_slice_order
from pipeline.data.loading.datasets import CaseArrays, load_case_2d, standardized_volume
from pipeline.data.normalization import case_stats
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.reading.layouts import CHANNEL_FILE, Case
from pipeline.data.reading.registry import FORMATS, case_stem, format_of, is_supported, supported_endings
from pipeline.data.reading.volumes import load_volume_case
from pipeline.errors import DataError

UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class InputCase:
    """One case to segment.

    Attributes:
        name: output name (safe as a file name: no separators, no leading dot, never ``..``).
        paths: the image file, its channel files in channel order, or the DICOM folder.
        kind: the registry's format name (``nifti``, ``itk``, ``dicom``, ``image``) or
            ``unsupported`` (fails on load, saying why).
    """

    name: str
    paths: tuple[Path, ...]
    kind: str

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def is_volume(self) -> bool:
        return any(f.volume for f in FORMATS if f.name == self.kind)


def safe_name(raw: str) -> str:
    """A file-name-safe case name: runs of other characters become ``_``; no leading dots."""
    name = UNSAFE.sub("_", raw).lstrip(".")
    return name or "case"


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"  # the DICOM preamble is 128 bytes, then the magic
    except OSError:
        return False


def _visible(folder: Path) -> list[Path]:
    # hidden entries are skipped: they include atomic_write's temporary files
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _kind(path: Path) -> str:
    """The registry's format name of a file, or ``unsupported``."""
    return format_of(path).name if is_supported(path) else "unsupported"


def _walk(path: Path) -> list[InputCase]:
    if path.is_file():
        return [InputCase(safe_name(case_stem(path)), (path,), _kind(path))]
    entries = _visible(path)
    if any(p.is_file() and _is_dicom_file(p) for p in entries):
        return [InputCase(safe_name(path.name), (path,), "dicom")]
    return [case for entry in entries for case in _walk(entry)]


def _group_channels(cases: list[InputCase]) -> list[InputCase]:
    """Merge volume files ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... of one folder into one case."""
    groups: dict[tuple[Path, str], list[InputCase]] = defaultdict(list)
    out = []
    for case in cases:
        match = CHANNEL_FILE.match(case_stem(case.path)) if case.is_volume and case.kind != "dicom" else None
        if match:
            groups[(case.path.parent, match["case"])].append(case)
        else:
            out.append(case)
    for (_, stem), members in groups.items():
        paths = tuple(sorted((m.path for m in members), key=lambda p: p.name))
        out.append(InputCase(safe_name(stem), paths, members[0].kind))
    return out


def find_inputs(inputs: Sequence[str | Path], in_channels: int = 1) -> list[InputCase]:
    """All cases under ``inputs`` (files and folders), sorted by name.

    Raises:
        DataError: an input does not exist, nothing was found, or two inputs would write the
            same output name.
    """
    cases: list[InputCase] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(path, _missing(path))
        cases.extend(_walk(path))
    if in_channels > 1:
        cases = _group_channels(cases)
    if not cases:
        raise DataError(", ".join(str(p) for p in inputs), "no inputs found")
    cases.sort(key=lambda c: c.name)
    seen: dict[str, Path] = {}
    for case in cases:
        if case.name in seen:
            raise DataError(case.path, f"gives the same output name {case.name!r} as {seen[case.name]}")
        seen[case.name] = case.path
    return cases


def _missing(path: Path) -> str:
    """Why an input that ``exists()`` denies is not there: a symlink loop, a dangling link, or absent."""
    if not path.is_symlink():
        return "input not found"
    try:
        path.resolve(strict=True)
    except (OSError, RuntimeError) as err:  # Python < 3.13 raises RuntimeError on a loop
        if isinstance(err, RuntimeError) or err.errno == errno.ELOOP:
            return "symbolic link loop (Too many levels of symbolic links)"
    return f"dangling symbolic link to {os.readlink(path)}"


def spacing_warning(name: str, spacing: Sequence[float], prep: Preprocessing) -> str | None:
    """A warning when a scan's spacing (mm, X, Y, Z of the RAS+ array) lies far outside the training
    cases' range (below half their finest or above twice their coarsest, on some axis)."""
    if prep.spacing_range is None:
        return None
    low, high = (np.asarray(r, float) for r in prep.spacing_range)
    value = np.asarray(spacing, float)
    if np.all(value >= low / 2) and np.all(value <= high * 2):
        return None
    shown = "x".join(f"{v:.3g}" for v in value)
    trained = " x ".join(f"{a:.3g}-{b:.3g}" for a, b in zip(low, high, strict=True))
    return (
        f"{name}: spacing {shown} mm is far outside the training cases' ({trained} mm); it is resampled "
        "to the training spacing, but expect lower accuracy"
    )


def load_case(case: InputCase, prep: Preprocessing) -> dict:
    """Read and preprocess one case, as validation does (``pipeline.data.cache.facts``): a volume is cut
    along the slice axis and resampled to the training spacing.

    Returns:
        ``{"case": InputCase, "image": float32 (C, S, H, W) network input (S = 1 for a 2D image),
        "size": (S0, H0, W0) the case's own grid in slice order, "geometry": the ``Volume``
        without its intensities (None for 2D), "shape": stored spatial shape, "spacing": stored
        voxel size in mm (None for 2D), "warning": a spacing warning or None}``.

    Raises:
        DataError: the file cannot be read, or does not fit the model.
    """
    if case.kind == "unsupported":
        raise DataError(
            case.path,
            f"not a supported input (files ending {', '.join(supported_endings())}, or a DICOM series folder)",
        )
    geometry, spacing, warning = None, None, None
    shape: tuple[int, ...]  # stored spatial shape: (X, Y, Z) of a volume, (H, W) of an image
    if case.is_volume:
        volume, _ = load_volume_case(Case(case.name, case.paths, None), prep.class_names)
        _check_channels(case, volume.array.shape[-1], prep)
        axis = prep.slice_axis
        image = onto_training_grid(volume.array, volume.spacing, prep.target_spacing or volume.spacing, axis)
        arrays = CaseArrays(case.name, image, None, case_stats(image, prep.normalization), True)
        geometry = dataclasses.replace(volume, array=np.empty(0, np.float32))  # no second copy over IPC
        size, shape = in_slice_order(volume.array.shape[:3], axis), volume.source_shape
        spacing = tuple(float(s) for s in np.linalg.norm(volume.source_affine[:3, :3], axis=0))
        warning = spacing_warning(case.name, volume.spacing, prep)
    else:
        # one setting for all channels is passed as one, so a wrong channel count gets the message below
        norm = prep.normalization[0] if len(set(prep.normalization)) == 1 else prep.normalization
        arrays = load_case_2d(Case(case.name, case.paths, None), norm, prep.class_names)
        _check_channels(case, arrays.image.shape[-1], prep)
        size, shape = arrays.image.shape[:3], arrays.image.shape[1:3]
    return {
        "case": case,
        "image": torch.from_numpy(standardized_volume(arrays)),
        "size": tuple(int(n) for n in size),
        "geometry": geometry,
        "shape": tuple(int(s) for s in shape),
        "spacing": spacing,
        "warning": warning,
    }


def _check_channels(case: InputCase, channels: int, prep: Preprocessing) -> None:
    if channels != prep.in_channels:
        raise DataError(case.path, f"has {channels} channel(s); the model expects {prep.in_channels}")


def describe(err: BaseException) -> str:
    """One line naming the problem; ``DataError`` already names its file."""
    if isinstance(err, DataError):
        return err.problem
    return f"{type(err).__name__}: {err}"


class InferenceDataset(Dataset):
    """One item per case (loaded and preprocessed in a loader worker); a failure becomes an item too.

    Items are ``load_case`` dicts plus ``"seconds"`` (load time) and ``"index"`` (the case's
    position), or ``{"case", "index", "error"}`` when the case cannot be loaded, so one bad file is reported and the rest carry on.
    """

    def __init__(self, cases: Sequence[InputCase], prep: Preprocessing) -> None:
        self.cases = list(cases)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        start = time.perf_counter()
        try:
            item = load_case(case, self.prep)
        except Exception as err:  # any reader failure: report this case, keep going with the rest
            return {"case": case, "index": index, "error": describe(err)}
        item["seconds"] = time.perf_counter() - start
        item["index"] = index
        return item


def first_item(items: list[dict]) -> dict:
    """Collate for a loader with ``batch_size=1``: the case dict itself, nothing stacked."""
    return items[0]
