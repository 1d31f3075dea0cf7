"""DICOM series (one folder, one series) read as a ``Volume`` in canonical RAS+ order.

Slices are sorted by their position along the slice normal (the cross product of the row and
column direction cosines), not by file name or InstanceNumber. The slice step comes from all
positions and is checked: two slices at one position, a missing slice or uneven spacing stop the
read with a ``DataError`` naming the folder, as a wrong geometry would put every label that
follows on the wrong anatomy. A CT gantry tilt (slices stepping off the normal) is kept exactly
as a sheared affine, with a warning. Intensities get the modality rescale (CT: Hounsfield units).
The world frame is converted from DICOM's LPS to RAS.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.data.reading.formats import Header, Volume, to_ras
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices closer than this along the normal lie in one plane: headers store positions to about
# 1e-6 mm, and no scanner reconstructs slices 0.01 mm apart.
DUPLICATE_MM = 0.01
# A gap of 1.5 steps or more is nearer two steps than one: a slice is missing.
MISSING_GAP_STEPS = 1.5
# Gaps may differ from the step by 1% of it (0.01 mm for sub-millimetre steps): far above the
# rounding of stored positions, and far below the half slice that would move a label to a
# neighbouring slice. The same bound holds every slice to the regular grid the affine describes.
UNEVEN_FRACTION = 0.01
UNEVEN_MM = 0.01
# A step further than this from the normal is gantry tilt; below it, rounding of the positions.
TILT_DEGREES = 0.1


def _read_headers(folder: Path, pixels: bool) -> list[tuple[Path, pydicom.Dataset]]:
    if not folder.is_dir():
        raise DataError(folder, "DICOM folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(folder, "DICOM folder is empty")
    slices: list[tuple[Path, pydicom.Dataset]] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
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


def _slice_step(folder: Path, names: list[str], positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The step from one slice to the next of a series sorted along its normal, checked.

    Args:
        folder: the series folder, named in errors.
        names: file name of each slice, in position order.
        positions: (N, 3) ImagePositionPatient of each slice in position order, LPS mm, N >= 2.
        normal: (3,) unit slice normal.

    Returns:
        (3,) LPS mm: the median of the consecutive position differences. It leaves the normal for
        a tilted gantry; its component along the normal is the median slice distance.

    Raises:
        DataError: slices share a position, a slice is missing, the spacing is uneven, or a slice
            lies off the grid of one step (drift, in-plane jumps).
    """
    along = positions @ normal
    gaps = np.diff(along)

    def between(i: int) -> str:
        return f"{along[i]:.2f} mm ({names[i]}) and {along[i + 1]:.2f} mm ({names[i + 1]})"

    same = np.flatnonzero(gaps < DUPLICATE_MM)
    if same.size:
        i = same[0]
        more = f" ({same.size - 1} more pair(s) too)" if same.size > 1 else ""
        raise DataError(
            folder, f"{names[i]} and {names[i + 1]} share the slice position {along[i]:.2f} mm{more}"
        )
    step = float(np.median(gaps))
    wide = np.flatnonzero(gaps >= MISSING_GAP_STEPS * step)
    if wide.size:
        i = wide[0]
        more = f"; {wide.size - 1} more gap(s)" if wide.size > 1 else ""
        raise DataError(
            folder,
            f"about {round(gaps[i] / step) - 1} slice(s) missing between {between(i)} along the normal: "
            f"gap {gaps[i]:.2f} mm, step {step:.2f} mm{more}",
        )
    tolerance = max(UNEVEN_FRACTION * step, UNEVEN_MM)
    i = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[i] - step) > tolerance:
        raise DataError(
            folder,
            f"uneven slice spacing: {gaps[i]:.3f} mm between {between(i)}, step {step:.3f} mm "
            f"(tolerance {tolerance:.3f} mm)",
        )
    vector = np.median(np.diff(positions, axis=0), axis=0)
    off = np.linalg.norm(positions - positions[0] - np.arange(len(positions))[:, None] * vector, axis=1)
    i = int(np.argmax(off))
    if off[i] > tolerance:
        raise DataError(
            folder,
            f"{names[i]} lies {off[i]:.3f} mm off the grid of steps {np.round(vector, 3).tolist()} mm "
            f"(tolerance {tolerance:.3f} mm): the slices do not follow one step",
        )
    return vector


def _tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    """Angle (degrees) between a slice step (3,) and the unit slice normal (3,): the gantry tilt."""
    cosine = abs(float(step @ normal)) / float(np.linalg.norm(step))
    return float(np.degrees(np.arccos(min(cosine, 1.0))))


def _geometry(
    folder: Path, slices: list[tuple[Path, pydicom.Dataset]]
) -> tuple[list[tuple[Path, pydicom.Dataset]], np.ndarray, float]:
    """The slices sorted along their normal, the (4, 4) voxel -> RAS affine of the series and its
    gantry tilt (degrees).

    The affine's third column is the true slice step, so a tilted series gets a sheared affine
    and every voxel centre lies where the DICOM headers put it (nothing is resampled).
    """
    first = slices[0][1]
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (columns increase), along a column
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    slices = sorted(
        slices, key=lambda item: float(np.dot(normal, np.array(item[1].ImagePositionPatient, dtype=float)))
    )
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(slices) > 1:
        step = _slice_step(folder, [path.name for path, _ in slices], positions, normal)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return slices, LPS_TO_RAS @ affine_lps, _tilt_degrees(step, normal)


def read_dicom_header(folder: str | os.PathLike) -> Header:
    """The geometry of the series in ``folder`` from its headers (pixel data is not read): the same
    checks as ``read_dicom_series``, which may still fail on pixel data that cannot be decoded."""
    folder = Path(folder)
    slices, affine, _ = _geometry(folder, _read_headers(folder, pixels=False))
    first = slices[0][1]
    return Header(affine, (int(first.Columns), int(first.Rows), len(slices)), 1)


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the DICOM series in ``folder`` as a volume with its patient geometry (``_geometry``).

    Raises:
        DataError: unreadable files, or a slice geometry that cannot be trusted (see ``_slice_step``).
    """
    folder = Path(folder)
    slices, affine, tilt = _geometry(folder, _read_headers(folder, pixels=True))
    if tilt > TILT_DEGREES:  # warned on reading only: header probes of the same series stay quiet
        logger.warning(
            "%s: gantry tilt of %.2f degrees; kept as a sheared affine (voxels not resampled)", folder, tilt
        )
    first = slices[0][1]
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
    array = np.stack(planes, axis=-1)[..., None]
    ras, ras_affine = to_ras(array, affine)
    return Volume(ras, ras_affine, affine, array.shape[:3], "dicom", None, folder)
