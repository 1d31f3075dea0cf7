"""Reading and writing images and masks; every failure is a ``DataError`` naming the file.

2D images (PNG, TIFF, JPEG, BMP, GIF) are read with Pillow as (H, W) or (H, W, C) arrays.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")


class DataError(ValueError):
    """A problem with one input file: the message is ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def is_image_2d(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES_2D


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image as (H, W) for gray or (H, W, C) for colour, in its stored dtype.

    Palette images are expanded to RGB; an alpha channel is dropped.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
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


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename to ``path``, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a (H, W) or (H, W, 3) uint8/uint16 array as PNG, atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
