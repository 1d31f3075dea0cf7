"""Volume cases (NIfTI, .mha/.nrrd, nnU-Net channel files, DICOM series) read as canonical RAS+ arrays.

The reader is the registry's for the file ending (``pipeline.data.reading.registry``). Image and
mask are both reoriented to RAS+ on load, so a mask stored in another voxel order (or another
format) than its image still lines up; what must agree is the world geometry, which is checked
(``pipeline.data.loading.datasets.pair_problems``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.loading.datasets import apply_label_map, pair_problems
from pipeline.data.reading.formats import Volume
from pipeline.data.reading.layouts import Case
from pipeline.data.reading.registry import format_of, read_header, read_volume
from pipeline.errors import DataError


def is_volume_case(case: Case) -> bool:
    """True for volume files and DICOM series folders, False for 2D images.

    Raises:
        DataError: the image has an ending no reader knows.
    """
    return format_of(case.images[0]).volume


def read_image(case: Case) -> Volume:
    """The case's image as a ``Volume``: (X, Y, Z, C) in RAS+ order, channels stacked."""
    return read_volume(case.images)


def read_mask(path: Path, label_map: dict[int, int] | None = None) -> Volume:
    """A label volume; ``array`` is (X, Y, Z) integer class indices in RAS+ order, in the stored
    integer type (uint8 for most masks: int64 would be 8x the memory of a real-size CT's mask)."""
    volume = read_volume([path])
    if volume.array.shape[-1] != 1:
        raise DataError(
            path, f"mask has {volume.array.shape[-1]} channels; store class indices in one 3D volume"
        )
    labels = volume.array[..., 0]
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise DataError(path, "mask holds non-integer values; store class indices")
    integer = labels if np.issubdtype(labels.dtype, np.integer) else labels.astype(np.int64)
    volume.array = apply_label_map(integer, label_map)
    return volume


def case_problems(
    case: Case, image: Volume, mask: Volume | None, class_names: Sequence[str]
) -> list[DataError]:
    """Every problem of a read case: NaN/Inf intensities, mask shape, geometry and labels."""
    problems = []
    if not np.isfinite(image.array).all():
        problems.append(DataError(case.images[0], "image holds NaN or infinite intensities"))
    if mask is not None:
        affines = (image.affine, mask.affine)
        problems += pair_problems(
            case.images[0], mask.path, image.array.shape[:3], mask.array, class_names, affines
        )
    return problems


def load_volume_case(
    case: Case, class_names: Sequence[str], label_map: dict[int, int] | None = None
) -> tuple[Volume, np.ndarray | None]:
    """Read and check one case: the image ``Volume`` and its (X, Y, Z) uint8 mask (or None).

    Raises:
        DataError: the first problem found, naming the file.
    """
    image = read_image(case)
    mask = read_mask(case.mask, label_map) if case.mask is not None else None
    for problem in case_problems(case, image, mask, class_names):
        raise problem
    return image, None if mask is None else mask.array.astype(np.uint8)


def probe(case: Case) -> tuple[tuple[float, float, float], int]:
    """Voxel size (mm) along X, Y, Z of the canonical RAS+ array, and the channel count, from the
    headers alone (``registry.read_header``)."""
    header = read_header(case.images)
    return header.spacing, header.channels
