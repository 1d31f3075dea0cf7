"""Post-processing of predicted label maps: largest connected component, class sizes, overlays."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

# RGB per foreground class (index 1, 2, ...), cycled when there are more classes
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.uint8,
)  # fmt: skip


def keep_largest_component(
    labels: np.ndarray, num_classes: int, classes: Iterable[int] | None = None
) -> np.ndarray:
    """Per foreground class keep only its largest connected component; the rest becomes background.

    Connectivity is face-adjacency (6 in 3D, 4 in 2D), nnU-Net's choice for this step.

    Args:
        labels: (S, H, W) class indices; a stack of slices is treated as one volume.
        num_classes: classes including background.
        classes: the class indices to treat (``medseg cv`` decides which, from validation);
            None: every foreground class.
    """
    out = labels.copy()
    for cls in range(1, num_classes) if classes is None else classes:
        components, count = ndimage.label(labels == cls)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != 0) & (components != sizes.argmax())] = 0
    return out


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) voxel (pixel) count of each class in ``labels``."""
    return np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]


def to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) network input -> (H, W, 3) uint8, each channel stretched between its 1st and 99th
    percentile (the first channel as gray unless there are three)."""
    channels = image if image.shape[0] == 3 else image[:1]
    lo = np.percentile(channels, 1, axis=(1, 2), keepdims=True)
    hi = np.percentile(channels, 99, axis=(1, 2), keepdims=True)
    unit = np.clip((channels - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    rgb = np.broadcast_to(unit, (3, *unit.shape[1:])).transpose(1, 2, 0)
    return (rgb * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over a slice.

    Args:
        image: (C, H, W) network input of the slice.
        labels: (H, W) class indices.
        alpha: opacity of the class colours.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    rgb = to_display(image).astype(np.float32)
    fg = labels > 0
    colours = PALETTE[(labels[fg].astype(np.int64) - 1) % len(PALETTE)].astype(np.float32)
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours
    return rgb.round().astype(np.uint8)
