"""Discover cases on disk, in the layouts the field uses.

- ``folders``: ``images/`` + ``masks/`` with matching names; 2D images (PNG/TIFF/...) or volumes
  (NIfTI, ``.mha``, ``.nrrd``, ...: any ending of ``pipeline.data.reading.registry``).
- ``dicom``: ``images/<case>/`` DICOM series folders + ``masks/<case>.nii.gz`` (or another volume ending).
- ``msd``: Medical Segmentation Decathlon, ``dataset.json`` (``labels``, ``modality``,
  ``training``: [{"image", "label"}]) + ``imagesTr/``, ``labelsTr/``; multi-modal images are 4D
  (or vector pixels). nnU-Net v1 raw folders (the same ``dataset.json``, one ``<case>_0000.nii.gz``
  file per channel) are read here too.
- ``nnunet``: nnU-Net v2 raw, ``dataset.json`` (``channel_names``, ``labels`` as name -> index,
  ``file_ending``, e.g. ``.nii.gz``, ``.mha``, ``.nrrd``) + ``imagesTr/<case>_0000<file_ending>``
  (one file per channel), ``labelsTr/<case><file_ending>``.

A ``Case`` is one patient or one 2D image: its image file(s) (one per channel where the layout
stores channels as files, or a DICOM folder) and its mask. Class names come from ``dataset.json``,
``classes.json`` (``{"0": "background", "1": "liver", ...}`` or a list in index order) or the data
config; modality names (which choose the normalisation) from ``dataset.json`` or the config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.reading.registry import case_stem, ending, is_supported, supported_endings, volume_endings
from pipeline.errors import DataError

LAYOUTS = ("auto", "folders", "dicom", "msd", "nnunet")
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: ``images`` holds one file, one file per channel, or a DICOM series folder;
    ``mask`` may be None (inference)."""

    case_id: str
    images: tuple[Path, ...]
    mask: Path | None


@dataclass(frozen=True)
class DataSetInfo:
    """A discovered data set.

    Attributes:
        layout: the concrete layout (never ``auto``).
        cases: the cases, sorted by id.
        class_names: from ``dataset.json`` (None: the layout has none; use ``classes.json``).
        modalities: one modality name per input channel from ``dataset.json``, or None.
    """

    layout: str
    cases: list[Case]
    class_names: list[str] | None = None
    modalities: list[str] | None = None


def _report(problem: DataError, problems: list[DataError] | None) -> None:
    """Collect ``problem`` for ``medseg data check``, or raise it (training stops at the first)."""
    if problems is None:
        raise problem
    problems.append(problem)


def read_class_names(path: Path) -> list[str]:
    """Class names from a JSON list, or a ``{"index": name}`` dict with indices 0..N-1."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read class names ({err})") from None
    return _class_list(data, path)


def _class_list(data: object, path: Path) -> list[str]:
    """``{"0": "bg", ...}`` (index -> name), ``{"bg": 0, ...}`` (nnU-Net v2) or a list -> names in order."""
    if isinstance(data, dict):
        if data and all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            data = {str(v): k for k, v in data.items()}
        elif any(isinstance(v, list) for v in data.values()):
            raise DataError(
                path, "region-based labels (lists of indices) are not supported; give one index a class"
            )
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


def resolve_class_names(root: str | Path, info: DataSetInfo, given: list[str] | None = None) -> list[str]:
    """Class names: ``given`` (the config), else ``dataset.json``'s, else ``<root>/classes.json``."""
    if given:
        return list(given)
    if info.class_names:
        return info.class_names
    path = Path(root) / "classes.json"
    if not path.exists():
        raise DataError(path, "no class names: write classes.json or set data.class_names in the config")
    return read_class_names(path)


def _entries(folder: Path) -> dict[str, Path]:
    """Case id -> image file (any registered ending) or sub-folder (DICOM series) in ``folder``.

    A dangling or looping symbolic link with an image name is kept, so reading it reports the link
    itself instead of its pair as unmatched.
    """
    if not folder.is_dir():
        raise DataError(folder, "folder not found")
    return {
        case_stem(p): p
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".")
        and (p.is_dir() or ((p.is_file() or p.is_symlink()) and is_supported(p)))
    }


def _pair(
    images: dict[str, Path], masks: dict[str, Path], mask_dir: Path, problems: list[DataError] | None
) -> list[Case]:
    """Cases with both an image and a mask; every unmatched file is a problem naming it."""
    for case_id, path in images.items():
        if case_id not in masks:
            _report(DataError(path, f"no mask named {case_id}.* in {mask_dir}"), problems)
    for case_id, path in masks.items():
        if case_id not in images:
            _report(DataError(path, f"mask has no image named {case_id}.*"), problems)
    return [Case(cid, (path,), masks[cid]) for cid, path in images.items() if cid in masks]


def discover_folders(
    root: Path, require_masks: bool = True, problems: list[DataError] | None = None
) -> list[Case]:
    """Pairs ``root/images/<id>`` (a 2D image, a volume or a DICOM folder) with ``root/masks/<id>.*``."""
    images = _entries(root / "images")
    if not images:
        raise DataError(
            root / "images",
            f"no images found (expected {', '.join(supported_endings())} files or DICOM folders)",
        )
    if not require_masks:
        masks = _entries(root / "masks") if (root / "masks").is_dir() else {}
        return [Case(cid, (path,), masks.get(cid)) for cid, path in images.items()]
    return _pair(images, _entries(root / "masks"), root / "masks", problems)


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read dataset.json ({err})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(path, 'dataset.json needs "labels" (class names)')
    return meta


def _modalities(meta: dict, path: Path) -> list[str] | None:
    names = meta.get("channel_names") or meta.get("modality")
    if not names:
        return None
    try:
        return [str(names[k]) for k in sorted(names, key=int)]
    except (TypeError, ValueError):
        raise DataError(path, 'channel names must be {"0": "CT", ...}') from None


def _channel_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """``<case>_<cccc><ending>`` files of ``folder``: case id -> {channel: path}."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []:
        match = CHANNEL_FILE.match(path.name[: -len(ending)])
        if match and not path.name.startswith("."):
            found.setdefault(match["case"], {})[int(match["channel"])] = path
    return found


def _channel_cases(
    root: Path, ending: str, channels: int, labels: dict[str, Path], problems: list[DataError] | None
) -> list[Case]:
    """nnU-Net raw: one image file per channel, ``labelsTr/<case><ending>``."""
    images = {}
    for case_id, files in _channel_files(root / "imagesTr", ending).items():
        if sorted(files) != list(range(channels)):
            problem = f"case {case_id} has channel files {sorted(files)}; dataset.json names channels 0..{channels - 1}"
            _report(DataError(files[min(files)], problem), problems)
            continue
        images[case_id] = tuple(files[c] for c in range(channels))
    paired = _pair({k: v[0] for k, v in images.items()}, labels, root / "labelsTr", problems)
    return [Case(c.case_id, images[c.case_id], c.mask) for c in paired]


def discover_msd(root: Path, problems: list[DataError] | None = None) -> DataSetInfo:
    """MSD: ``dataset.json`` "training" pairs (or every file of ``imagesTr``/``labelsTr``)."""
    meta, path = _read_dataset_json(root), root / "dataset.json"
    modalities = _modalities(meta, path)
    training = meta.get("training") or []
    images = {case_stem(Path(e["image"])): root / e["image"] for e in training if isinstance(e, dict)}
    labels = {case_stem(Path(e["label"])): root / e["label"] for e in training if isinstance(e, dict)}
    if not training:
        images, labels = _entries(root / "imagesTr"), _entries(root / "labelsTr")
    # nnU-Net v1: the listed <case>.nii.gz is stored as <case>_0000.nii.gz, ... (one file a channel)
    listed = ending(next(iter(images.values()))) if images else None
    if listed and not any(p.exists() for p in images.values()) and _channel_files(root / "imagesTr", listed):
        cases = _channel_cases(root, listed, len(modalities or [0]), labels, problems)
    else:
        for case_id, image in images.items():
            if not image.exists():
                _report(
                    DataError(image, f"listed in dataset.json for case {case_id} but not found"), problems
                )
        existing = {k: v for k, v in labels.items() if v.exists()}
        cases = _pair({k: v for k, v in images.items() if v.exists()}, existing, root / "labelsTr", problems)
    return DataSetInfo("msd", cases, _class_list(meta["labels"], path), modalities)


def discover_nnunet(root: Path, problems: list[DataError] | None = None) -> DataSetInfo:
    """nnU-Net v2 raw: channel files in ``imagesTr``, labels in ``labelsTr``, ``file_ending``."""
    meta, path = _read_dataset_json(root), root / "dataset.json"
    file_ending = meta.get("file_ending", ".nii.gz")
    volumes = volume_endings()
    if not isinstance(file_ending, str) or file_ending.lower() not in volumes:
        raise DataError(
            path,
            f"file_ending {file_ending!r} is not supported; medseg reads volumes ending in {', '.join(volumes)}",
        )
    modalities = _modalities(meta, path)
    if not modalities:
        raise DataError(path, 'nnU-Net dataset.json needs "channel_names", e.g. {"0": "CT"}')
    labels = {p.name[: -len(file_ending)]: p for p in sorted((root / "labelsTr").glob(f"*{file_ending}"))}
    cases = _channel_cases(root, file_ending, len(modalities), labels, problems)
    return DataSetInfo("nnunet", cases, _class_list(meta["labels"], path), modalities)


def detect_layout(root: Path) -> str:
    """Name the layout of ``root``; raises a ``DataError`` saying what was expected."""
    if (root / "dataset.json").is_file():
        meta = _read_dataset_json(root)
        return "nnunet" if "file_ending" in meta or "channel_names" in meta else "msd"
    if (root / "imagesTr").is_dir():
        raise DataError(root / "dataset.json", "imagesTr/ found but no dataset.json (MSD / nnU-Net layout)")
    if (root / "images").is_dir():
        return "dicom" if any(p.is_dir() for p in (root / "images").iterdir()) else "folders"
    raise DataError(
        root,
        "unknown data layout: expected images/ + masks/ folders, or dataset.json + imagesTr/ + labelsTr/",
    )


def describe(
    root: str | Path,
    layout: str = "auto",
    require_masks: bool = True,
    problems: list[DataError] | None = None,
) -> DataSetInfo:
    """Discover the data set under ``root`` for ``layout`` (``auto`` detects it).

    Args:
        problems: if given, unmatched files (an image without a mask, ...) are appended to it and
            skipped, instead of raising at the first one (``medseg data check``).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(root, "data folder not found (run `make data` for the default data set)")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "msd":
        return discover_msd(root, problems)
    if layout == "nnunet":
        return discover_nnunet(root, problems)
    return DataSetInfo(layout, discover_folders(root, require_masks, problems))


def discover(root: str | Path, layout: str = "auto", require_masks: bool = True) -> list[Case]:
    """All cases under ``root`` for ``layout`` (``auto`` detects it)."""
    return describe(root, layout, require_masks).cases
