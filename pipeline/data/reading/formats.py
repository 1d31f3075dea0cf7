"""The volume types every reader returns, 2D images and NIfTI; every failure a ``DataError`` naming the file.

2D images (PNG, TIFF, JPEG, BMP, GIF) are read with Pillow as (H, W) or (H, W, C) arrays.
Volumes are read as a ``Volume``: the array in canonical RAS+ voxel order plus the stored
geometry, so results are written back exactly like the input; their headers alone as a
``Header``. NIfTI is read here; DICOM series in ``pipeline.data.reading.dicom``, ``.mha``/``.nrrd``
in ``pipeline.data.reading.itk``; ``pipeline.data.reading.registry`` picks the reader by file ending.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError
from pipeline.files import atomic_write

IMAGE_SUFFIXES_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")


def is_image_2d(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES_2D


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image as (H, W) for gray or (H, W, C) for colour, in its stored dtype.

    Palette images are expanded to RGB; an alpha channel is dropped.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            pages = getattr(im, "n_frames", 1)
            if pages > 1:  # Pillow would silently give the first page only
                raise DataError(
                    path,
                    f"multi-page {im.format} ({pages} pages): medseg reads one 2D image per file; "
                    "store a volume as NIfTI, .mha or .nrrd, or one page per file",
                )
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            elif im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])
            array = np.asarray(im)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except PermissionError:
        raise DataError(path, "permission denied") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(path, f"cannot read as an image ({err})") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(path, f"expected a 2D gray or colour image, got shape {array.shape}")
    return array


def read_mask_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D label mask as (H, W) integers; a colour mask must have equal channels."""
    mask = read_image_2d(path)
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            raise DataError(path, "mask has colour channels that differ; store class indices in one channel")
        mask = mask[..., 0]
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.array_equal(mask, np.round(mask)):
            raise DataError(path, "mask holds non-integer values; store class indices")
        mask = mask.astype(np.int64)
    return mask


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, 3) uint8/uint16 array as PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A 3D scan in canonical RAS+ voxel order, with what is needed to write results like it.

    Attributes:
        array: (X, Y, Z, C) intensities (or labels with C=1), axes ordered so that voxel indices
            increase towards Right, Anterior, Superior (the closest axes for oblique scans).
        affine: (4, 4) voxel -> world (RAS, mm) of ``array``.
        source_affine: (4, 4) affine of the data as stored (the input file's geometry).
        source_shape: spatial shape as stored.
        format: the registry's name of the reader that made it (``nifti``, ``itk``, ``dicom``).
        meta: that format's own header, reused when writing in the same format (the NIfTI header;
            None for the others, whose writers need the geometry only).
        path: where it came from (first file, or the DICOM folder).
    """

    array: np.ndarray
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    format: str
    meta: object | None
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size of ``array`` along X, Y, Z in mm."""
        x, y, z = (float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))
        return x, y, z


@dataclass(frozen=True)
class Header:
    """What a volume's header says, without reading its voxels.

    Attributes:
        affine: (4, 4) stored voxel -> world (RAS, mm).
        shape: stored spatial shape.
        channels: channels over all of the case's files.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    channels: int

    @property
    def ras_axes(self) -> tuple[int, int, int]:
        """The RAS+ axis (0 X, 1 Y, 2 Z) each stored axis becomes in the canonical array."""
        x, y, z = (int(ras) for ras, _ in io_orientation(self.affine))
        return x, y, z

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along X, Y, Z of the canonical RAS+ array."""
        zooms = np.linalg.norm(self.affine[:3, :3], axis=0)
        x, y, z = (float(zooms[self.ras_axes.index(axis)]) for axis in range(3))
        return x, y, z

    def slices(self, axis: int) -> int:
        """Voxels along ``axis`` (of the canonical RAS+ array)."""
        return self.shape[self.ras_axes.index(axis)]


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the first three axes of ``array`` to RAS+; returns the array and its affine."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    ras = apply_orientation(array, transform)
    return ras, affine @ inv_ornt_aff(transform, array.shape[:3])


def from_ras(array: np.ndarray, volume: Volume) -> np.ndarray:
    """Undo ``to_ras``: (X, Y, Z, ...) in canonical order -> the stored voxel order of ``volume``."""
    transform = ornt_transform(axcodes2ornt("RAS"), io_orientation(volume.source_affine))
    return apply_orientation(array, transform)


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load`` of a NIfTI file (NIfTI-2 included, a ``Nifti1Image`` subclass); any other
    image nibabel recognises is refused as unreadable here."""
    image = nib.load(str(path))
    if not isinstance(image, nib.Nifti1Image):
        raise nib.filebasedimages.ImageFileError(f"nibabel reads it as {type(image).__name__}")
    return image


def _load_nifti(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        image = _open_nifti(path)
        data = np.asanyarray(image.dataobj)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except PermissionError:
        raise DataError(path, "permission denied") from None
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise DataError(path, f"cannot read as NIfTI, truncated or corrupt? ({err})") from None
    return image, data


def stack_channels(
    paths: Sequence[Path], load: Callable[[Path], tuple[np.ndarray, np.ndarray, object]], name: str
) -> Volume:
    """One volume from one file, or one file per channel (nnU-Net's ``case_0000.nii.gz``, ...).

    Args:
        paths: the files, in channel order.
        load: a file -> (X, Y, Z, C) array in stored order, its (4, 4) RAS affine, format header.
        name: the registry's name for ``load``'s format.

    Raises:
        DataError: a channel file differs in shape or affine from the first.
    """
    channels, reference = [], None
    for path in paths:
        data, affine, meta = load(path)
        if reference is None:
            reference = (affine, data.shape[:3], meta)
        elif data.shape[:3] != reference[1] or not np.allclose(affine, reference[0], atol=1e-4):
            raise DataError(path, f"channel file differs in shape or affine from {paths[0]}")
        channels.append(data)
    if reference is None:
        raise ValueError(f"no {name} files to read")
    affine, shape, meta = reference
    array = np.concatenate(channels, axis=-1)
    ras, ras_affine = to_ras(array, affine)
    return Volume(ras, ras_affine, affine.copy(), shape, name, meta, paths[0])


def _load_nifti_channels(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    image, data = _load_nifti(path)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim not in (3, 4):
        raise DataError(path, f"expected a 3D volume (or 4D with channels last), got shape {data.shape}")
    return (data if data.ndim == 4 else data[..., None]), image.affine, image.header.copy()


def read_nifti(paths: Sequence[str | os.PathLike]) -> Volume:
    """Read one NIfTI file, or one file per channel; a 4D file is read as channels along its last
    axis. Channel files must share shape and affine."""
    return stack_channels([Path(p) for p in paths], _load_nifti_channels, "nifti")


def read_nifti_header(path: Path) -> Header:
    """The geometry and channel count of one NIfTI file, from its header."""
    try:
        image = _open_nifti(path)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except Exception as err:  # nibabel raises many types for broken headers
        raise DataError(path, f"cannot read as NIfTI ({err})") from None
    shape = tuple(int(n) for n in image.shape)
    x, y, z = (*shape[:3], 1, 1, 1)[:3]  # a 1D or 2D image as a volume of one slice
    return Header(image.affine, (x, y, z), shape[3] if len(shape) == 4 else 1)


def is_sheared(affine: np.ndarray, tolerance: float = 1e-6) -> bool:
    """Whether the (4, 4) affine's voxel axes are not orthogonal (a NIfTI qform cannot hold it)."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return not np.allclose(axes.T @ axes, np.eye(3), atol=tolerance)


def write_nifti_like(labels: np.ndarray, reference: Volume, path: str | os.PathLike) -> None:
    """Write (X, Y, Z) labels given in ``reference``'s canonical order with the input's geometry.

    The output has the stored voxel order, affine (qform and sform) and spacing of the input, so
    it overlays the input scan exactly in any viewer.
    """
    stored = from_ras(labels, reference)
    meta = reference.meta
    header = meta.copy() if reference.format == "nifti" and isinstance(meta, nib.Nifti1Header) else None
    image = nib.Nifti1Image(np.ascontiguousarray(stored.astype(np.uint8)), reference.source_affine, header)
    image.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    # a sheared affine (a tilted DICOM series) fits only the sform: the qform would hold the
    # nearest rotation, millimetres off, and readers that prefer it would misplace the mask
    image.set_qform(reference.source_affine, code=0 if is_sheared(reference.source_affine) else 1)
    image.set_sform(reference.source_affine, code=1)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=suffix)
