"""Synthetic scan volumes in MSD (or nnU-Net raw) layout: test data for the volume path.

Each case holds a body ellipsoid (soft tissue) in air, an organ ellipsoid (class 1) and a round
lesion inside it (class 2), plus noise. The shapes are defined in world coordinates (mm), and
the files are stored with a geometry a careless reader gets wrong: LPS-like voxel order (x and y
flipped), anisotropic spacing and a small in-plane rotation. As on real scanners, every case has
its own spacing (in-plane 0.6-1.2 mm, slices 1-5 mm apart) and field of view (a 36 mm cube, each
side +-15%), hence its own shape, so training and inference must resample; a fixed ``spacing``
(and ``shape``) gives every case one geometry instead. The organ spans only some of the slices
and the lesion (2.5-4 mm radius) one to a few, so foreground sampling matters.

Channel ``CT`` holds Hounsfield-like int16 values (air -1000, tissue ~40, organ ~90, lesion ~125,
noise 20, a smooth ramp across the body); any other modality name gives an MR-like float channel
with another contrast.
Case ``i`` of seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.files import atomic_write

CLASS_NAMES = ["background", "organ", "lesion"]
IN_PLANE_MM = (0.6, 1.2)  # per-case spacing ranges
SLICE_MM = (1.0, 5.0)
FIELD_OF_VIEW_MM = 36.0  # each side, +-15% per case
# air, body, organ, lesion, noise: contrasts of 2-3 noise widths, so a voxel's own value is not
# enough and shape and context decide, as in real scans
LEVELS = {
    "CT": (-1000.0, 40.0, 90.0, 125.0, 20.0),
    "MR": (0.0, 300.0, 420.0, 250.0, 40.0),
}
BIAS = 0.3  # a smooth intensity ramp across the body: +-30% of the organ-body contrast


def case_geometry(
    rng: np.random.Generator, shape: Sequence[int] | None, spacing: Sequence[float] | None
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A case's (shape, spacing (mm)): as given, or drawn from the ranges above."""
    if spacing is None:
        in_plane = rng.uniform(*IN_PLANE_MM)
        spacing = (in_plane, in_plane, rng.uniform(*SLICE_MM))
    if shape is None:
        extent = FIELD_OF_VIEW_MM * rng.uniform(0.85, 1.15, 3)
        shape = [max(4, round(e / s)) for e, s in zip(extent, spacing, strict=True)]
    (x, y, z), (sx, sy, sz) = (int(n) for n in shape), (float(s) for s in spacing)
    return (x, y, z), (sx, sy, sz)


def volume_affine(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """(4, 4) voxel -> world (RAS, mm): x and y flipped, anisotropic, rotated, centred near 0."""
    theta = rng.uniform(-0.15, 0.15)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + rng.uniform(-5, 5, 3)
    return affine


def phantom_volume(
    seed: int,
    index: int,
    shape: Sequence[int] | None = None,
    modalities: Sequence[str] = ("CT",),
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case in stored voxel order: image (X, Y, Z, C) (int16 for a lone CT channel, else
    float32), mask (X, Y, Z) uint8 with values 0..2, and the affine. ``shape`` and ``spacing``
    (mm) default to the case's own draw (``case_geometry``)."""
    rng = np.random.default_rng([seed, index])
    shape, spacing = case_geometry(rng, shape, spacing)
    affine = volume_affine(shape, spacing, rng)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]  # world position of every voxel centre, mm
    extent = np.asarray(shape) * np.asarray(spacing) / 2

    def ellipsoid(center: np.ndarray, radii: np.ndarray | float) -> np.ndarray:
        return (((xyz - center) / radii) ** 2).sum(-1) <= 1

    center = affine[:3, 3] + affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    body = ellipsoid(center, extent * [0.9, 0.8, 4.0])
    organ_center = center + rng.uniform(-0.15, 0.15, 3) * extent
    organ = ellipsoid(organ_center, extent * rng.uniform([0.35, 0.35, 0.3], [0.5, 0.45, 0.45])) & body
    lesion = ellipsoid(organ_center + rng.uniform(-2, 2, 3), rng.uniform(2.5, 4.0)) & organ
    mask = organ.astype(np.uint8) + lesion
    channels = []
    for modality in modalities:
        air, tissue, organ_level, lesion_level, noise = LEVELS["CT" if modality.upper() == "CT" else "MR"]
        level = np.select([lesion, organ, body], [lesion_level, organ_level, tissue], air)
        direction = rng.normal(size=3)
        ramp = ((xyz - center) @ (direction / np.linalg.norm(direction))) / np.linalg.norm(extent)
        bias = BIAS * (organ_level - tissue) * ramp * body
        channels.append(level + bias + rng.normal(0, noise, mask.shape))
    image = np.stack(channels, axis=-1)
    dtype = np.int16 if list(modalities) == ["CT"] else np.float32
    return image.round().astype(dtype) if dtype == np.int16 else image.astype(dtype), mask, affine


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=".nii.gz")


def generate_volumes(
    output: str | Path,
    num_cases: int = 6,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    modalities: Sequence[str] = ("CT",),
    layout: str = "msd",
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write ``num_cases`` volumes with ``dataset.json`` in ``layout`` (``msd``: one 3D/4D file a
    case; ``nnunet``: nnU-Net v2 raw, one file a channel). Returns the output folder.

    ``shape`` (voxels) and ``spacing`` (mm) fix every case's geometry; None draws each case's own.
    """
    if layout not in ("msd", "nnunet"):
        raise ValueError(f"unknown layout {layout!r}; valid: msd, nnunet")
    if num_cases < 2 or (shape is not None and min(shape) < 4):
        raise ValueError(f"need num_cases >= 2 and every side >= 4, got {num_cases} and {shape}")
    output = Path(output)
    training = []
    for i in range(num_cases):
        case = f"vol_{i:03d}"
        image, mask, affine = phantom_volume(seed, i, shape, modalities, spacing)
        if layout == "msd":
            _save_nifti(
                output / "imagesTr" / f"{case}.nii.gz",
                image if image.shape[-1] > 1 else image[..., 0],
                affine,
            )
        else:
            for c in range(image.shape[-1]):
                _save_nifti(output / "imagesTr" / f"{case}_{c:04d}.nii.gz", image[..., c], affine)
        _save_nifti(output / "labelsTr" / f"{case}.nii.gz", mask, affine)
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    channels = {str(c): m for c, m in enumerate(modalities)}
    if layout == "msd":
        meta: dict[str, Any] = {
            "name": "SyntheticVolumes",
            "modality": channels,
            "labels": dict(enumerate(CLASS_NAMES)),
        }
        meta.update(numTraining=num_cases, training=training, test=[])
    else:
        labels = {name: k for k, name in enumerate(CLASS_NAMES)}
        meta = {
            "channel_names": channels,
            "labels": labels,
            "numTraining": num_cases,
            "file_ending": ".nii.gz",
        }
    (output / "dataset.json").write_text(json.dumps(meta, indent=2))
    return output
