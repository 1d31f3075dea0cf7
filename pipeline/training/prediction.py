"""Whole-image and whole-volume prediction, shared by validation, testing and ``medseg infer``.

A 2D network segments a volume slice by slice (``chunk`` slices per forward pass), a 3D network in
Gaussian-weighted sliding windows of its training patch (MONAI's ``sliding_window_inference``); an
image or slice larger than a 2D patch goes through 2D windows the same way. Test-time augmentation
averages the softmax over the mirrorings along every spatial axis the network sees.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor


def mirrorings(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every non-empty set of the last ``spatial_dims`` axes to flip: 3 in 2D, 7 in 3D."""
    axes = [-1 - a for a in range(spatial_dims)]
    return [combo for n in range(1, spatial_dims + 1) for combo in itertools.combinations(axes, n)]


def window_logits(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    patch: Sequence[int] | None,
    sw_batch_size: int,
    overlap: float,
) -> Tensor:
    """(B, C, *spatial) -> (B, K, *spatial): one forward pass, or sliding windows of ``patch``
    where the input exceeds it along some axis."""
    if patch and any(s > p for s, p in zip(x.shape[2:], patch, strict=True)):
        return sliding_window_inference(
            x, tuple(patch), sw_batch_size=sw_batch_size, predictor=net, overlap=overlap, mode="gaussian"
        )
    return net(x)


Progress = Callable[[float], None]  # told the fraction of a case done


def volume_logits(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    spatial_dims: int,
    chunk: int,
    progress: Progress | None = None,
) -> Tensor:
    """(C, S, H, W) -> (K, S, H, W) logits; ``predict`` maps (B, C, *spatial) to logits.

    2D: slices ``chunk`` at a time (``progress`` told after each); 3D: the whole volume at once
    (``predict`` windows it).
    """
    if spatial_dims == 3:
        logits = predict(image[None])[0]
        if progress:
            progress(1.0)
        return logits
    slices = image.movedim(1, 0)  # (S, C, H, W)
    parts = []
    for part in slices.split(chunk):
        parts.append(predict(part))
        if progress:
            progress(sum(map(len, parts)) / len(slices))
    return torch.cat(parts).movedim(0, 1)


def volume_probabilities(
    predict: Callable[[Tensor], Tensor],
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

    probs = volume_logits(predict, image, spatial_dims, chunk, told(0)).float().softmax(0)
    for i, dims in enumerate(flips, start=1):
        mirrored = volume_logits(predict, image.flip(dims), spatial_dims, chunk, told(i)).float().softmax(0)
        probs += mirrored.flip(dims)
    return probs / passes
