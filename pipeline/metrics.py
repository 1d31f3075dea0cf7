"""Per-class segmentation metrics, accumulated per image (2D) or per case (3D volumes) and
synchronised across processes.

For every item (a 2D image, or a whole volume scored in 3D on its own grid) and class the metric
keeps the confusion counts (TP, FP, FN, TN) and, optionally, the 95th-percentile Hausdorff
distance and the surface Dice (the values of MONAI's ``compute_hausdorff_distance`` and
``compute_surface_dice``, in millimetres when the item's voxel spacing is given, else in pixels).
From the counts: Dice, IoU, precision, recall (sensitivity), specificity and accuracy.

How empty images count (the convention of MONAI's ``ignore_empty=True`` and of nnU-Net):
- Dice, IoU, recall and HD95 are undefined for an image whose ground truth lacks the class; that
  image is left out of the class's mean. A false positive there still lowers precision and
  specificity.
- Precision is undefined (left out) where the prediction lacks the class.
- A class present in the ground truth but missing from the prediction scores Dice, IoU, recall and
  surface Dice 0 and HD95 the item's diagonal (sqrt(H^2 + W^2) pixels, or the volume's diagonal in
  mm), the largest possible distance, so a missed structure counts as the worst case instead of
  dropping out of the mean.
- A class mean over no defined images is NaN; the foreground mean (``dice``, ``iou``, ...) is the
  mean over foreground classes with a defined value.
- HD95 and surface Dice of the background (class 0) are NaN: never averaged or reported, and its
  surface (every foreground surface plus the volume's border) would cost more than all the others.

The surface scores come from ``pipeline.surface_distances`` (per class, on the box around both masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from pipeline.surface_distances import surface_scores_per_image

METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy")


def confusion_per_image(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(B, *spatial) label maps -> (B, C, C) counts, rows = ground truth, columns = prediction."""
    b = pred.shape[0]
    idx = target.reshape(b, -1).long() * num_classes + pred.reshape(b, -1).long()
    offset = torch.arange(b, device=pred.device)[:, None] * num_classes**2
    counts = torch.bincount((idx + offset).reshape(-1), minlength=b * num_classes**2)
    return counts.reshape(b, num_classes, num_classes)


def scores_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """(N, C, C) confusion -> per-image, per-class scores, each (N, C) float64 with NaN where undefined."""
    confusion = confusion.double()
    tp = confusion.diagonal(dim1=1, dim2=2)
    gt = confusion.sum(dim=2)
    pr = confusion.sum(dim=1)
    total = confusion.sum(dim=(1, 2))[:, None]
    fp, fn = pr - tp, gt - tp
    tn = total - tp - fp - fn
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=confusion.device)

    def ratio(num: Tensor, den: Tensor, defined: Tensor) -> Tensor:
        return torch.where(defined, num / den.clamp_min(1), nan)

    has_gt = gt > 0
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn, has_gt),
        "iou": ratio(tp, tp + fp + fn, has_gt),
        "precision": ratio(tp, tp + fp, pr > 0),
        "recall": ratio(tp, gt, has_gt),
        "specificity": ratio(tn, tn + fp, (tn + fp) > 0),
        "accuracy": ratio(tp + tn, total.expand_as(tp), total > 0),
    }


def _append(state: list[Tensor] | Tensor, value: Tensor) -> None:
    """Add one update's tensor to a ``cat`` state, a list whenever ``update`` runs: torchmetrics
    swaps in the synced tensor only inside ``compute`` and restores the list after."""
    assert isinstance(state, list), "update on a synced metric"
    state.append(value)


def _cat(state: list[Tensor] | Tensor) -> Tensor | None:
    """A list state (before sync) or a tensor state (after a ``cat`` sync) as one tensor; None if empty."""
    if isinstance(state, list):
        return torch.cat(state) if state else None
    return state


def first_occurrences(ids: Tensor) -> Tensor:
    """Sorted positions of the first occurrence of each distinct value of ``ids`` (N,)."""
    order = torch.argsort(ids, stable=True)
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    return order[first].sort().values


def nanmean(x: Tensor, dim: int | None = None) -> Tensor:
    """Mean ignoring NaN; NaN where nothing is defined."""
    return x.nanmean() if dim is None else x.nanmean(dim=dim)


class SegmentationMetrics(Metric):
    """Dice, IoU, precision, recall, specificity, accuracy, HD95 (and surface Dice) per class and
    foreground mean, over items: 2D images, or whole volumes scored in 3D.

    Args:
        class_names: names in index order, background first.
        hd95: also compute the 95th-percentile Hausdorff distance (CPU cost: surface distances).
        surface_tolerance: also compute the surface Dice at this tolerance (mm with a spacing).

    ``compute()`` returns ``{"dice": ..., "dice_<class>": ..., "iou": ..., ..., "images": ...}`` as
    0-d tensors; the unsuffixed keys are means over foreground classes, ``images`` the number of
    distinct items scored.
    """

    full_state_update = False
    # "cat" states (add_state): a list of per-update tensors; one tensor while synced in compute
    confusion: list[Tensor] | Tensor  # (N, C, C) counts per item
    hausdorff: list[Tensor] | Tensor  # (N, C) HD95
    surface: list[Tensor] | Tensor  # (N, C) surface Dice
    index: list[Tensor] | Tensor  # (N,) sample ids

    def __init__(
        self, class_names: Sequence[str], hd95: bool = True, surface_tolerance: float | None = None
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.hd95 = hd95
        self.surface_tolerance = surface_tolerance
        self.add_state("confusion", default=[], dist_reduce_fx="cat")
        self.add_state("hausdorff", default=[], dist_reduce_fx="cat")
        self.add_state("surface", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred: Tensor,
        target: Tensor,
        index: Tensor | None = None,
        spacing: Sequence[float] | Tensor | None = None,
    ) -> None:
        """``pred``, ``target``: (B, *spatial) class indices; ``index``: optional (B,) sample ids;
        ``spacing``: voxel size per spatial axis in mm, shared by the B items (distances in mm).

        With ids, an item scored more than once (DistributedSampler pads the last batch of a
        rank with repeats) counts once in ``compute``.
        """
        _append(self.confusion, confusion_per_image(pred, target, self.num_classes))
        steps = None if spacing is None else [float(s) for s in spacing]
        if self.hd95 or self.surface_tolerance is not None:
            surface = surface_scores_per_image(pred, target, self.num_classes, steps, self.surface_tolerance)
            if self.hd95:
                _append(self.hausdorff, surface["hd95"].to(pred.device))
            if self.surface_tolerance is not None:
                _append(self.surface, surface["surface_dice"].to(pred.device))
        if index is not None:
            _append(self.index, torch.as_tensor(index, device=pred.device).long().reshape(-1))

    def _first_occurrences(self, n: int) -> Tensor | None:
        """Positions (in update order) of the first image with each sample id; None without ids."""
        ids = _cat(self.index)
        return None if ids is None or len(ids) != n else first_occurrences(ids)

    def _confusion(self) -> Tensor:
        """(N, C, C) counts, one per update's item (repeats included)."""
        confusion = _cat(self.confusion)
        if confusion is None:
            raise RuntimeError(f"{type(self).__name__}: no item scored yet; call update() before compute()")
        return confusion

    def per_image(self) -> dict[str, Tensor]:
        """Per-item, per-class scores: each (N, C), one row per distinct image or case."""
        confusion = self._confusion()
        keep = self._first_occurrences(len(confusion))
        scores = scores_from_confusion(confusion)
        if self.hd95:
            hausdorff = _cat(self.hausdorff)
            assert hausdorff is not None  # appended with every confusion
            scores["hd95"] = hausdorff
        if self.surface_tolerance is not None:
            surface = _cat(self.surface)
            assert surface is not None  # appended with every confusion
            scores["surface_dice"] = surface
        return scores if keep is None else {k: v[keep] for k, v in scores.items()}

    def total_confusion(self) -> Tensor:
        """(C, C) counts over all distinct images, rows = ground truth."""
        confusion = self._confusion()
        keep = self._first_occurrences(len(confusion))
        return (confusion if keep is None else confusion[keep]).sum(0)

    def compute(self) -> dict[str, Tensor]:
        scores = self.per_image()
        out: dict[str, Tensor] = {"images": torch.tensor(len(scores["dice"]))}  # distinct images scored
        for name, values in scores.items():
            per_class = nanmean(values, dim=0)
            out[name] = nanmean(per_class[1:])
            for c, class_name in enumerate(self.class_names[1:], start=1):
                out[f"{name}_{class_name}"] = per_class[c]
        return {k: v.float() for k, v in out.items()}


class BatchMeanOnce(Metric):
    """Mean of a per-batch value (the loss) weighted by batch size, each batch counted once.

    Under DDP, ``DistributedSampler`` pads the evaluation batches with whole repeated batches;
    a batch is known by its smallest sample id, and a repeat does not count again, so the mean
    equals one process's. Without ids every batch counts.
    """

    full_state_update = False
    # "cat" states (add_state): a list of per-update tensors; one tensor while synced in compute
    values: list[Tensor] | Tensor  # (batches,) value
    sizes: list[Tensor] | Tensor  # (batches,) images
    ids: list[Tensor] | Tensor  # (batches,) smallest sample id, -1 unknown

    def __init__(self) -> None:
        super().__init__()
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("sizes", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, value: Tensor, size: int, index: Tensor | None = None) -> None:
        """``value``: scalar for a batch of ``size`` images; ``index``: optional (size,) sample ids."""
        device = value.device
        _append(self.values, value.detach().float().reshape(1))
        _append(self.sizes, torch.tensor([float(size)], device=device))
        batch_id = (
            torch.as_tensor(index, device=device).min().long() if index is not None else torch.tensor(-1)
        )
        _append(self.ids, batch_id.to(device).reshape(1))  # -1: unknown

    def compute(self) -> Tensor:
        values, sizes, ids = _cat(self.values), _cat(self.sizes), _cat(self.ids)
        if values is None:
            return torch.tensor(float("nan"))
        assert sizes is not None and ids is not None  # appended with every value
        if (ids >= 0).all():
            keep = first_occurrences(ids)
            values, sizes = values[keep], sizes[keep]
        return (values * sizes).sum() / sizes.sum()
