"""Small DICOM series for the tests, built from the CT slice that ships inside pydicom."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def write_series(
    folder: Path,
    positions: Sequence[Sequence[float]],
    names: Sequence[str] | None = None,
    pixels: Sequence[np.ndarray] | None = None,
) -> None:
    """Write one 128 x 128 CT slice per position into ``folder`` (created), one series.

    Args:
        positions: (N, 3) ImagePositionPatient per slice, LPS mm (rounded to 1e-6 mm, as stored).
        names: file names (default ``slice_000.dcm``, ... in the order given); InstanceNumber
            follows the order given too, so neither says where a slice lies.
        pixels: N (128, 128) int16 stored values (default: slice n holds n everywhere).
    """
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True)
    for n, position in enumerate(positions):
        ds = template.copy()
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.InstanceNumber = n + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        plane = np.full((ds.Rows, ds.Columns), n, np.int16) if pixels is None else pixels[n]
        ds.PixelData = np.ascontiguousarray(plane, np.int16).tobytes()
        ds.save_as(folder / (names[n] if names is not None else f"slice_{n:03d}.dcm"))


def axial_series(folder: Path, z_positions: Sequence[float]) -> None:
    """An axial series at ``z_positions`` (LPS mm); each slice holds its z everywhere."""
    positions = [(-158.135803, -179.035797, z) for z in z_positions]
    write_series(folder, positions, pixels=[np.full((128, 128), int(z), np.int16) for z in z_positions])
