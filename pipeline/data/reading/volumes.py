"""Volume cases (NIfTI files, nnU-Net channel files, DICOM series) read as canonical RAS+ arrays.

Image and mask are both reoriented to RAS+ on load (``pipeline.data.reading.formats``), so a mask stored in
another voxel order than its image still lines up; what must agree is the world geometry, which
is checked (``pipeline.data.loading.datasets.pair_problems``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from pipeline.data.loading.datasets import apply_label_map, pair_problems
from pipeline.data.reading.dicom import read_dicom_series
from pipeline.data.reading.formats import Volume, is_nifti, read_nifti
from pipeline.data.reading.layouts import Case
from pipeline.errors import DataError


def is_volume_case(case: Case) -> bool:
    """True for NIfTI files and DICOM series folders, False for 2D images."""
    return case.images[0].is_dir() or is_nifti(case.images[0])


def read_image(case: Case) -> Volume:
    """The case's image as a ``Volume``: (X, Y, Z, C) in RAS+ order, channels stacked."""
    return read_dicom_series(case.images[0]) if case.images[0].is_dir() else read_nifti(case.images)


def read_mask(path: Path, label_map: dict[int, int] | None = None) -> Volume:
    """A NIfTI label volume; ``array`` is (X, Y, Z) int64 class indices in RAS+ order."""
    volume = read_nifti([path])
    if volume.array.shape[-1] != 1:
        raise DataError(
            path, f"mask has {volume.array.shape[-1]} channels; store class indices in one 3D volume"
        )
    labels = volume.array[..., 0]
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise DataError(path, "mask holds non-integer values; store class indices")
    volume.array = apply_label_map(labels.astype(np.int64), label_map)
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
            case.images[0], case.mask, image.array.shape[:3], mask.array, class_names, affines
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
    headers alone where possible (NIfTI); a DICOM series is read whole."""
    if case.images[0].is_dir():
        volume = read_dicom_series(case.images[0])
        return volume.spacing, volume.array.shape[-1]
    channels = 0
    for path in case.images:
        try:
            image = nib.load(str(path))
        except Exception as err:  # nibabel raises many types for missing files and broken headers
            raise DataError(path, f"cannot read as NIfTI ({err})") from None
        channels += image.shape[3] if len(image.shape) == 4 else 1
    zooms = np.linalg.norm(image.affine[:3, :3], axis=0)
    spacing = np.zeros(3)
    for stored_axis, (ras_axis, _) in enumerate(io_orientation(image.affine)):
        spacing[int(ras_axis)] = zooms[stored_axis]
    return (float(spacing[0]), float(spacing[1]), float(spacing[2])), channels
