"""Deep supervision's loss: every output of the network against the labels at its own size.

A network built with ``deep_supervision=True`` returns, in training mode, a list of logits: the
full-resolution ones first, then coarser ones, finest first (``pipeline.models.decoder.
DeepSupervisionHeads``). Each is scored by the module's loss against the labels resized to its
exact spatial size by nearest-neighbour sampling (nnU-Net's down-sampled segmentation targets;
with anisotropic strides the factor differs per axis, so the size is taken from the output, not
from a scale), and the losses are summed with weights halving per level (1, 1/2, 1/4, ...)
normalised to sum 1. nnU-Net gives its lowest-resolution output weight 0; medseg's networks do
not compute that output at all, so every output here has a weight above 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def deep_supervision_weights(n: int) -> list[float]:
    """Weights of ``n`` outputs, full resolution first: 1, 1/2, 1/4, ... normalised to sum 1."""
    if n < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n}")
    halving = [0.5**i for i in range(n)]
    return [w / sum(halving) for w in halving]


def resize_labels(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Labels (B, 1, *spatial) at ``size`` by nearest-neighbour sampling (each output voxel takes
    the label at its centre), in the mask's dtype; the mask itself when it has that size already."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest-exact").to(mask.dtype)


def deep_supervision_loss(
    loss: Callable[[Tensor, Tensor], Tensor], outputs: Tensor | Sequence[Tensor], mask: Tensor
) -> Tensor:
    """``loss`` of the network's output(s) against ``mask``.

    Args:
        loss: a loss on (logits (B, K, *size), labels (B, 1, *size)), e.g. MONAI's ``DiceCELoss``.
        outputs: logits (B, K, *spatial), or the list of a deeply supervised network in training
            mode: [(B, K, *spatial), (B, K, *size_1), ...], each size_i no larger than spatial.
        mask: labels (B, 1, *spatial) of class indices.

    Returns:
        the loss of a tensor as it is; for a list, the weighted sum of each output's loss
        against ``resize_labels(mask, its size)`` (``deep_supervision_weights``).
    """
    if isinstance(outputs, Tensor):
        return loss(outputs, mask)
    weights = deep_supervision_weights(len(outputs))
    terms = [
        w * loss(out, resize_labels(mask, out.shape[2:])) for w, out in zip(weights, outputs, strict=True)
    ]
    return torch.stack(terms).sum()
