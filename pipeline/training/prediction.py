"""Whole-image and whole-volume prediction, shared by validation, testing and ``medseg infer``.

A 2D network segments a volume slice by slice (``chunk`` slices per forward pass), a 3D network in
Gaussian-weighted sliding windows of its training patch (MONAI's ``sliding_window_inference``); an
image or slice larger than a 2D patch goes through 2D windows the same way. Test-time augmentation
averages the softmax over the mirrorings along every spatial axis the network sees.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from monai.inferers import sliding_window_inference
from torch import Tensor


def mirrorings(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every non-empty set of the last ``spatial_dims`` axes to flip: 3 in 2D, 7 in 3D."""
    axes = [-1 - a for a in range(spatial_dims)]
    return [combo for n in range(1, spatial_dims + 1) for combo in itertools.combinations(axes, n)]


Progress = Callable[[float], None]  # told the fraction of a case done


class Predict(Protocol):
    """(B, C, *spatial) -> logits, telling ``progress`` (where given) the fraction done, as
    ``SegmentationModule.predict_logits``."""

    def __call__(self, x: Tensor, progress: Progress | None = None, /) -> Tensor: ...


def count_windows(size: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` takes over one input of ``size``: per axis,
    the windows a step of ``patch * (1 - overlap)`` needs to cover it (one where it fits)."""
    total = 1
    for n, p in zip(size, patch, strict=True):
        step = max(1, int(p * (1 - overlap)))
        total *= 1 if n <= p else math.ceil((n - p) / step) + 1
    return total


def window_logits(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    patch: Sequence[int] | None,
    sw_batch_size: int,
    overlap: float,
    progress: Progress | None = None,
) -> Tensor:
    """(B, C, *spatial) -> (B, K, *spatial): one forward pass, or sliding windows of ``patch``
    where the input exceeds it along some axis (``progress`` told after each batch of windows)."""
    if not (patch and any(s > p for s, p in zip(x.shape[2:], patch, strict=True))):
        logits = net(x)
        if progress:
            progress(1.0)
        return logits
    predictor = net
    if progress:
        total, done = count_windows(x.shape[2:], patch, overlap) * len(x), [0]

        def predictor(windows: Tensor) -> Tensor:
            logits = net(windows)
            done[0] += len(windows)
            progress(min(1.0, done[0] / total))
            return logits

    windowed = sliding_window_inference(
        x, tuple(patch), sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode="gaussian"
    )
    return cast(Tensor, windowed)  # as the predictor returns (MONAI's type also allows tuples and dicts)


def volume_logits(
    predict: Predict,
    image: Tensor,
    spatial_dims: int,
    chunk: int,
    progress: Progress | None = None,
) -> Tensor:
    """(C, S, H, W) -> (K, S, H, W) logits; ``predict`` maps (B, C, *spatial) to logits.

    2D: slices ``chunk`` at a time (``progress`` told after each); 3D: the whole volume at once
    (``predict(x, progress)`` windows it and tells ``progress``).
    """
    if spatial_dims == 3:
        return predict(image[None], progress)[0]
    slices = image.movedim(1, 0)  # (S, C, H, W)
    out: Tensor | None = None  # filled chunk by chunk: no list of parts concatenated (twice the memory)
    for start in range(0, len(slices), chunk):
        part = predict(slices[start : start + chunk])  # (n, K, H, W)
        if out is None:
            out = part.new_empty((part.shape[1], len(slices), *part.shape[2:]))
        out[:, start : start + len(part)] = part.movedim(0, 1)
        if progress:
            progress((start + len(part)) / len(slices))
    assert out is not None, "a volume has at least one slice"
    return out


def softmax_(logits: Tensor) -> Tensor:
    """Softmax over axis 0 of float (K, ...) logits, in place: a whole case's probabilities without
    a second (K, ...) array (600 MB for 3 classes on a 512 x 512 x 200 grid)."""
    logits.sub_(logits.amax(0)).exp_()
    return logits.div_(logits.sum(0))


def volume_probabilities(
    predict: Predict,
    image: Tensor,
    spatial_dims: int,
    chunk: int,
    tta: bool = False,
    progress: Progress | None = None,
) -> Tensor:
    """(C, S, H, W) -> (K, S, H, W) float32 softmax, averaged over the mirrorings with ``tta``."""
    flips = mirrorings(spatial_dims) if tta else []
    passes = 1 + len(flips)

    def told(done: int) -> Progress | None:
        return None if progress is None else lambda fraction: progress((done + fraction) / passes)

    probs = softmax_(volume_logits(predict, image, spatial_dims, chunk, told(0)).float())
    for i, dims in enumerate(flips, start=1):
        mirrored = softmax_(volume_logits(predict, image.flip(dims), spatial_dims, chunk, told(i)).float())
        probs += mirrored.flip(dims)
    return probs.div_(passes) if passes > 1 else probs
