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

The surface distances are MONAI's (edges as the voxels an erosion removes, nearest-neighbour
distances between the two edge sets), computed per class on the bounding box of the union of both
masks plus one voxel: nothing outside that box is an edge voxel or changes one, so the scores equal
MONAI's on the whole volume, while a 512 x 512 x 300 CT takes under a second instead of half a
minute (``benchmarks/surface_metrics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import get_mask_edges, get_surface_distance
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

QUANTILE_MAX = 2**24  # torch.quantile's input size limit in older torch releases
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


def _crop_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of two boxes (``ndimage.find_objects`` slices), one voxel larger on every
    side, clipped to ``shape``: the erosion of a voxel on the objects' hull then reads real
    background, and at the volume's edge sees the same zero border as on the whole volume."""
    return tuple(
        slice(max(min(x.start, y.start) - 1, 0), min(max(x.stop, y.stop) + 1, n))
        for x, y, n in zip(a, b, shape, strict=True)
    )


def _surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None
) -> tuple[Tensor, Tensor]:
    """(*box) binary masks, both non-empty -> float32 distances (mm with ``spacing``, else voxels)
    from every edge voxel of ``pred`` to the nearest of ``target``, and from ``target`` to ``pred``.

    The box is already cropped, so MONAI's own crop (a bounding box over the box again) is skipped.
    """
    edges_pred, edges_gt = get_mask_edges(pred, target, crop=False)
    return (
        torch.from_numpy(get_surface_distance(edges_pred, edges_gt, "euclidean", spacing)),
        torch.from_numpy(get_surface_distance(edges_gt, edges_pred, "euclidean", spacing)),
    )


def surface_scores_per_image(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    tolerance: float | None = None,
) -> dict[str, Tensor]:
    """(B, *spatial) label maps -> ``{"hd95": (B, C)}``, and ``"surface_dice": (B, C)`` with a
    ``tolerance``; float64, distances in mm with ``spacing`` (per axis), else in pixels.

    One pass for both scores: each item's and foreground class's surface distances are computed
    once, on the box around both masks. HD95 is MONAI's (the larger of the two directed 95th
    percentiles); the surface Dice the share of both edges within ``tolerance`` of the other
    (Nikolov et al. 2021). NaN where the ground truth lacks the class and for the background;
    where only the prediction lacks it, HD95 is the item's diagonal and the surface Dice 0.
    """
    shape = tuple(pred.shape[1:])
    steps = spacing if spacing is not None else [1.0] * len(shape)
    diagonal = math.hypot(*(n * s for n, s in zip(shape, steps, strict=True)))
    pred_np, target_np = pred.detach().cpu().long().numpy(), target.detach().cpu().long().numpy()
    hd = torch.full((len(pred_np), num_classes), torch.nan, dtype=torch.float64)
    nsd = hd.clone()
    for i, (p, t) in enumerate(zip(pred_np, target_np, strict=True)):
        # one pass over each label map for every class's box; None where the class is absent
        boxes_pred = ndimage.find_objects(p, max_label=num_classes - 1)
        boxes_gt = ndimage.find_objects(t, max_label=num_classes - 1)
        for c, (box_pred, box_gt) in enumerate(zip(boxes_pred, boxes_gt, strict=True), start=1):
            if box_gt is None:
                continue
            if box_pred is None:
                hd[i, c], nsd[i, c] = diagonal, 0.0
                continue
            box = _crop_box(box_pred, box_gt, shape)
            to_gt, to_pred = _surface_distances(p[box] == c, t[box] == c, spacing)
            hd[i, c] = max(percentile_95(to_gt), percentile_95(to_pred))
            if tolerance is not None:
                within = (to_gt <= tolerance).sum() + (to_pred <= tolerance).sum()
                nsd[i, c] = within.item() / (len(to_gt) + len(to_pred))
    return {"hd95": hd} if tolerance is None else {"hd95": hd, "surface_dice": nsd}


def percentile_95(distances: Tensor) -> float:
    """The 95th percentile of (N,) distances: ``torch.quantile``'s, as MONAI's HD95, up to
    ``QUANTILE_MAX`` values (torch before 2.x refuses more); numpy's linear interpolation beyond,
    which the surface of a noisy prediction on a real-size CT can reach."""
    if len(distances) <= QUANTILE_MAX:
        return torch.quantile(distances, 0.95).item()
    return float(np.percentile(distances.cpu().numpy(), 95))


def hd95_per_image(
    pred: Tensor, target: Tensor, num_classes: int, spacing: Sequence[float] | None = None
) -> Tensor:
    """(B, *spatial) label maps -> (B, C) HD95, in mm with ``spacing`` (per axis), else in pixels.

    NaN where the ground truth lacks the class and for the background; the item's diagonal where
    only the prediction lacks it.
    """
    return surface_scores_per_image(pred, target, num_classes, spacing)["hd95"]


def surface_dice_per_image(
    pred: Tensor, target: Tensor, num_classes: int, tolerance: float, spacing: Sequence[float] | None = None
) -> Tensor:
    """(B, *spatial) label maps -> (B, C) surface Dice at ``tolerance`` (mm with ``spacing``): the
    share of both boundaries within ``tolerance`` of the other (Nikolov et al. 2021).

    NaN where the ground truth lacks the class and for the background; 0 where only the
    prediction lacks it.
    """
    return surface_scores_per_image(pred, target, num_classes, spacing, tolerance)["surface_dice"]


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
