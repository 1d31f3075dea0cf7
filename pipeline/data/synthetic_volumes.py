"""Synthetic scan volumes in MSD (or nnU-Net raw) layout: test data for the volume path.

Each case holds a body ellipsoid (soft tissue) in air, an organ ellipsoid (class 1) and a round
lesion inside it (class 2), plus noise. The shapes are defined in world coordinates (mm), and
the files are stored with a geometry a careless reader gets wrong: LPS-like voxel order (x and y
flipped), anisotropic spacing (0.9 x 0.9 x 3 mm, so ``slice_axis: auto`` picks axial) and a small
in-plane rotation. The organ spans only some of the slices, so foreground sampling matters.

Channel ``CT`` holds Hounsfield-like int16 values (air -1000, tissue ~40, organ ~100, lesion
~160); any other modality name gives an MR-like float channel with another contrast.
Case ``i`` of seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.files import atomic_write

CLASS_NAMES = ["background", "organ", "lesion"]
SPACING = (0.9, 0.9, 3.0)  # mm
LEVELS = {
    "CT": (-1000.0, 40.0, 100.0, 160.0, 12.0),
    "MR": (0.0, 300.0, 520.0, 180.0, 15.0),
}  # air, body, organ, lesion, noise


def volume_affine(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """(4, 4) voxel -> world (RAS, mm): x and y flipped, anisotropic, rotated, centred near 0."""
    theta = rng.uniform(-0.15, 0.15)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-SPACING[0], -SPACING[1], SPACING[2]])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + rng.uniform(-5, 5, 3)
    return affine


def phantom_volume(
    seed: int, index: int, shape: Sequence[int] = (40, 40, 12), modalities: Sequence[str] = ("CT",)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case in stored voxel order: image (X, Y, Z, C) (int16 for a lone CT channel, else
    float32), mask (X, Y, Z) uint8 with values 0..2, and the affine."""
    rng = np.random.default_rng([seed, index])
    affine = volume_affine(shape, rng)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]  # world position of every voxel centre, mm
    extent = np.abs(np.asarray(shape) * SPACING) / 2

    def ellipsoid(center, radii) -> np.ndarray:
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
        channels.append(level + rng.normal(0, noise, mask.shape))
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
    shape: Sequence[int] = (40, 40, 12),
    seed: int = 0,
    modalities: Sequence[str] = ("CT",),
    layout: str = "msd",
) -> Path:
    """Write ``num_cases`` volumes with ``dataset.json`` in ``layout`` (``msd``: one 3D/4D file a
    case; ``nnunet``: nnU-Net v2 raw, one file a channel). Returns the output folder."""
    if layout not in ("msd", "nnunet"):
        raise ValueError(f"unknown layout {layout!r}; valid: msd, nnunet")
    if num_cases < 2 or min(shape) < 4:
        raise ValueError(f"need num_cases >= 2 and every side >= 4, got {num_cases} and {tuple(shape)}")
    output = Path(output)
    training = []
    for i in range(num_cases):
        case = f"vol_{i:03d}"
        image, mask, affine = phantom_volume(seed, i, shape, modalities)
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
        meta = {"name": "SyntheticVolumes", "modality": channels, "labels": dict(enumerate(CLASS_NAMES))}
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
