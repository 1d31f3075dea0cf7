"""DICOM series (one folder, one series) read as a ``Volume`` in canonical RAS+ order.

Slices are sorted by their position along the slice normal (the cross product of the row and
column direction cosines), not by file name or InstanceNumber. Intensities get the modality
rescale (CT: Hounsfield units). The world frame is converted from DICOM's LPS to RAS.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.data.io import Volume, to_ras
from pipeline.errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_headers(folder: Path) -> list[pydicom.Dataset]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(folder, "DICOM folder is empty")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            raise DataError(path, "not a DICOM file (one folder must hold one series only)") from None
        except (OSError, EOFError, ValueError) as err:
            raise DataError(path, f"cannot read DICOM file, truncated or corrupt? ({err})") from None
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise DataError(path, f"DICOM file lacks {tag}: cannot place it in patient space")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(path, "multi-frame DICOM is not supported; convert it to NIfTI first")
        slices.append((path, ds))
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise DataError(folder, f"folder holds {len(series)} DICOM series; give one series per folder")
    return slices


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the DICOM series in ``folder`` as a volume with its patient geometry."""
    folder = Path(folder)
    slices = _read_headers(folder)
    first = slices[0][1]
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (columns increase), along a column
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda item: float(np.dot(normal, np.array(item[1].ImagePositionPatient, dtype=float))))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    planes = []
    for path, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises many types for missing pixel data or codecs
            raise DataError(path, f"cannot decode pixel data ({err})") from None
        if pixels.shape != (first.Rows, first.Columns):
            raise DataError(path, f"slice size {pixels.shape} differs from {(first.Rows, first.Columns)}")
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels.T * slope + intercept)  # (rows, cols) -> (X = column index, Y = row index)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(slices) > 1:
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ affine_lps
    array = np.stack(planes, axis=-1)[..., None]
    ras, ras_affine = to_ras(array, affine)
    return Volume(ras, ras_affine, affine, array.shape[:3], None, folder)
