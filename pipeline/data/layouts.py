"""Discover cases on disk. Layouts: ``folders`` (``images/`` + ``masks/`` with matching names).

A ``Case`` is one patient or one 2D image: its image file(s) (one per channel where the layout
stores channels as files) and its mask. Class names come from the data config or ``classes.json``
(``{"0": "background", "1": "liver", ...}`` or a list in index order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.io import DataError, is_image_2d

LAYOUTS = ("auto", "folders")


@dataclass(frozen=True)
class Case:
    """One case: ``images`` holds one file, or one file per channel; ``mask`` may be None (inference)."""

    case_id: str
    images: tuple[Path, ...]
    mask: Path | None


def read_class_names(path: Path) -> list[str]:
    """Class names from a JSON list, or a ``{"index": name}`` dict with indices 0..N-1."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read class names ({err})") from None
    if isinstance(data, dict):
        try:
            by_index = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            raise DataError(path, 'class keys must be integer indices, e.g. {"0": "background"}') from None
        if sorted(by_index) != list(range(len(by_index))):
            raise DataError(path, f"class indices must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
        data = [by_index[i] for i in range(len(by_index))]
    if not isinstance(data, list) or len(data) < 2:
        raise DataError(path, "expected at least two classes (background and one foreground)")
    return [str(name) for name in data]


def _files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(folder, "folder not found")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_2d(p)}


def discover_folders(root: Path, require_masks: bool = True) -> list[Case]:
    """Pairs ``root/images/<id>.<ext>`` with ``root/masks/<id>.<ext>`` (any 2D image suffix)."""
    images = _files(root / "images")
    if not images:
        raise DataError(root / "images", "no images found (expected PNG/TIFF/JPEG files)")
    masks = _files(root / "masks") if (root / "masks").is_dir() or require_masks else {}
    if require_masks:
        for case_id, path in images.items():
            if case_id not in masks:
                raise DataError(path, f"no mask named {case_id}.* in {root / 'masks'}")
        for case_id, path in masks.items():
            if case_id not in images:
                raise DataError(path, f"mask has no image named {case_id}.* in {root / 'images'}")
    return [Case(case_id, (path,), masks.get(case_id)) for case_id, path in images.items()]


def detect_layout(root: Path) -> str:
    """Name the layout of ``root``; raises a ``DataError`` saying what was expected."""
    if (root / "images").is_dir():
        return "folders"
    raise DataError(root, "unknown data layout: expected images/ and masks/ folders")


def discover(root: str | Path, layout: str = "auto", require_masks: bool = True) -> list[Case]:
    """All cases under ``root`` for ``layout`` (``auto`` detects it)."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "data folder not found (run `make data` for the default data set)")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    return discover_folders(root, require_masks)
