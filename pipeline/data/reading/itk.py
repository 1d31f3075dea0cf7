"""MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``, ``.nhdr``) volumes through SimpleITK, as nnU-Net v2 reads them.

SimpleITK places voxel (i, j, k) at ``origin + direction @ (spacing * (i, j, k))`` in LPS
millimetres, and ``GetArrayFromImage`` returns the voxels as (k, j, i). Both are turned into the
NIfTI convention the rest of medseg uses: an (X, Y, Z, C) array in stored order and a (4, 4)
voxel -> RAS affine, ``diag(-1, -1, 1) @ [direction * spacing | origin]``; then ``to_ras`` makes
it canonical as for NIfTI. The writer inverts the same map, so a mask written for an input reads
back in SimpleITK with the input's spacing, origin and direction. Vector pixels are channels.

Detached headers (``.mhd`` + ``.raw``, ``.nhdr`` + data file) are read, but masks are written as
the single-file form of the same format (``.mha``, ``.nrrd``): two files cannot be renamed into
place together, and a header renamed after writing would name a data file that is not there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.data.reading.formats import Header, Volume, from_ras, stack_channels
from pipeline.errors import DataError
from pipeline.files import atomic_write

# ending -> the SimpleITK ImageIO that reads it (set explicitly: the registry decides by ending)
IMAGE_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}
# the ending a mask of an input with this ending is written with
MASK_ENDING = {".mha": ".mha", ".mhd": ".mha", ".nrrd": ".nrrd", ".nhdr": ".nrrd"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _reader(path: Path) -> sitk.ImageFileReader:
    if not path.exists():
        raise DataError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetImageIO(IMAGE_IO[path.suffix.lower()])
    reader.SetFileName(str(path))
    return reader


def _failed(path: Path, err: RuntimeError) -> DataError:
    # SimpleITK's messages span lines of C++ context; the last non-empty line says what went wrong
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return DataError(
        path, f"cannot read with SimpleITK, truncated or corrupt? ({lines[-1] if lines else err})"
    )


def _affine(
    path: Path, dimension: int, direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """(4, 4) voxel -> RAS (mm) from SimpleITK's LPS geometry (direction: row-major 3 x 3; spacing,
    origin: mm); only 3D images are volumes."""
    if dimension != 3:
        raise DataError(path, f"expected a 3D volume, got a {dimension}D image")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, None]:
    """(X, Y, Z, C) voxels in stored order and the (4, 4) RAS affine of one file."""
    try:
        image = _reader(path).Execute()
    except RuntimeError as err:
        raise _failed(path, err) from None
    affine = _affine(path, image.GetDimension(), image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    data = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C) for vector pixels
    data = data if data.ndim == 4 else data[..., None]
    return np.ascontiguousarray(data.transpose(2, 1, 0, 3)), affine, None


def read_itk(paths: list[Path]) -> Volume:
    """Read one file, or one file per channel (channel files must share shape and affine)."""
    return stack_channels(paths, _load, "itk")


def read_itk_header(path: Path) -> Header:
    """The geometry and channel count of one file, from its header only (SimpleITK's
    ``ReadImageInformation``: the voxels of a ``.raw`` or compressed data block are not read)."""
    reader = _reader(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _failed(path, err) from None
    affine = _affine(
        path, reader.GetDimension(), reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin()
    )
    x, y, z = (int(n) for n in reader.GetSize())  # 3D: _affine refused any other image
    return Header(affine, (x, y, z), int(reader.GetNumberOfComponents()))


def write_itk_like(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> None:
    """Write (X, Y, Z) labels given in ``reference``'s canonical order as uint8, in the stored voxel
    order and geometry of the input; the format follows ``path``'s ending (``.mha`` or ``.nrrd``),
    compressed, written atomically."""
    stored = np.ascontiguousarray(from_ras(labels, reference).astype(np.uint8).transpose(2, 1, 0))
    image = sitk.GetImageFromArray(stored)  # (Z, Y, X) -> an image of size (X, Y, Z)
    lps = LPS_TO_RAS @ reference.source_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))
