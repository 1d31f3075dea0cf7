"""Real-size generated CT in MSD layout: test and benchmark data for the volume path.

Every case is 512 x 512 in plane (``in_plane``) with 80-300 slices (``slices``), in int16
Hounsfield units: air (-1000) around a body cylinder of soft tissue (40) under a fat layer (-100),
a large liver-like organ (class 1, 60-100 HU) across half to four fifths of the slices, a small lesion
inside it (class 2, 20-40 HU brighter or darker, radius 3-15 mm), with noise (sd 15-20) and a smooth
bias across the body. Each case draws its own in-plane spacing (0.6-0.9 mm), slice spacing
(1.5-5 mm) and slice count, and is stored in LPS-like voxel order (``phantoms_3d.volume_affine``).
The anatomy is laid out in fractions of the field of view, so a smaller ``in_plane`` gives a
scaled replica for fast tests. Case ``i`` of seed ``s`` depends only on ``(s, i)``.

A 512 x 512 x 300 case is 78.6 M voxels, so it is built ``SLAB`` slices at a time in float32
into preallocated int16/uint8 arrays: the work space stays near 50 MB beside the 236 MB the
case itself takes, and no coordinate grid of the whole volume is ever made (0.3 s for 512 x 512 x
100, about 1 s for x 300 on one core; gzip level 1, nibabel's default, writes ~90 MB/s of it).

    medseg data synth --volumes --real-size [--num-images N] [--slices MIN MAX] [--output DIR]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.data.synthesis.phantoms_3d import CLASS_NAMES, volume_affine
from pipeline.files import atomic_write, write_json

log = logging.getLogger(__name__)
IN_PLANE_MM = (0.6, 0.9)  # per-case spacing ranges, as in abdominal CT
SLICE_MM = (1.5, 5.0)
SLAB = 16  # slices built at once: each (16, 512, 512) float32 temporary is 17 MB
AIR, FAT, TISSUE = -1000.0, -100.0, 40.0
ORGAN_HU = (60.0, 100.0)
LESION_CONTRAST_HU = (20.0, 40.0)  # brighter or darker than the organ: a few noise widths
NOISE_HU = (15.0, 20.0)
BIAS_HU = (10.0, 20.0)  # peak of the smooth ramp across the body, either way
LESION_MM = (3.0, 15.0)  # radius at 512 voxels in plane; scaled with the field of view
HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit scanner stores


@dataclass(frozen=True)
class CtCase:
    """One case's draws. Positions (mm) are in the voxel frame centred on the volume: voxel ``i``
    of an axis with ``n`` voxels and spacing ``s`` sits at ``(i - (n - 1) / 2) * s``."""

    shape: tuple[int, int, int]  # (X, Y, Z) voxels
    spacing: tuple[float, float, float]  # mm
    body: tuple[float, ...]  # centre x, y and radii x, y of the body cylinder
    fat: float  # the fat layer's share of the body radii
    organ: tuple[float, ...]  # centre x, y, z and radii x, y, z
    taper: float  # in-plane radii scale by 1 + taper * dz (dz: z offset in organ radii)
    wobble: tuple[float, ...]  # amplitude, phase of 2- and 3-fold in-plane lobes, and of a z wave
    lesion: tuple[float, ...]  # centre x, y, z (a voxel centre inside the organ) and radius
    levels: tuple[float, float, float]  # organ, lesion and noise sd (HU)
    bias: tuple[float, float, float]  # HU per body radius along x, y and per half scan length along z

    def axis(self, a: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(hi - lo,) float32 positions (mm) of voxels ``lo:hi`` along axis ``a``."""
        n = self.shape[a]
        return ((np.arange(lo, n if hi is None else hi) - (n - 1) / 2) * self.spacing[a]).astype(np.float32)

    def index_range(self, a: int, centre: float, half: float) -> tuple[int, int]:
        """Voxels ``lo:hi`` along axis ``a`` whose centres lie within ``centre +- half`` mm."""
        n, s = self.shape[a], self.spacing[a]
        lo = int(np.ceil((centre - half) / s + (n - 1) / 2))
        hi = int(np.floor((centre + half) / s + (n - 1) / 2)) + 1
        return max(lo, 0), min(max(hi, 0), n)

    def inner(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(H, W) bool: inside the body's fat layer; ``x`` (W,), ``y`` (H,) in mm."""
        bx, by, ra, rb = self.body
        ra, rb = ra * (1 - self.fat), rb * (1 - self.fat)
        return ((x[None] - bx) / ra) ** 2 + ((y[:, None] - by) / rb) ** 2 <= 1

    def organ_mask(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(K, H, W) bool organ membership at ``z`` (K,), ``y`` (H,), ``x`` (W,) positions (mm).

        An ellipsoid whose in-plane radii taper along z and whose surface bulges in smooth lobes,
        cut to the inside of the fat layer.
        """
        ox, oy, oz, ra, rb, rc = self.organ
        a2, p2, a3, p3, az, pz = self.wobble
        dx, dy = (x[None] - ox) / ra, (y[:, None] - oy) / rb
        phi = np.arctan2(dy, dx)
        lobes = (a2 * np.cos(2 * phi + p2) + a3 * np.cos(3 * phi + p3)).astype(np.float32)
        dz = (z - oz) / rc
        scale = (1 + self.taper * dz) ** -2
        wave = az * np.sin(np.pi * dz + pz)
        inside = (dx**2 + dy**2)[None] * scale[:, None, None] + (dz**2)[:, None, None]
        return (inside <= (1 + lobes[None] + wave[:, None, None]) ** 2) & self.inner(x, y)[None]

    def organ_box(self) -> list[tuple[int, int]]:
        """Voxel ranges along X, Y, Z outside which ``organ_mask`` is empty."""
        reach = 1 + sum(self.wobble[0::2])  # the lobes' and wave's furthest reach
        flare = 1 + abs(self.taper) * reach  # the widest the taper makes a slice
        ox, oy, oz, ra, rb, rc = self.organ
        halves = (ra * reach * flare, rb * reach * flare, rc * reach)
        return [self.index_range(a, c, h) for a, (c, h) in enumerate(zip((ox, oy, oz), halves, strict=True))]


def draw_case(seed: int, index: int, in_plane: int = 512, slices: Sequence[int] = (80, 300)) -> CtCase:
    """The draws of case ``index`` of ``seed`` (geometry, anatomy, levels), without its voxels."""
    case, _, _ = _draw(np.random.default_rng([seed, index]), in_plane, slices)
    return case


def _draw(
    rng: np.random.Generator, in_plane: int, slices: Sequence[int]
) -> tuple[CtCase, np.ndarray, np.random.Generator]:
    """A case's draws and affine; ``rng`` goes on to draw the noise."""
    if in_plane < 32 or not 1 <= slices[0] <= slices[1]:
        raise ValueError(f"need in_plane >= 32 and 1 <= slices[0] <= slices[1], got {in_plane}, {slices}")
    in_plane_mm = rng.uniform(*IN_PLANE_MM)
    spacing = (in_plane_mm, in_plane_mm, rng.uniform(*SLICE_MM))
    # a count from a uniform draw, so that the other draws do not depend on ``slices``
    shape = (in_plane, in_plane, slices[0] + int(rng.random() * (slices[1] - slices[0] + 1)))
    half = in_plane * in_plane_mm / 2  # half the field of view, mm
    length = shape[2] * spacing[2]
    # wider than deep, like an abdomen, and a little off centre
    body = np.concatenate([half * rng.uniform(-0.04, 0.04, 2), half * rng.uniform([0.78, 0.55], [0.9, 0.68])])
    fat = rng.uniform(0.06, 0.12)
    inner = body[2:] * (1 - fat)
    # on the patient's right (low x in LPS-like order) and a little anterior (low y), as a liver
    centre = body[:2] - inner * rng.uniform([0.3, 0.0], [0.4, 0.15])
    radii = inner * rng.uniform([0.38, 0.55], [0.48, 0.7])
    organ = np.array([*centre, length * rng.uniform(-0.05, 0.05), *radii, length * rng.uniform(0.25, 0.35)])
    wobble = np.stack([rng.uniform(0, [0.06, 0.06, 0.05]), rng.uniform(0, 2 * np.pi, 3)], 1).ravel()
    taper = rng.uniform(-0.25, 0.25)
    organ_hu = rng.uniform(*ORGAN_HU)
    lesion_hu = organ_hu + float(rng.choice([-1, 1])) * rng.uniform(*LESION_CONTRAST_HU)
    levels = (organ_hu, lesion_hu, rng.uniform(*NOISE_HU))
    direction = rng.normal(size=3)
    bias = rng.uniform(*BIAS_HU) * direction / np.linalg.norm(direction)
    offset = organ[3:] * rng.uniform(-0.35, 0.35, 3)
    radius = max(rng.uniform(*LESION_MM) * in_plane / 512, in_plane_mm)
    affine = volume_affine(shape, spacing, rng)
    floats = [tuple(float(v) for v in a) for a in (body, organ, wobble)]
    bias_x, bias_y, bias_z = (float(v) for v in bias)
    case = CtCase(
        shape, spacing, floats[0], fat, floats[1], taper, floats[2], (), levels, (bias_x, bias_y, bias_z)
    )

    # on a voxel centre inside the organ, so the lesion is never empty: the organ's centre if the
    # drawn one falls outside (the organ's edge bulges, or the fat layer cuts it)
    def voxel_centre(point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ijk = [
            int(np.clip(np.rint(c / s + (n - 1) / 2), 0, n - 1))
            for c, s, n in zip(point, spacing, shape, strict=True)
        ]
        x, y, z = (case.axis(a, i, i + 1) for a, i in enumerate(ijk))
        return x, y, z

    x, y, z = voxel_centre(organ[:3] + offset)
    if not case.organ_mask(x, y, z).any():
        x, y, z = voxel_centre(organ[:3])
    return replace(case, lesion=(float(x[0]), float(y[0]), float(z[0]), radius)), affine, rng


def ct_volume(
    seed: int, index: int, in_plane: int = 512, slices: Sequence[int] = (80, 300)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case: image (X, Y, Z) int16 HU, mask (X, Y, Z) uint8 with values 0..2 (both Fortran
    ordered, as NIfTI stores them) and the (4, 4) voxel -> world (RAS, mm) affine.

    Args:
        in_plane: voxels a side in plane (512 in real CT; >= 32).
        slices: (min, max) slice count, both included.
    """
    case, affine, rng = _draw(np.random.default_rng([seed, index]), in_plane, slices)
    shape = case.shape
    image = np.empty(shape, np.int16, order="F")
    mask = np.empty(shape, np.uint8, order="F")
    x, y, z = (case.axis(a) for a in range(3))
    (bx, by, ra, rb), (organ_hu, lesion_hu, noise) = case.body, case.levels
    body = ((x[None] - bx) / ra) ** 2 + ((y[:, None] - by) / rb) ** 2 <= 1
    # the in-plane part of every slice once, (Y, X): air, fat, tissue and the in-plane bias
    base = np.select([case.inner(x, y), body], [TISSUE, FAT], AIR).astype(np.float32)
    base += body * (case.bias[0] * (x[None] - bx) / ra + case.bias[1] * (y[:, None] - by) / rb)
    ramp_z = (case.bias[2] * z / (shape[2] * case.spacing[2] / 2)).astype(np.float32)
    body = body.astype(np.float32)
    (ox0, ox1), (oy0, oy1), (oz0, oz1) = case.organ_box()
    lx, ly, lz, lr = case.lesion
    (lx0, lx1), (ly0, ly1), (lz0, lz1) = (case.index_range(a, c, lr) for a, c in enumerate((lx, ly, lz)))
    for z0 in range(0, shape[2], SLAB):
        z1 = min(z0 + SLAB, shape[2])
        # (slices, Y, X) in C order is the (X, Y, slices) block of the Fortran-ordered outputs
        hu = rng.standard_normal((z1 - z0, shape[1], shape[0]), dtype=np.float32)
        hu *= noise
        hu += base
        hu += ramp_z[z0:z1, None, None] * body
        labels = np.zeros(hu.shape, np.uint8)
        a, b = max(z0, oz0), min(z1, oz1)
        if a < b and ox0 < ox1 and oy0 < oy1:
            inside = case.organ_mask(x[ox0:ox1], y[oy0:oy1], z[a:b])
            hu[a - z0 : b - z0, oy0:oy1, ox0:ox1][inside] += organ_hu - TISSUE
            labels[a - z0 : b - z0, oy0:oy1, ox0:ox1][inside] = 1
        a, b = max(z0, lz0), min(z1, lz1)
        if a < b:
            dist = ((x[lx0:lx1] - lx) ** 2)[None, None] + ((y[ly0:ly1, None] - ly) ** 2)[None]
            ball = dist + ((z[a:b] - lz) ** 2)[:, None, None] <= lr**2
            region = labels[a - z0 : b - z0, ly0:ly1, lx0:lx1]
            ball &= region == 1  # the lesion is cut to the organ
            hu[a - z0 : b - z0, ly0:ly1, lx0:lx1][ball] += lesion_hu - organ_hu
            region[ball] = 2
        np.rint(hu, out=hu)
        np.clip(hu, *HU_RANGE, out=hu)
        image[:, :, z0:z1] = hu.T
        mask[:, :, z0:z1] = labels.T
    return image, mask, affine


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` as NIfTI (gzip level 1, nibabel's default, where the name ends ``.gz``)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(image, tmp), suffix=suffix)


def generate_ct(
    output: str | Path,
    num_cases: int = 3,
    seed: int = 0,
    in_plane: int = 512,
    slices: Sequence[int] = (80, 300),
    compress: bool = True,
) -> Path:
    """Write ``num_cases`` CT volumes (``ct_volume``) with ``dataset.json`` in MSD layout: one
    ``imagesTr``/``labelsTr`` file a case, ``.nii.gz`` (``compress``) or ``.nii``. Returns the
    output folder. One case is in memory at a time (236 MB at 512 x 512 x 300)."""
    if num_cases < 1:
        raise ValueError(f"need num_cases >= 1, got {num_cases}")
    output, ending = Path(output), ".nii.gz" if compress else ".nii"
    training = []
    for i in range(num_cases):
        image, mask, affine = ct_volume(seed, i, in_plane, slices)
        entry = {"image": f"./imagesTr/ct_{i:03d}{ending}", "label": f"./labelsTr/ct_{i:03d}{ending}"}
        _save(output / entry["image"], image, affine)
        _save(output / entry["label"], mask, affine)
        training.append(entry)
        log.info("case %d of %d: %s voxels written to %s", i + 1, num_cases, image.shape, output)
        del image, mask  # before the next case is built, so that only one is ever held
    meta = {
        "name": "SyntheticCT",
        "description": "generated abdominal-like CT: organ and lesion (pipeline.data.synthesis.ct)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(enumerate(CLASS_NAMES)),
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    write_json(output / "dataset.json", meta)
    return output
