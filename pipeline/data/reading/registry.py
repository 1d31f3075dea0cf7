"""The one place that decides "what kind of input is this": a reader and writer per file ending.

Training layouts, ``medseg data check``, ``medseg plan`` and ``medseg infer`` all ask here. A file
is known by its ending (case-insensitive, the longest that fits: ``.nii.gz`` before ``.gz``), a
folder is a DICOM series. Each volume format reads a ``Volume`` in canonical RAS+ order, probes a
``Header`` without reading the voxels, and writes (X, Y, Z) labels with the input's geometry:

=====================  ======  ===============================  ==================
ending                 name    reader                           mask written as
=====================  ======  ===============================  ==================
``.nii.gz``, ``.nii``  nifti   nibabel                          ``.nii.gz``
``.mha``, ``.mhd``     itk     SimpleITK (MetaImage)            ``.mha``
``.nrrd``, ``.nhdr``   itk     SimpleITK (NRRD)                 ``.nrrd``
(a folder)             dicom   pydicom, one series per folder   ``.nii.gz``
``.png``, ``.tif``...  image   Pillow, 2D                       ``.png``
=====================  ======  ===============================  ==================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.reading import itk
from pipeline.data.reading.dicom import read_dicom_header, read_dicom_series
from pipeline.data.reading.formats import (
    IMAGE_SUFFIXES_2D,
    NIFTI_ENDINGS,
    Header,
    Volume,
    read_nifti,
    read_nifti_header,
    write_nifti_like,
)
from pipeline.errors import DataError


@dataclass(frozen=True)
class Format:
    """One kind of input.

    Attributes:
        name: ``nifti``, ``itk``, ``dicom`` or ``image``; a ``Volume`` records it.
        endings: the file endings it reads (lower case, with the dot; none for a folder).
        volume: 3D (read as a ``Volume``) or a 2D image.
        mask_endings: input ending -> the ending its mask is written with (``""``: a folder).
        read: files in channel order -> ``Volume`` (volumes only).
        header: one file -> ``Header`` without the voxels (volumes only).
        write: ``(labels, reference, path)`` writes (X, Y, Z) labels like ``reference`` in this
            format, whatever format ``reference`` was read from (volumes only).
        writes: the endings ``write`` can write (single files only: they are renamed into place).
    """

    name: str
    endings: tuple[str, ...]
    volume: bool
    mask_endings: dict[str, str]
    read: Callable[[list[Path]], Volume] | None = None
    header: Callable[[Path], Header] | None = None
    write: Callable[[np.ndarray, Volume, Path], None] | None = None
    writes: tuple[str, ...] = ()


NIFTI = Format(
    "nifti",
    NIFTI_ENDINGS,
    True,
    dict.fromkeys(NIFTI_ENDINGS, ".nii.gz"),
    read_nifti,
    read_nifti_header,
    write_nifti_like,
    NIFTI_ENDINGS,
)
ITK = Format(
    "itk",
    tuple(itk.IMAGE_IO),
    True,
    itk.MASK_ENDING,
    itk.read_itk,
    itk.read_itk_header,
    itk.write_itk_like,
    tuple(sorted(set(itk.MASK_ENDING.values()))),
)
# one series per folder: its files are many, so the reader and the header probe get the folder;
# its masks are NIfTI
DICOM = Format(
    "dicom", (), True, {"": ".nii.gz"}, lambda paths: read_dicom_series(paths[0]), read_dicom_header
)
IMAGE = Format("image", IMAGE_SUFFIXES_2D, False, dict.fromkeys(IMAGE_SUFFIXES_2D, ".png"))
FORMATS = (NIFTI, ITK, DICOM, IMAGE)
# longest first, so ".nii.gz" wins over any shorter ending that also fits
BY_ENDING = dict(sorted(((e, f) for f in FORMATS for e in f.endings), key=lambda item: -len(item[0])))


def supported_endings() -> tuple[str, ...]:
    """The endings any reader knows (``.nii.gz``, ``.nii``, ``.mha``, ..., ``.png``, ...)."""
    return tuple(e for f in FORMATS for e in f.endings)


def volume_endings() -> tuple[str, ...]:
    """The endings read as volumes (a DICOM series is a folder, so it has none)."""
    return tuple(e for f in FORMATS if f.volume for e in f.endings)


def ending(path: Path) -> str | None:
    """The registered ending of a file name (lower case), or None."""
    name = path.name.lower()
    return next((e for e in BY_ENDING if name.endswith(e) and len(name) > len(e)), None)


def is_supported(path: Path) -> bool:
    """Whether ``path`` is a file of a registered ending (a folder is judged by ``format_of``)."""
    return ending(path) is not None


def format_of(path: Path) -> Format:
    """The format of ``path``: a folder is a DICOM series, a file goes by its ending.

    Raises:
        DataError: an ending no reader knows, listing those known.
    """
    if path.is_dir():
        return DICOM
    known = ending(path)
    if known is None:
        raise DataError(
            path, f"unknown file type; medseg reads {', '.join(supported_endings())} and DICOM series folders"
        )
    return BY_ENDING[known]


def case_stem(path: Path) -> str:
    """File name without its registered ending (``.nii.gz`` counts as one); other names lose their
    last suffix."""
    known = ending(path)
    return path.name[: -len(known)] if known else path.stem


def mask_ending(path: Path) -> str:
    """The ending of the mask written for input ``path``: the input's own format where it can be
    written as one file, NIfTI for a DICOM series, PNG for a 2D image."""
    fmt, known = format_of(path), ending(path)
    return fmt.mask_endings["" if fmt is DICOM or known is None else known]


def _volume_format(paths: Sequence[Path]) -> Format:
    fmt = format_of(paths[0])
    if not fmt.volume or fmt.read is None or fmt.header is None:
        volumes = ", ".join(volume_endings())
        raise DataError(paths[0], f"a 2D image, not a volume ({volumes} or a DICOM series folder)")
    for path in paths[1:]:
        if format_of(path) is not fmt:
            raise DataError(path, f"channel file of another format than {paths[0].name}")
    return fmt


def read_volume(paths: Sequence[str | os.PathLike]) -> Volume:
    """One volume from its file, its channel files (in channel order) or its DICOM folder:
    (X, Y, Z, C) in canonical RAS+ order with the stored geometry."""
    files = [Path(p) for p in paths]
    read = _volume_format(files).read
    assert read is not None  # _volume_format: every volume format reads
    return read(files)


def read_header(paths: Sequence[str | os.PathLike]) -> Header:
    """A volume's geometry (the first file's) and channel count (over all files) from headers only
    (a DICOM series: every file's header, no pixel data)."""
    files = [Path(p) for p in paths]
    header = _volume_format(files).header
    assert header is not None  # _volume_format: every volume format probes headers
    headers = [header(path) for path in files]
    first = headers[0]
    return Header(first.affine, first.shape, sum(h.channels for h in headers))


def write_mask(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> None:
    """Write (X, Y, Z) labels given in ``reference``'s canonical order, with its stored geometry, in
    the format of ``path``'s ending (``mask_ending`` of the input), atomically."""
    path = Path(path)
    known = ending(path)
    fmt = BY_ENDING.get(known) if known is not None else None
    if fmt is None or fmt.write is None or known not in fmt.writes:
        writable = ", ".join(e for f in FORMATS for e in f.writes)
        raise DataError(path, f"cannot write a volume mask with this ending; medseg writes {writable}")
    fmt.write(labels, reference, path)
