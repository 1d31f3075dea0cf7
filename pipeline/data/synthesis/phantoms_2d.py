"""Procedural phantoms: the embedded default data set.

Each 2D grayscale "scan" holds a body outline (background class), an organ (class 1), small
round lesions inside it (class 2), and thin tubular vessels 1-3 px wide (class 3), where fine
spatial detail matters. The image adds organ texture, a smooth multiplicative intensity
inhomogeneity (bias field), partial-volume edges, blur and Gaussian noise. Written in the
image/mask folder layout with ``classes.json``, so the real loading code reads it.

Image ``i`` of seed ``s`` depends only on ``(s, i)``: the set is deterministic and each image
can be generated independently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.data.reading.formats import write_png

CLASS_NAMES = ["background", "organ", "lesion", "vessel"]
SUPERSAMPLE = 4  # vessels are drawn on a 4x finer grid, then area-averaged (partial volume)


def _blob(
    yy: np.ndarray,
    xx: np.ndarray,
    rng: np.random.Generator,
    center: Sequence[float] | np.ndarray,
    radii: Sequence[float] | np.ndarray,
    wobble: float,
) -> np.ndarray:
    """Boolean ellipse whose radius is modulated by a few low-order harmonics."""
    dy, dx = (yy - center[0]) / radii[0], (xx - center[1]) / radii[1]
    theta = np.arctan2(dy, dx)
    radius = np.ones_like(theta)
    for k in (2, 3, 4):
        radius += wobble * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius


def _vessel_centerline(rng: np.random.Generator, body: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) points (row, col) of a smooth random curve starting inside the body, in pixels."""
    rows, cols = np.nonzero(body)
    k = rng.integers(len(rows))
    pos = np.array([rows[k], cols[k]], dtype=float)
    heading = rng.uniform(0, 2 * np.pi)
    turn = 0.0
    step = 1.0 / SUPERSAMPLE
    points = []
    for _ in range(int(rng.uniform(0.5, 1.3) * size / step)):
        turn = 0.97 * turn + rng.normal(0, 0.004)
        heading += turn
        pos = pos + step * np.array([np.sin(heading), np.cos(heading)])
        if not (0 <= pos[0] < size and 0 <= pos[1] < size):
            break
        points.append(pos.copy())
    return np.array(points).reshape(-1, 2)


def _vessels(rng: np.random.Generator, body: np.ndarray, size: int) -> np.ndarray:
    """Vessel coverage fraction in [0, 1] per pixel, (size, size) float."""
    fine = size * SUPERSAMPLE
    coverage = np.zeros((size, size))
    for _ in range(rng.integers(3, 7)):
        line = np.ones((fine, fine), dtype=bool)
        pts = np.floor(_vessel_centerline(rng, body, size) * SUPERSAMPLE).astype(int)
        line[pts[:, 0], pts[:, 1]] = False
        width = rng.uniform(1.0, 2.8)  # px
        tube = ndimage.distance_transform_edt(line) <= width * SUPERSAMPLE / 2
        frac = tube.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        coverage = np.maximum(coverage, frac)
    return coverage * body


def _bias_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, strength: float) -> np.ndarray:
    """Smooth multiplicative field in [1 - strength, 1 + strength] from a random quadratic."""
    c = rng.normal(size=6)
    field = c[0] * yy + c[1] * xx + c[2] * yy * xx + c[3] * yy**2 + c[4] * xx**2 + c[5] * 0.1
    field = (field - field.min()) / max(np.ptp(field), 1e-6) * 2 - 1
    return 1.0 + strength * field


def phantom(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image (size, size) uint8 and mask (size, size) uint8 with values 0..3."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(float) / (size - 1) * 2 - 1
    body = _blob(yy, xx, rng, rng.uniform(-0.05, 0.05, 2), rng.uniform(0.78, 0.92, 2), 0.04)
    organ = _blob(yy, xx, rng, rng.uniform(-0.25, 0.25, 2), rng.uniform(0.28, 0.45, 2), 0.12) & body
    mask = np.zeros((size, size), np.uint8)
    mask[organ] = 1
    levels = {"body": rng.uniform(0.25, 0.35), "organ": rng.uniform(0.5, 0.6)}
    image = np.where(body, levels["body"], 0.04) + organ * (levels["organ"] - levels["body"])
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0)
    image += 0.025 * texture / max(texture.std(), 1e-6) * body
    organ_rows, organ_cols = np.nonzero(organ)
    for _ in range(rng.integers(1, 4) if organ_rows.size else 0):
        k = rng.integers(organ_rows.size)
        center = (yy[organ_rows[k], organ_cols[k]], xx[organ_rows[k], organ_cols[k]])
        radius = rng.uniform(2.5, 7.0) * 2 / size
        lesion = _blob(yy, xx, rng, center, (radius, radius * rng.uniform(0.8, 1.25)), 0.08) & body
        mask[lesion] = 2
        image[lesion] = rng.choice([rng.uniform(0.78, 0.88), rng.uniform(0.08, 0.15)], p=[0.7, 0.3])
    coverage = _vessels(rng, body, size)
    image = image + rng.uniform(0.18, 0.3) * coverage  # vessels brighter than what they cross
    mask[coverage >= 0.5] = 3
    image *= _bias_field(rng, yy, xx, rng.uniform(0.1, 0.25))
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))
    image += rng.normal(0, rng.uniform(0.03, 0.06), image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def generate_dataset(output: str | Path, num_images: int = 240, size: int = 128, seed: int = 0) -> Path:
    """Write ``num_images`` phantoms to ``output/images``, ``output/masks`` and ``classes.json``.

    Returns the output folder. Existing files with the same names are replaced.
    """
    if num_images < 2 or size < 32:
        raise ValueError(f"need num_images >= 2 and size >= 32, got {num_images} and {size}")
    output = Path(output)
    width = len(str(num_images - 1))
    for i in range(num_images):
        image, mask = phantom(seed, i, size)
        write_png(output / "images" / f"phantom_{i:0{width}d}.png", image)
        write_png(output / "masks" / f"phantom_{i:0{width}d}.png", mask)
    (output / "classes.json").write_text(json.dumps(dict(enumerate(CLASS_NAMES)), indent=2))
    return output
